"""The one training step and the one input stage, shared by train.py and bench/train_fps.py.

    inputs = DeviceInput(augment, channels_last=True, rank=0)
    step = TrainStep(model, optimizer, precision, device, label_smoothing=0.1, ema=ema)
    for i, (images, labels) in enumerate(loader):      # uint8 batches on the device (loaders/)
        loss = step(*inputs(images, labels, i), lr=lr_at(i))

Neither reads a value back to the host: losses and counters stay on the device until a log point.
"""
import torch
import torch.nn.functional as F

from engine.optim import set_lr
from engine.precision import Precision
from loaders.common import normalize


def sync(device: torch.device):
    """Wait for the device's queued work: the edges of a timed window."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


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
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 device: torch.device, label_smoothing: float = 0.0, ema=None, loss_scale: float = 2.0 ** 16):
        self.model, self.optimizer, self.precision, self.device = model, optimizer, precision, device
        self.label_smoothing, self.ema = label_smoothing, ema
        self.scaler = torch.amp.GradScaler(device.type, init_scale=loss_scale, enabled=precision.needs_scaler)
        self.skipped = torch.zeros((), device=device, dtype=torch.int64)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor, lr: float | None = None) -> torch.Tensor:
        """One step on (x, targets); `lr` sets the learning rate first. Returns the detached loss."""
        if lr is not None:
            set_lr(self.optimizer, lr)
        with self.precision.autocast(self.device):
            logits = self.model(x)
            # soft targets (mixup, cutmix) already carry the label smoothing
            smoothing = self.label_smoothing if targets.dtype == torch.int64 else 0.0
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            # Unscaled here, so the overflow check is ours to count; scaler.step skips the same steps.
            self.scaler.unscale_(self.optimizer)
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.skipped += (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).to(torch.int64)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.model))
        return loss.detach()
