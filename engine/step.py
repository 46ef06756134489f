"""The one training step and the one input stage, shared by train.py and bench/train_fps.py.

    inputs = DeviceInput(augment, channels_last=True, rank=0)
    step = TrainStep(model, optimizer, precision, device, label_smoothing=0.1, ema=ema, cuda_graphs=True)
    if step.note:                                       # e.g. why the step is not captured here
        print(step.note)
    for i, (images, labels) in enumerate(loader):      # uint8 batches on the device (loaders/)
        loss = step(*inputs(images, labels, i), lr=lr_at(i))

Neither reads a value back to the host: losses and counters stay on the device until a log point.

The step is two functions, forward_backward() and update(), and they are graph-safe: no host
syncs, no Python branches on device values, the LR read from a device tensor when asked (fp16's
update() aside: GradScaler.step reads the overflow flag, see StepGraph). Eager mode runs them;
with cuda_graphs, StepGraph captures the same two once per input shape and replays them
(PyTorch's whole-network capture recipe, docs: "CUDA Graphs" in CUDA semantics).
"""
import itertools

import torch
import torch.nn.functional as F

from engine.optim import hold_lr_on_device, lr_read_on_host, set_lr
from engine.precision import Precision
from loaders.common import normalize
from loaders.device_decode import DEVICE_WORK

WARMUP_STEPS = 3       # eager steps per input shape before capture: cudnn autotuning, optimiser state
DDP_WARMUP_STEPS = 11  # PyTorch's CUDA graphs notes: DDP needs 11 eager iterations before capture


def sync(device: torch.device):
    """Wait for the device's queued work: the edges of a timed window."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def capture_stream(device: torch.device):
    """The side stream CUDA graph warm-up and capture run on (and DDP is built on), or None off CUDA."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


class DeviceInput:
    """A loader's batch -> the model's input and the loss's targets, on the device.

    Per-sample augmentation on the uint8 batch, ImageNet normalisation, then erasing and
    mixup/cutmix on the normalised batch (`augment`: an augment.DeviceAugment, or None). Work that
    moves from the loader's host threads onto the device plugs in here.
    """

    def __init__(self, augment=None, channels_last: bool = True, rank: int = 0):
        self.augment, self.channels_last, self.rank = augment, channels_last, rank

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int):
        if self.augment is not None:
            images = self.augment.before_normalize(images, step, self.rank)
        x = self.eval(images)
        if self.augment is not None:
            return self.augment.after_normalize(x, labels, step, self.rank)
        return x, labels

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        """Normalisation only: the input of an evaluation pass."""
        x = normalize(images)
        return x if self.channels_last else x.contiguous()


