"""One training epoch and one evaluation pass, as plain functions that return dicts.

The hot loop keeps everything on the device: losses and counters accumulate as tensors and
are read (`.item()`, a host sync) only at log points. Time waiting for the loader is measured
on the host around `next()` (engine/meter.py), so the log says whether the run is input-bound.
"""
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.errors import TrainingDiverged
from engine.distributed import Runtime, all_reduce_sum
from engine.faults import StepBoundaryLoader
from engine.meter import StepMeter
from engine.metrics import correct_topk
from engine.optim import current_lr
from engine.precision import Precision
from engine.step import DeviceInput, TrainStep, sync
from engine.stop import StepWatchdog


@dataclass
class EpochPlan:
    epoch: int
    first_step: int              # global step of this epoch's batch 0
    steps: int                   # batches to run this epoch (len(loader), or --max_steps)
    lr_at: Callable[[int], float]
    skip: int = 0                # global steps already done before an interruption: the loader starts after them
    timing_warmup_steps: int = 5
    print_freq: int = 10
    log: Callable[[str], None] = print
    # after each step (True: every rank at once, a blocking agreement); the same answer on every rank
    stop_requested: Callable[[bool], bool] = lambda blocking=False: False
    watchdog: StepWatchdog = field(default_factory=lambda: StepWatchdog(None))
    after_step: Callable[[int], object] = lambda next_batch: None  # e.g. a mid-epoch checkpoint; truthy if written
    on_window: Callable[[int, dict], None] | None = None  # (global step, the log window's scalars): TensorBoard
    progress: bool = field(default_factory=lambda: sys.stdout.isatty())


def train_one_epoch(step: TrainStep, inputs: DeviceInput, loader, plan: EpochPlan, runtime: Runtime) -> dict:
    device = runtime.device
    step.model.train()
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), device=device, dtype=torch.int64)
    window_nonfinite_start, steps_done, interrupted = 0, 0, False
    skipped_before = step.skipped.clone()  # the scaler's count runs over the whole run; this epoch's part
    meter = StepMeter(plan.skip + plan.timing_warmup_steps, lambda: sync(device))
    bar = None
    if plan.progress and runtime.is_main:
        from tqdm import tqdm
        bar = tqdm(total=plan.steps, desc=f"epoch {plan.epoch}", leave=False, dynamic_ncols=True)

    batches = StepBoundaryLoader(loader, plan.epoch)  # set_epoch started it at plan.skip
    record = BatchRecord(os.environ[RECORD_ENV], runtime) if os.environ.get(RECORD_ENV) else None
    for i in range(plan.skip, plan.steps):
        t0 = time.perf_counter()
        batch = batches.next_batch(i)  # a failing loader raises LoaderFailed here, between steps
        if batch is None:
            break
        images, labels = batch
        if record is not None:
            record(plan.epoch, i, images)
        meter.begin_step(i, time.perf_counter() - t0)
        global_step = plan.first_step + i
        loss = step(*inputs(images, labels, global_step), lr=plan.lr_at(global_step))
        finite = torch.isfinite(loss)
        loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        nonfinite += (~finite).to(torch.int64)
        meter.end_step(len(labels) * runtime.world_size)  # global images this step (train batches are full)
        steps_done += 1
        if bar is not None:
            bar.update(1)

        if (i + 1) % plan.print_freq == 0 or i == plan.steps - 1:
            nonfinite_now = int(nonfinite.item())  # host sync: log points only
            if nonfinite_now - window_nonfinite_start >= plan.print_freq:  # the whole window
                raise TrainingDiverged(non_finite_message(plan.epoch, i, nonfinite_now))
            window_nonfinite_start = nonfinite_now
            log_window(plan, i, loss, step, meter.take_window(), bar, skipped_before)
        plan.watchdog.fed(plan.epoch, i + 1)
        if plan.stop_requested(i == plan.skip):  # the first step: at once, a signal during the loader's start
            interrupted = True
            break
        if plan.after_step(i + 1):  # a checkpoint written: the next step's deadline starts now
            plan.watchdog.fed(plan.epoch, i + 1)
    batches.close(plan.skip + steps_done)
    if bar is not None:
        bar.close()
    timed = meter.close()
    return {
        "epoch": plan.epoch,
        "steps": steps_done,
        "next_batch": plan.skip + steps_done,
        "interrupted": interrupted,
        "train_loss": (loss_sum / max(1, steps_done - int(nonfinite.item()))).item(),
        "nonfinite_steps": int(nonfinite.item()),
        "skipped_steps": int((step.skipped - skipped_before).item()),
        **timed,
        "first_batch_s": getattr(loader, "first_batch_s", None),
    }


RECORD_ENV = "TRAIN_RECORD_BATCHES"


