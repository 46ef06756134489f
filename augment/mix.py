"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) with soft targets and label smoothing,
timm's 'batch' mode: one lambda per batch, each sample paired with its mirror x.flip(0).

Parameters are drawn on the host with numpy (torch has no generator-driven Beta sampler), from
the same derived seed, so they are as reproducible as everything else.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixParams:
    """`lam` is the share of each sample's own image; `box` (top, bottom, left, right), half-open,
    is where CutMix pastes the partner; None means blend (mixup) or, with lam == 1, no mixing."""
    lam: float
    box: tuple[int, int, int, int] | None = None


def sample_mix(rng: np.random.Generator, img_h: int, img_w: int, mixup_alpha: float, cutmix_alpha: float,
               switch_prob: float = 0.5, mix_prob: float = 1.0) -> MixParams:
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or rng.random() >= mix_prob:
        return MixParams(1.0)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return MixParams(lam)
    # A box of (1 - lam) of the area centred anywhere in the image, clipped to it; lambda is then
    # recomputed from the clipped box so the targets match the pixels actually pasted.
    half_h = int(0.5 * img_h * np.sqrt(1.0 - lam))
    half_w = int(0.5 * img_w * np.sqrt(1.0 - lam))
    cy, cx = int(rng.integers(img_h)), int(rng.integers(img_w))
    top, bottom = max(cy - half_h, 0), min(cy + half_h, img_h)
    left, right = max(cx - half_w, 0), min(cx + half_w, img_w)
    lam = 1.0 - (bottom - top) * (right - left) / (img_h * img_w)
    return MixParams(lam, (top, bottom, left, right))


def mix_images(x: torch.Tensor, p: MixParams) -> torch.Tensor:
    if p.lam == 1.0:
        return x
    partner = x.flip(0)
    if p.box is None:
        return x * p.lam + partner * (1.0 - p.lam)
    top, bottom, left, right = p.box
    out = x.clone()
    out[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    return out


def soft_targets(labels: torch.Tensor, num_classes: int, lam: float = 1.0, smoothing: float = 0.0) -> torch.Tensor:
    """float32 N x num_classes rows summing to 1: lam of the sample's own smoothed one-hot and
    1 - lam of its partner's (labels.flip(0))."""
    # scatter_ rather than F.one_hot, whose label range check may read back from the device.
    off = smoothing / num_classes
    one_hot = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    one_hot.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)
    if lam == 1.0:
        return one_hot
    return one_hot * lam + one_hot.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits)). Same value as
    F.cross_entropy(logits, targets), which also accepts class probabilities; spelled out here so
    the loss does not depend on that overload."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
