"""Optimiser and LR schedule settings as typed values, the optimiser, weight-decay grouping and the
LR schedule (a pure function of the step). The dataclasses' defaults are the reference recipe's,
and the trainer's flags take their defaults from them.

The optimiser's kernels are fused, foreach (one launch per op over all tensors) or a for-loop;
the LR is a float, or in tensor-LR mode (hold_lr_on_device) a device tensor that set_lr fills in
place, so that a captured step (engine/step.py) reads each step's LR without a host sync."""
import math
from dataclasses import dataclass

import torch

from core.errors import ConfigError

OPTIMIZERS = ("rmsprop", "sgd")
SCHEDULES = ("step", "cosine")
IMPLS = ("auto", "fused", "foreach", "for-loop")
# torch 2.14's fused optimizer kernels: torch._fused_sgd_ on these devices; RMSprop has none.
FUSED_DEVICES = {"sgd": ("cpu", "cuda", "xpu", "mps"), "rmsprop": ()}
# Where torch's RMSprop has a capturable mode (its step counters on the device, LR read as a tensor).
CAPTURABLE_DEVICES = ("cuda", "xpu")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "rmsprop"
    lr: float = 0.008            # for the global batch: the reference's 1-device 128 (1024 on 8: 0.064)
    momentum: float = 0.9
    weight_decay: float = 1e-5   # conv and linear weights only (param_groups)
    rmsprop_alpha: float = 0.9   # the reference's TF-style RMSprop
    rmsprop_eps: float = 0.0316
    impl: str = "auto"           # kernels: fused, foreach or for-loop; auto: fused where torch has it, else foreach

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"--opt {self.name}: choose one of {', '.join(OPTIMIZERS)}")
        if self.impl not in IMPLS:
            raise ConfigError(f"--optimizer-impl {self.impl}: choose one of {', '.join(IMPLS)}")


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "step"
    epochs: int = 600
    warmup_epochs: float = 0.0
    warmup_lr: float | None = None  # LR the warm-up starts from; None: 0.01 x the peak LR
    step_size: float = 2         # step: decay every step_size epochs (timm's recipe: 2.4)
    gamma: float = 0.973         # step: by this factor

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ConfigError(f"--lr-scheduler {self.name}: choose one of {', '.join(SCHEDULES)}")
        if not self.step_size > 0:
            raise ConfigError(f"--lr-step-size {self.step_size}: must be > 0 (epochs between decays)")
        if self.warmup_lr is not None and self.warmup_lr < 0:
            raise ConfigError(f"--warmup-lr {self.warmup_lr}: must be >= 0")

    def lr_at(self, step: int, base_lr: float, steps_per_epoch: int) -> float:
        return lr_at(step, base_lr=base_lr, steps_per_epoch=steps_per_epoch, epochs=self.epochs,
                     schedule=self.name, warmup_epochs=self.warmup_epochs, warmup_lr=self.warmup_lr,
                     step_size=self.step_size, gamma=self.gamma)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv and linear weights only: tensors of rank <= 1 (norm scales, biases) get none."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def resolve_impl(name: str, impl: str, device_type: str) -> str:
    """'fused', 'foreach' or 'for-loop' for optimiser `name` on `device_type`; auto: fused where
    torch has that kernel (SGD on CPU/CUDA), else foreach."""
    fused_here = device_type in FUSED_DEVICES[name]
    if impl == "auto":
        return "fused" if fused_here else "foreach"
    if impl == "fused" and not fused_here:
        where = f" on {device_type} (only on {', '.join(FUSED_DEVICES[name])})" if FUSED_DEVICES[name] else ""
        raise ConfigError(f"--optimizer-impl fused: torch has no fused {name}{where}: use foreach or auto")
    return impl


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimiser over the model's parameters, with the kernels of cfg.impl for the device they are on."""
    groups = param_groups(model, cfg.weight_decay)
    impl = resolve_impl(cfg.name, cfg.impl, next(model.parameters()).device.type)
    kernels = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.rmsprop_alpha, eps=cfg.rmsprop_eps,
                                   momentum=cfg.momentum, **kernels)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, **kernels)


def lr_at(step: int, *, base_lr: float, steps_per_epoch: int, epochs: int, schedule: str = "step",
          warmup_epochs: float = 0.0, step_size: float = 2, gamma: float = 0.973,
          warmup_start: float = 0.01, warmup_lr: float | None = None) -> float:
    """LR at global `step`: linear warm-up from warmup_lr (absolute; None: warmup_start*base_lr),
    then step decay (x gamma every step_size epochs after warm-up) or cosine to zero at `epochs`."""
    epoch = step / steps_per_epoch
    start = base_lr * warmup_start if warmup_lr is None else warmup_lr
    if epoch < warmup_epochs:
        return start + (base_lr - start) * epoch / warmup_epochs
    after = epoch - warmup_epochs
    if schedule == "step":
        # Counted in whole epochs, as timm's per-epoch step: with step_size 2.4 the LR decays at
        # the starts of epochs 3, 5, 8, 10, 12, ... after warm-up (floor(epoch / 2.4) decays).
        return base_lr * gamma ** int(int(after) // step_size)
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-8)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(after / span, 1.0)))
    raise ConfigError(f"unknown LR schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    """A float LR is replaced; a tensor LR (tensor-LR mode) is filled in place: a kernel launch, no
    host sync, and a captured step reads the new value at its next replay."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first group's LR as a float (a host sync in tensor-LR mode: log points only)."""
    return float(optimizer.param_groups[0]["lr"])


def hold_lr_on_device(optimizer: torch.optim.Optimizer, device: torch.device):
    """Tensor-LR mode, for a captured step: each param group's LR becomes a float32 tensor on
    `device` (fused SGD's CUDA kernel reads it through a float pointer), and where torch has a
    capturable mode (RMSprop on CUDA) it is switched on, its step counters moved to the device."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        if "capturable" in group and device.type in CAPTURABLE_DEVICES:
            group["capturable"] = True
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(device)


def lr_read_on_host(optimizer: torch.optim.Optimizer) -> str | None:
    """Why this optimiser's step reads a tensor LR back to the host (so it cannot be captured), or
    None. torch 2.14: SGD takes a device LR only in its fused kernel; RMSprop only in foreach."""
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.SGD) and not group.get("fused"):
            return "SGD reads its LR on the host unless fused: use --optimizer-impl fused or auto"
        if isinstance(optimizer, torch.optim.RMSprop) and group.get("foreach") is False:
            return "RMSprop's for-loop reads its LR on the host: use --optimizer-impl foreach or auto"
    return None


def portable_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with float LRs and capturable off, as an eager run saves it: a
    checkpoint of a captured run resumes anywhere (eager, or on the CPU)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:  # copies: the optimiser's own groups are untouched
        group["lr"] = float(group["lr"])
        if group.get("capturable"):
            group["capturable"] = False
    return state