class BatchRecord:
    """Debugging what a run trained on: with TRAIN_RECORD_BATCHES=DIR, each rank appends one JSON
    line per step to DIR/rank<R>.jsonl: epoch, step, a digest of each image's pixels and one of the
    rank's CPU generator state (a host sync per step: not for timing). A resumed run on any world
    size appends to the same files, so each epoch's images (and each rank's generator) can be
    compared with an unbroken run's."""

    def __init__(self, folder: str, runtime: Runtime):
        self.path = os.path.join(folder, f"rank{runtime.rank}.jsonl")
        self.world_size = runtime.world_size
        os.makedirs(folder, exist_ok=True)

    def __call__(self, epoch: int, step: int, images: torch.Tensor):
        digests = [digest(image.cpu().contiguous().numpy().tobytes()) for image in images]
        rng = digest(torch.get_rng_state().numpy().tobytes())  # this rank's generator as the step starts
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "world_size": self.world_size, "images": digests,
                                "rng": rng}) + "\n")


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def log_window(plan: EpochPlan, i: int, loss: torch.Tensor, step: TrainStep, window: dict, bar,
               skipped_before: torch.Tensor):
    lr, loss = current_lr(step.optimizer), loss.item()
    if plan.on_window is not None:
        plan.on_window(plan.first_step + i, {"loss": loss, "lr": lr, "imgs_per_s": window["imgs_per_s"],
                                             "data_wait_frac": window["data_wait_frac"]})
    eta_s = (plan.steps - i - 1) * window["wall_s"] / window["steps"]
    msg = (f"epoch {plan.epoch} step {i + 1}/{plan.steps}  loss {loss:.4f}  lr {lr:.5f}  "
           f"img/s {window['imgs_per_s']:.1f}  data-wait {100 * window['data_wait_frac']:.0f}%  ETA {eta_s:.0f}s")
    if step.scaler.is_enabled():
        msg += f"  skipped-steps {int((step.skipped - skipped_before).item())}"
    if bar is not None:
        bar.set_postfix_str(msg.split("  ", 1)[1])
    else:
        plan.log(msg)


def non_finite_message(epoch: int, step: int, count: int) -> str:
    return (f"the loss was not finite for a whole log window (epoch {epoch}, step {step + 1}; "
            f"{count} non-finite steps this epoch): stopping. The last good checkpoint is "
            f"untouched; lower --learning-rate or use --apex-opt-level O0 / --amp-dtype bfloat16.")


@torch.no_grad()
def evaluate(model, loader, inputs: DeviceInput, precision: Precision, runtime: Runtime,
             num_classes: int = 0, flip: bool = False, leave: Callable[[], bool] = lambda: False,
             watchdog: StepWatchdog | None = None, name: str = "evaluation") -> dict:
    """Acc@1 / Acc@5 over every val image once across ranks (counts are summed over ranks).

    num_classes > 0 also counts the confusion matrix, returned under "confusion" as a list of rows
    (row: true class, column: top-1 prediction). flip: the logits are the mean of the image's and
    its mirror image's. leave: asked before each batch (engine/stop.StopRequest.poll); a rank that
    leaves says so in the closing all-reduce, the one collective every rank enters whatever its
    batch count, and then every rank returns {"interrupted": True}."""
    device = runtime.device
    watchdog = watchdog or StepWatchdog(None)
    watchdog.phase(name, long=True)  # the first batch starts the val loader
    model.eval()
    totals = torch.zeros(5, device=device, dtype=torch.float64)  # top1, top5, images, loss sum, ranks that left
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for images, labels in _until(loader, leave, totals):
        x = inputs.eval(images)
        with precision.autocast(device):
            logits = model(x).float()
            if flip:
                logits = (logits + model(x.flip(3)).float()) / 2
        totals[:2] += correct_topk(logits, labels).to(torch.float64)
        totals[2] += labels.numel()
        totals[3] += F.cross_entropy(logits, labels, reduction="sum").to(torch.float64)
        if num_classes:
            confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes ** 2)
        watchdog.progress()
    watchdog.phase(f"{name}'s closing all-reduce (waiting for every rank)")
    all_reduce_sum(totals)
    top1, top5, n, loss_sum, left = totals.tolist()
    if left:
        return {"interrupted": True}
    n = max(n, 1)
    result = {"acc1": 100.0 * top1 / n, "acc5": 100.0 * top5 / n, "val_loss": loss_sum / n, "val_images": int(n)}
    if num_classes:
        result["confusion"] = all_reduce_sum(confusion).view(num_classes, num_classes).tolist()
    return result


def same_buffers(*modules: torch.nn.Module):
    """Rank 0's buffers (BatchNorm running statistics, the EMA's count) on every rank. DDP sends
    rank 0's at the start of each forward, so after an epoch's last step each rank holds its own;
    evaluated then, rank r's share of the val images would see statistics that no checkpoint holds,
    and a resumed run (every rank loads rank 0's) would report other numbers."""
    if dist.is_initialized():
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def _until(loader, leave: Callable[[], bool], totals: torch.Tensor):
    """The loader's batches until `leave()` says to stop asking for more (marked in totals[4])."""
    batches = iter(loader)
    while True:
        if leave():
            totals[4] = 1
            return
        batch = next(batches, None)
        if batch is None:
            return
        yield batch
