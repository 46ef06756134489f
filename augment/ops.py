"""Batched per-sample image ops on uint8 N x C x H x W tensors (contiguous or channels_last):
every sample carries its own parameter (a length-N tensor), one kernel launch serves the group.

Each op reproduces `torchvision.transforms.v2.functional` on uint8 images, including where it
rounds, truncates and clamps, so a sample comes out as torchvision would make it.

Brightness, contrast, solarize, autocontrast and equalize map each channel value through a
256-entry table per sample and channel: torchvision's own float32 formula evaluated on the values
0..255, hence the same result value by value. Tables of different ops and samples are then
applied in one gather (autoaugment.py), one pass and one launch for the whole group.

Exactness (tests/test_augment.py checks every op against torchvision):
- exact by construction: warp_affine (nearest sampling from the same float32 grid), brightness
  (the same single float32 multiply), posterize, invert, solarize, autocontrast, equalize
  (integer arithmetic, or the same float32 operations on the same operands).
- guaranteed within 1 grey level: color (saturation), contrast, sharpness. They blend in float32
  and truncate to uint8; torchvision blends with a scalar through `add_(other, alpha=)`, which a
  backend may fuse into one multiply-add (one rounding), while a per-sample factor goes through
  addcmul, which may round twice. When a blend lands within a float32 ulp of an integer the two
  can truncate one level apart. (On this CPU build they have agreed exactly in every test.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to `device` without blocking the host.

    A copy from pageable memory waits for the device queue to drain (a sync per step); from
    pinned memory with non_blocking=True it is queued like a kernel.
    """
    if device.type == "cpu" or t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _per_sample(v: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return host_to(v.to(dtype), device).view(-1, 1, 1)


def _values(device: torch.device) -> torch.Tensor:
    """The 256 possible channel values, float32, shaped to broadcast against [N, C, 256] tables."""
    return torch.arange(256, dtype=torch.float32, device=device).view(1, 1, 256)


# ---- tables: uint8 [N, 1 or C, 256], entry v = what the op makes of channel value v ---------------

def brightness_table(factor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return (_values(device) * _per_sample(factor, device)).clamp_(0, 255).to(torch.uint8)


def contrast_table(factor: torch.Tensor, gray_mean: torch.Tensor) -> torch.Tensor:
    """Blend each value with the sample's mean grey level (`gray_mean`, float32 [N] on the device).
    `factor` is float64 so 1 - factor is formed before rounding to float32, as torchvision does."""
    device = gray_mean.device
    ratio, alpha = _per_sample(factor, device), _per_sample(1.0 - factor, device)
    blended = torch.addcmul(_values(device) * ratio, gray_mean.view(-1, 1, 1), alpha)
    return blended.clamp_(0, 255).to(torch.uint8)


def solarize_table(threshold: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Invert values >= threshold. torchvision compares the uint8 image with a Python float, which
    promotes both to float32, so the threshold is rounded to float32 here too (255 * 2/30 is
    17.0000004 in float64 but 17.0 in float32, and 17 gets inverted)."""
    v = _values(device)
    return torch.where(v >= _per_sample(threshold, device), 255 - v, v).to(torch.uint8)


def autocontrast_table(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's [min, max] to [0, 255]; flat channels are left as they are."""
    lo = x.amin(dim=(2, 3)).float().unsqueeze(-1)
    hi = x.amax(dim=(2, 3)).float().unsqueeze(-1)
    flat = hi == lo
    inv_scale = (hi - lo).mul_(1.0 / 255.0).masked_fill_(flat, 1.0)
    lo = lo.masked_fill_(flat, 0.0)
    return (_values(x.device) - lo).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def equalize_table(hist: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation, in integer arithmetic:
    table[v] = (#pixels below v + step // 2) // step, step = (#pixels not at the top value) // 255.
    Channels with step 0 (nearly flat) keep their values, as in PIL."""
    top = 255 - (hist > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    step = (hist.sum(dim=-1, keepdim=True) - hist.gather(-1, top)) // 255
    below = hist.cumsum(dim=-1) - hist
    table = ((below + step // 2) // step.clamp(min=1)).clamp_(max=255)
    identity = torch.arange(256, device=hist.device)
    return torch.where(step > 0, table, identity).to(torch.uint8)


# ---- applying tables ------------------------------------------------------------------------------
# Tables are looked up in the batch's own memory layout, so a channels_last batch is never
# transposed: values are viewed as [N, C, H*W] (contiguous) or [N, H*W, C] (channels_last) and
# the table is indexed along the value axis, 2 or 1.

def _value_axis(x: torch.Tensor) -> int:
    if x.is_contiguous():
        return 2
    if x.is_contiguous(memory_format=torch.channels_last):
        return 1
    raise ValueError("images must be contiguous or channels_last")


def table_index(x: torch.Tensor) -> torch.Tensor:
    """int64 values of x, [N, C, H*W] or [N, H*W, C] (see _value_axis): the index histograms and
    lookups share (computed once when a group needs both)."""
    n, c, h, w = x.shape
    if _value_axis(x) == 2:
        return x.view(n, c, h * w).long()
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c).long()


def channel_histograms(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 [N, C, 256] value counts per sample and channel; `index` is table_index(x)."""
    n, c = x.shape[:2]
    axis = _value_axis(x)
    hist = torch.zeros((n, c, 256) if axis == 2 else (n, 256, c), dtype=torch.int64, device=x.device)
    hist.scatter_add_(axis, index, torch.ones((), dtype=torch.int64, device=x.device).expand_as(index))
    return hist if axis == 2 else hist.transpose(1, 2)


def apply_table(x: torch.Tensor, table: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Map every value of sample i, channel c through table[i, c] (or table[i, 0] for all
    channels). The result has x's memory layout."""
    n, c, h, w = x.shape
    axis = _value_axis(x)
    index = table_index(x) if index is None else index
    table = table.expand(n, c, 256)
    if axis == 2:
        return table.gather(2, index).view(n, c, h, w)
    return table.transpose(1, 2).gather(1, index).view(n, h, w, c).permute(0, 3, 1, 2)


def gray_mean(x: torch.Tensor) -> torch.Tensor:
    """float32 [N] mean of the floored luma. A float32 sum of integers is exact in any order below
    2**24 / 255 pixels (~256 x 256), so the batch agrees with torchvision's per-image reduction."""
    return _grayscale(x).mean(dim=(1, 2, 3))


# ---- per-value ops, one call each (what autoaugment.apply_plan fuses) -------------------------------

def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return apply_table(x, brightness_table(factor, x.device))


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return apply_table(x, contrast_table(factor, gray_mean(x)))


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return apply_table(x, solarize_table(threshold, x.device))


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    return apply_table(x, autocontrast_table(x))


def equalize(x: torch.Tensor) -> torch.Tensor:
    index = table_index(x)
    return apply_table(x, equalize_table(channel_histograms(x, index)), index)


# ---- bitwise per-value ops --------------------------------------------------------------------

def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of every value."""
    bits = bits.long().clamp(0, 8)
    mask = ((1 << bits) - 1) << (8 - bits)
    return x & _per_sample(mask, x.device, torch.uint8).unsqueeze(1)


def invert(x: torch.Tensor) -> torch.Tensor:
    return x.bitwise_not()


# ---- ops that mix pixels ------------------------------------------------------------------------

def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, floored, float32 N x 1 x H x W (torchvision's order of operations)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the sample's own grayscale ("Color" in AutoAugment)."""
    ratio = _per_sample(factor, x.device).unsqueeze(1)
    alpha = _per_sample(1.0 - factor, x.device).unsqueeze(1)
    blended = torch.addcmul(x.float().mul_(ratio), _grayscale(x), alpha)
    return blended.clamp_(0, 255).to(torch.uint8)


def adjust_sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend the interior with PIL's SMOOTH blur (3x3, weights 1 and a centre 5, over 13); the
    1-pixel border keeps its values, as in torchvision.

    torchvision convolves with float32 weights k/13 and rounds. The exact blur is an integer over
    13, whose fraction is never within 1/26 of .5, so rounding (neighbourhood sum + 4 * centre) / 13
    computed in exact integer-valued float32 gives the same integers, with two separable passes of
    adds instead of a depthwise convolution.
    """
    n, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    out = x.float()
    rows = out[..., :, :-2] + out[..., :, 1:-1] + out[..., :, 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    inner = out[..., 1:-1, 1:-1]
    blurred = box.add_(inner, alpha=4.0).div_(13.0).round_()
    inner.addcmul_(blurred.sub_(inner), _per_sample(1.0 - factor, x.device).unsqueeze(1))
    return out.clamp_(0, 255).to(torch.uint8)


def warp_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-sample affine warp, nearest neighbour, 0 outside the image (AutoAugment's defaults).

    `theta`, a float32 [N, 2, 3] host tensor (geometry.affine_matrices), maps output pixels to input
    pixels, both measured in pixels from the image centre. The grid is built in pixel units with
    the same float32 bmm torchvision uses, then read by grid_sample; F.affine_grid rounds
    differently, and under nearest sampling a different rounding picks a different pixel at ties
    (hundreds of pixels per batch for ShearX). The grid must stay float32: under autocast the bmm
    would run in bf16/fp16 and land half a pixel off (autocast is switched off here); with TF32
    matmuls enabled globally it is off by ~0.05 px at 224 px, so a few pixels near ties take a
    neighbour's value.
    """
    n, _, h, w = x.shape
    # Scaled on the host, where theta is made: building it from Python numbers on an accelerator
    # would be a blocking copy.
    scaled = (theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h])).contiguous()
    scaled = host_to(scaled, x.device)
    xs = torch.arange(w, dtype=torch.float32, device=x.device) - (w - 1) * 0.5
    ys = torch.arange(h, dtype=torch.float32, device=x.device) - (h - 1) * 0.5
    base = torch.stack([xs.expand(h, w), ys.unsqueeze(1).expand(h, w), torch.ones(h, w, device=x.device)], dim=-1)
    with torch.autocast(x.device.type, enabled=False):
        grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(scaled).view(n, h, w, 2)
        out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8)
