"""One training epoch and one evaluation pass, as plain functions that return dicts.

The hot loop keeps everything on the device: losses and counters accumulate as tensors and
are read (`.item()`, a host sync) only at log points. Time waiting for the loader is measured
on the host around `next()`, so the log says whether the run is input-bound.
"""
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from engine.distributed import Runtime, all_reduce_sum, any_rank
from engine.metrics import correct_topk
from engine.optim import set_lr
from loaders import normalize


@dataclass
class Precision:
    """One precision path: autocast when enabled, a loss scaler only for float16."""
    enabled: bool
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype] if self.enabled else "fp32"

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.enabled)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


@dataclass
class EpochPlan:
    epoch: int
    first_step: int              # global step of this epoch's batch 0
    steps: int                   # batches to run this epoch (len(loader), or --max_steps)
    lr_at: Callable[[int], float]
    skip: int = 0                # batches already done before an interruption (resume mid-epoch)
    timing_warmup_steps: int = 5
    print_freq: int = 10
    log: Callable[[str], None] = print
    stop_requested: Callable[[], bool] = lambda: False
    label_smoothing: float = 0.0
    channels_last: bool = True
    progress: bool = field(default_factory=lambda: sys.stdout.isatty())


def _prepare(images, labels, step, augment, runtime, channels_last):
    if augment is not None:
        images = augment.before_normalize(images, step, runtime.rank)
    x = normalize(images)
    if not channels_last:
        x = x.contiguous()
    if augment is not None:
        return augment.after_normalize(x, labels, step, runtime.rank)
    return x, labels


def train_one_epoch(model, loader, optimizer, scaler, plan: EpochPlan, precision: Precision,
                    runtime: Runtime, augment=None, ema=None) -> dict:
    device = runtime.device
    model.train()
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), device=device, dtype=torch.int64)
    skipped = torch.zeros((), device=device, dtype=torch.int64)
    window_nonfinite_start = 0
    timed_wait_s, timed_start_s, timed_images = 0.0, None, 0
    window_start_s, window_steps, window_images, window_wait_s = time.perf_counter(), 0, 0, 0.0
    steps_done = 0
    interrupted = False
    bar = None
    if plan.progress and runtime.is_main:
        from tqdm import tqdm
        bar = tqdm(total=plan.steps, desc=f"epoch {plan.epoch}", leave=False, dynamic_ncols=True)

    iterator = iter(loader)
    for i in range(plan.steps):
        t0 = time.perf_counter()
        try:
            images, labels = next(iterator)
        except StopIteration:
            break
        wait_s = time.perf_counter() - t0
        if i < plan.skip:  # resuming mid-epoch: the same order, so skip what was already trained on
            window_start_s = time.perf_counter()
            continue
        if i == plan.skip + plan.timing_warmup_steps:
            sync(device)  # the timed window opens on an idle device
            timed_start_s, timed_wait_s, timed_images = time.perf_counter(), 0.0, 0
        elif timed_start_s is not None:
            timed_wait_s += wait_s
        window_wait_s += wait_s
        step = plan.first_step + i
        set_lr(optimizer, plan.lr_at(step))
        x, targets = _prepare(images, labels, step, augment, runtime, plan.channels_last)
        with precision.autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), targets,
                                   label_smoothing=plan.label_smoothing if targets.dtype == torch.int64 else 0.0)
        scaled = scaler.scale(loss)
        if scaler.is_enabled():
            scale_before = scaler._scale.clone()  # a decrease after update() means the step was skipped
        scaled.backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            skipped += (scaler._scale < scale_before).to(torch.int64)
        if ema is not None:
            ema.update_parameters(model.module if hasattr(model, "module") else model)
        finite = torch.isfinite(loss.detach())
        loss_sum += torch.where(finite, loss.detach(), torch.zeros_like(loss.detach()))
        nonfinite += (~finite).to(torch.int64)
        n = len(labels) * runtime.world_size  # global images this step (train batches are full)
        steps_done += 1
        window_steps += 1
        window_images += n
        if timed_start_s is not None:
            timed_images += n
        if bar is not None:
            bar.update(1)

        last = i == plan.steps - 1
        if (i + 1) % plan.print_freq == 0 or last:
            window_s = time.perf_counter() - window_start_s
            nonfinite_now = int(nonfinite.item())  # host sync: log points only
            if nonfinite_now - window_nonfinite_start >= plan.print_freq:  # the whole window
                raise NonFiniteLoss(plan.epoch, i, nonfinite_now)
            window_nonfinite_start = nonfinite_now
            lr = optimizer.param_groups[0]["lr"]
            eta_s = (plan.steps - i - 1) * window_s / window_steps
            msg = (f"epoch {plan.epoch} step {i + 1}/{plan.steps}  loss {loss.item():.4f}  lr {lr:.5f}  "
                   f"img/s {window_images / window_s:.1f}  data-wait {100 * window_wait_s / window_s:.0f}%  "
                   f"ETA {eta_s:.0f}s")
            if scaler.is_enabled():
                msg += f"  skipped-steps {int(skipped.item())}"
            if bar is not None:
                bar.set_postfix_str(msg.split("  ", 1)[1])
            else:
                plan.log(msg)
            window_start_s, window_steps, window_images, window_wait_s = time.perf_counter(), 0, 0, 0.0
            if runtime.distributed and any_rank(plan.stop_requested(), device):
                interrupted = True
                break
        if not runtime.distributed and plan.stop_requested():
            interrupted = True
            break
    if bar is not None:
        bar.close()
    sync(device)
    end_s = time.perf_counter()
    timed_s = (end_s - timed_start_s) if timed_start_s is not None else float("nan")
    return {
        "epoch": plan.epoch,
        "steps": steps_done,
        "next_batch": plan.skip + steps_done,
        "interrupted": interrupted,
        "train_loss": (loss_sum / max(1, steps_done - int(nonfinite.item()))).item(),
        "nonfinite_steps": int(nonfinite.item()),
        "skipped_steps": int(skipped.item()),
        "imgs_per_s": timed_images / timed_s if timed_start_s is not None else float("nan"),
        "timed_images": timed_images,
        "timed_wall_s": timed_s,
        "data_wait_frac": timed_wait_s / timed_s if timed_start_s is not None and timed_s > 0 else float("nan"),
        "first_batch_s": getattr(loader, "first_batch_s", None),
    }


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch, step, count):
        super().__init__(f"the loss was not finite for a whole log window (epoch {epoch}, step {step + 1}; "
                         f"{count} non-finite steps this epoch): stopping. The last good checkpoint is "
                         f"untouched; lower --learning-rate or use --apex-opt-level O0 / --amp-dtype bfloat16.")


@torch.no_grad()
def evaluate(model, loader, precision: Precision, runtime: Runtime, channels_last: bool = True) -> dict:
    """Acc@1 / Acc@5 over every val image once across ranks (counts are summed over ranks)."""
    device = runtime.device
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # top1, top5, images, loss sum
    for images, labels in loader:
        x = normalize(images)
        if not channels_last:
            x = x.contiguous()
        with precision.autocast(device):
            logits = model(x).float()
        totals[:2] += correct_topk(logits, labels).to(torch.float64)
        totals[2] += labels.numel()
        totals[3] += F.cross_entropy(logits, labels, reduction="sum").to(torch.float64)
    all_reduce_sum(totals)
    top1, top5, n, loss_sum = totals.tolist()
    n = max(n, 1)
    return {"acc1": 100.0 * top1 / n, "acc5": 100.0 * top5 / n, "val_loss": loss_sum / n, "val_images": int(n)}

