"""Random erasing per sample (Zhong et al. 2017), after normalisation, with torchvision's
RandomErasing draw: a rectangle of `scale` x image area and aspect ratio log-uniform in `ratio`,
first of 10 attempts that fits; none fits -> the sample is left alone.

Boxes are drawn on the host (a few numbers per sample) and become masks on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ops import host_to

ERASE_MODES = ("const", "pixel")


@dataclass(frozen=True)
class EraseBoxes:
    """Per-sample rectangle, int64 [N] each on the host; height 0 means the sample is not erased."""
    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor


def sample_erase_boxes(g: torch.Generator, n: int, img_h: int, img_w: int, prob: float,
                       scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3),
                       attempts: int = 10) -> EraseBoxes:
    apply = torch.rand(n, generator=g, dtype=torch.float64) < prob
    u_area, u_aspect = torch.rand(2, n, attempts, generator=g, dtype=torch.float64)
    area = img_h * img_w * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_aspect)
    hs = torch.sqrt(area * aspect).round().long()
    ws = torch.sqrt(area / aspect).round().long()
    fits = (hs < img_h) & (ws < img_w) & (hs > 0) & (ws > 0)
    first = fits.long().argmax(dim=1, keepdim=True)  # first attempt that fits (0 if none, masked below)
    erased = apply & fits.any(dim=1)
    h = torch.where(erased, hs.gather(1, first).squeeze(1), 0)
    w = torch.where(erased, ws.gather(1, first).squeeze(1), 0)
    # Uniform over all placements that keep the box inside the image.
    u, v = torch.rand(2, n, generator=g, dtype=torch.float64)
    top = (u * (img_h - h + 1)).floor().long()
    left = (v * (img_w - w + 1)).floor().long()
    return EraseBoxes(top, left, h, w)


def erase(x: torch.Tensor, boxes: EraseBoxes, mode: str, noise: torch.Generator | None = None) -> torch.Tensor:
    """A new tensor with each sample's box set to 0 (`const`: the dataset mean once normalised) or
    to per-pixel N(0, 1) noise drawn from `noise`, a generator on x's device (`pixel`). One masked
    select over the batch: no per-sample indexing, and the memory format is kept."""
    if mode not in ERASE_MODES:
        raise ValueError(f"unknown erase mode {mode!r}: use one of {ERASE_MODES}")
    if not bool((boxes.height > 0).any()):
        return x
    _, _, h, w = x.shape
    box = host_to(torch.stack([boxes.top, boxes.left, boxes.height, boxes.width], dim=1), x.device)
    top, left, bh, bw = (box[:, k].view(-1, 1) for k in range(4))
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + bh)    # [N, H]
    in_cols = (cols >= left) & (cols < left + bw)  # [N, W]
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    if mode == "const":
        fill = torch.zeros((), dtype=x.dtype, device=x.device)
    else:
        fill = torch.randn(x.shape, generator=noise, dtype=x.dtype, device=x.device)
    return torch.where(mask, fill, x)