class TrainStep:
    """Forward, loss, backward, optimizer step, EMA update: one call per batch.

    float16 gets a dynamic loss scaler (`scaler`, saved with checkpoints); a step it skips because
    the gradients overflowed is counted in `skipped`, a device tensor. bfloat16 and fp32 need none.

    cuda_graphs: capture the step (StepGraph) where it can be; where it cannot, `note` says why in
    one line and the step runs eagerly, exactly as without. tensor_lr: hold the LR in device
    tensors even when eager (what capture uses). ema: an AveragedModel with multi_avg_fn and
    use_buffers=True, as train.py builds it; its n_averaged counter stays on the host.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 device: torch.device, label_smoothing: float = 0.0, ema=None, loss_scale: float = 2.0 ** 16,
                 cuda_graphs: bool = False, compile_mode: str | None = None, graph_stream=None,
                 tensor_lr: bool = False):
        self.model, self.optimizer, self.precision, self.device = model, optimizer, precision, device
        self.label_smoothing, self.ema = label_smoothing, ema
        if ema is not None and (ema.multi_avg_fn is None or not ema.use_buffers):
            raise ValueError("TrainStep's ema: an AveragedModel(multi_avg_fn=..., use_buffers=True)")
        self.scaler = torch.amp.GradScaler(device.type, init_scale=loss_scale, enabled=precision.needs_scaler)
        self.skipped = torch.zeros((), device=device, dtype=torch.int64)
        self.graph, self.note, self.captures = None, None, 0  # captures: graphs recorded so far (StepGraph)
        if cuda_graphs:
            why = graph_blocker(model, optimizer, device, compile_mode, graph_stream)
            if why:
                self.note = f"--cuda-graphs: {why}: running the step eagerly (the same results as without)"
            else:
                self.graph = StepGraph(self, graph_stream or capture_stream(device),
                                       DDP_WARMUP_STEPS if is_ddp(model) else WARMUP_STEPS)
        if tensor_lr or self.graph is not None:
            hold_lr_on_device(optimizer, device)

    @property
    def captured(self) -> bool:
        """Whether a graph of this step was recorded (and so replays ran), not merely asked for:
        with --cuda-graphs the first steps run eagerly, and a step that cannot be captured, or
        whose graph was dropped, runs eagerly throughout or from then on."""
        return self.captures > 0

    def __call__(self, x: torch.Tensor, targets: torch.Tensor, lr: float | None = None) -> torch.Tensor:
        """One step on (x, targets); `lr` sets the learning rate first. Returns the detached loss."""
        if lr is not None:
            set_lr(self.optimizer, lr)
        if self.graph is not None:
            loss = self.graph(x, targets)
        else:
            loss = self.forward_backward(x, targets)
            self.update()
        if self.ema is not None:
            self.ema.n_averaged += 1  # a host tensor (AveragedModel's default): counted outside any graph
        return loss

    def forward_backward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward, loss, (scaled) backward; returns the detached loss."""
        # None, not zeros: backward writes fresh gradients, and under capture allocates them once
        # from the graph's pool: the static gradients that each replay refills.
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast(self.device):
            logits = self.model(x)
            # Soft targets (mixup, cutmix) already carry the label smoothing. A dtype, not a value:
            # static for a captured graph, whose key includes it.
            smoothing = self.label_smoothing if targets.dtype == torch.int64 else 0.0
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        self.scaler.scale(loss).backward()
        return loss.detach()

    def update(self):
        """Optimizer step (skipped by the scaler on overflow) and the EMA update."""
        if self.scaler.is_enabled():
            # Unscaled here, so the overflow check is ours to count; scaler.step skips the same steps.
            self.scaler.unscale_(self.optimizer)
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.skipped += (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).to(torch.int64)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.average()

    def average(self):
        """AveragedModel.update_parameters' arithmetic (bitwise), without its device-side reads:
        the first update copies, later ones apply multi_avg_fn per (device, dtype) group."""
        averaged = [t.detach() for t in itertools.chain(self.ema.module.parameters(), self.ema.module.buffers())]
        model = unwrap(self.model)
        current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        if self.ema.n_averaged == 0:  # a host tensor: no sync, and not 0 by capture time (warm-up)
            for a, c in zip(averaged, current):
                a.copy_(c)
            return
        groups = {}
        for a, c in zip(averaged, current):
            pair = groups.setdefault((a.device, a.dtype), ([], []))
            pair[0].append(a)
            pair[1].append(c)
        for a, c in groups.values():
            self.ema.multi_avg_fn(a, c, self.ema.n_averaged)


def is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def graph_blocker(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                  compile_mode: str | None = None, graph_stream=None) -> str | None:
    """Why this step cannot be captured as a CUDA graph, in words, or None when it can."""
    if device.type != "cuda":
        return f"capture needs a CUDA device and this run is on {device.type}"
    if compile_mode == "reduce-overhead":
        return "--compile-mode reduce-overhead already captures the compiled model in CUDA graphs"
    why = lr_read_on_host(optimizer)
    if why:
        return why
    if is_ddp(model):
        if graph_stream is None:
            return "DDP was not built on the capture stream (train.py builds it there)"
        nccl = tuple(torch.cuda.nccl.version()[:3])
        if nccl < (2, 9, 6):
            return f"NCCL {'.'.join(map(str, nccl))} cannot capture DDP's all-reduces (2.9.6 and later can)"
    return None


