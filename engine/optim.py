"""Optimiser, weight-decay grouping and the LR schedule (a pure function of the step)."""
import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv and linear weights only: tensors of rank <= 1 (norm scales, biases) get none."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    groups = param_groups(model, args.wd)
    if args.opt == "rmsprop":
        # The reference's (TF-style) settings: alpha 0.9, eps 0.0316, momentum 0.9.
        return torch.optim.RMSprop(groups, lr=args.learning_rate, alpha=args.rmsprop_alpha,
                                   eps=args.rmsprop_eps, momentum=args.momentum)
    return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum, nesterov=True)


def lr_at(step: int, *, base_lr: float, steps_per_epoch: int, epochs: int, schedule: str = "step",
          warmup_epochs: float = 0.0, step_size: int = 2, gamma: float = 0.973,
          warmup_start: float = 0.01) -> float:
    """LR at global `step`: linear warm-up from warmup_start*base_lr, then step decay
    (x gamma every step_size epochs after warm-up) or cosine to zero at `epochs`."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return base_lr * (warmup_start + (1.0 - warmup_start) * epoch / warmup_epochs)
    after = epoch - warmup_epochs
    if schedule == "step":
        return base_lr * gamma ** (int(after) // step_size)
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-8)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(after / span, 1.0)))
    raise ValueError(f"unknown LR schedule {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr
