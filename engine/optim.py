"""Optimiser and LR schedule settings as typed values, the optimiser, weight-decay grouping and the
LR schedule (a pure function of the step). The dataclasses' defaults are the reference recipe's,
and the trainer's flags take their defaults from them."""
import math
from dataclasses import dataclass

import torch

from core.errors import ConfigError

OPTIMIZERS = ("rmsprop", "sgd")
SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "rmsprop"
    lr: float = 0.008            # for the global batch: the reference's 1-device 128 (1024 on 8: 0.064)
    momentum: float = 0.9
    weight_decay: float = 1e-5   # conv and linear weights only (param_groups)
    rmsprop_alpha: float = 0.9   # the reference's TF-style RMSprop
    rmsprop_eps: float = 0.0316

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"--opt {self.name}: choose one of {', '.join(OPTIMIZERS)}")


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


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.rmsprop_alpha, eps=cfg.rmsprop_eps,
                                   momentum=cfg.momentum)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


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
    for group in optimizer.param_groups:
        group["lr"] = lr