class StepGraph:
    """A TrainStep captured as a CUDA graph per input shape and dtype, and replayed.

    For each new input shape: `warmup_steps` real steps run eagerly on the capture stream, then
    the step is captured reading static input buffers, which every later call copies its input
    into before the replay. One graph lives at a time: a new shape (the next resolution of a
    schedule) frees the old one; a shape that comes back (shapes alternating) ends capture: the
    TrainStep's `graph` is dropped, its `note` says why, and it runs eagerly from then on.

    bf16 / fp32: the whole step is in the graph (forward, loss, backward, optimizer step with the
    LR read from its device tensor, EMA update). fp16: forward, loss and scaled backward are in
    the graph and the scaler's unscale_/step/update run eagerly after each replay, as PyTorch's
    recipe for graphs with AMP says. Why: GradScaler.step reads the overflow flag on the host
    (for optimizers without a fused kernel), which capture forbids, and an in-graph scheme would
    mean masking every parameter update by hand; the eager tail is a few foreach launches and
    keeps the skipped-step count and the scale exactly the eager ones. Its cost is that host read,
    once per step (none with fused SGD, whose kernel takes the flag): bf16 is the fast path.
    """

    def __init__(self, step: TrainStep, stream, warmup_steps: int = WARMUP_STEPS):
        self.step, self.stream, self.warmup_steps = step, stream, warmup_steps
        self.whole_step = not step.scaler.is_enabled()
        self.key, self.seen, self.warm, self.graph, self.captures = None, set(), 0, None, 0
        self.static_x = self.static_targets = self.static_loss = None

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.stride(), x.dtype, tuple(targets.shape), targets.dtype)
        if key != self.key:
            if key in self.seen:
                self.step.graph = None  # this graph's memory goes with it
                self.step.note = (f"--cuda-graphs: the input shape went back to {list(key[0])}: shapes that "
                                  f"alternate cannot be captured once; running the step eagerly from here")
                loss = self.step.forward_backward(x, targets)
                self.step.update()
                return loss
            self.seen.add(key)
            self.key, self.warm, self.graph = key, 0, None  # the old graph's memory goes back to the allocator
        if self.warm < self.warmup_steps:
            self.warm += 1
            return self.warm_up(x, targets)
        if self.graph is None:
            self.capture(x, targets)
        self.static_x.copy_(x)
        self.static_targets.copy_(targets)
        self.graph.replay()
        if not self.whole_step:
            self.step.update()
        return self.static_loss.clone()  # the static one is overwritten by the next replay

    def warm_up(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One real step, eagerly, on the capture stream (warm-up must run on a side stream)."""
        current = torch.cuda.current_stream(self.step.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            loss = self.step.forward_backward(x, targets)
            self.step.update()
        current.wait_stream(self.stream)
        return loss

    def capture(self, x: torch.Tensor, targets: torch.Tensor):
        """Record the step on static buffers shaped like (x, targets); runs nothing."""
        self.static_x, self.static_targets = torch.empty_like(x), torch.empty_like(targets)
        self.graph = torch.cuda.CUDAGraph()
        self.step.optimizer.zero_grad(set_to_none=True)  # backward allocates the static grads in the pool
        # DEVICE_WORK: the device-decode thread finishes the batch it is on and starts no other
        # until the capture is done (nvJPEG may grow its buffers). thread_local: other threads
        # that may touch CUDA meanwhile (a DataLoader's pin-memory thread, NCCL's watchdog) are not
        # held to capture's rules; unsafe calls are forbidden on this thread only, as in inductor's
        # cudagraph trees. Nothing in the capture waits on the loader, so holding the lock cannot
        # deadlock with the decode thread (which releases it before it queues a batch).
        with DEVICE_WORK, torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
            self.static_loss = self.step.forward_backward(self.static_x, self.static_targets)
            if self.whole_step:
                self.step.update()
        self.captures += 1
        self.step.captures += 1

