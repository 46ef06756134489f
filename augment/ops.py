"""Batched per-sample image ops on uint8 N x C x H x W tensors (contiguous or channels_last):
every sample carries its own parameter (a length-N tensor), one kernel launch serves the group.

Each op reproduces `torchvision.transforms.v2.functional` on uint8 images, including where it
rounds, truncates and clamps, so a sample comes out as torchvision would make it.

Brightness, contrast, autocontrast and equalize map each channel value through a 256-entry
table per sample and channel: torchvision's own float32 formula evaluated on the values 0..255,
hence the same result value by value. Tables of different ops and samples are then applied in one
int32 index_select (autoaugment.py), one pass and one launch for the whole group. Solarize,
posterize and invert stay in uint8 (a comparison, a mask, a complement), cheaper than any lookup.

What costs time on the CPU, measured (bench/augment_cost.py prints the op-by-op table): bytes
moved, so uint8 beats int32/float32 and in-place beats fresh temporaries; an element-wise op whose
inner loop is short (a per-channel value broadcast over a channels_last batch walks 3 values at a
time) or that compares against a broadcast value runs element by element, several times slower
than the same op over whole tensors; and a fresh temporary above ~32 MB (one float32 or int32
copy of 64 images of 224 px) gets new pages from the OS on every call (glibc's mmap threshold),
which costs more than the pass that fills it (autoaugment.py applies CPU runs in chunks).

Exactness (tests/test_augment.py checks every op against torchvision):
- exact by construction: warp_affine_ (nearest sampling from the same float32 grid), brightness
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


def _channel_extrema(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [N, C, 1] per-channel min and max. channels_last is reduced over rows first, with
    whole W x C rows as the vectorised inner loop; reducing over (H, W) directly walks the 3
    channels as the inner loop, several times slower."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        rows = x.permute(0, 2, 3, 1).reshape(n, h, w * c)
        lo = rows.amin(dim=1).view(n, w, c).amin(dim=1)
        hi = rows.amax(dim=1).view(n, w, c).amax(dim=1)
    else:
        lo, hi = x.amin(dim=(2, 3)), x.amax(dim=(2, 3))
    return lo.float().unsqueeze(-1), hi.float().unsqueeze(-1)


def autocontrast_table(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's [min, max] to [0, 255]; flat channels are left as they are."""
    lo, hi = _channel_extrema(x)
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
# One flat index serves the histograms and the lookup of a whole group: entry = value + 256 * (table
# number), table number = C * sample + channel, int32 and in the batch's own memory layout, so a
# channels_last batch is never transposed. The lookup is then one index_select over all tables
# concatenated, and the histograms one bincount (index_add_ off the CPU). All take int32 indices;
# an int64 index (what gather and scatter_add_ demand) is twice the bytes to write and read, and on
# the CPU the conversion to it cost as much as the lookup itself.

def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """x flattened in memory order (a view): contiguous or channels_last N x C x H x W."""
    if x.is_contiguous():
        return x.view(-1)
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).view(-1)
    raise ValueError("images must be contiguous or channels_last")


def _table_offsets(x: torch.Tensor) -> torch.Tensor:
    """int32 256 * (C * sample + channel), shaped to broadcast over x with long inner loops. For
    channels_last the offsets of one whole row (W x C) are materialised: broadcasting [N, C, 1, 1]
    there leaves an inner loop of C = 3 elements, several times slower on the CPU."""
    n, c, _, w = x.shape
    k = torch.arange(n * c, dtype=torch.int32, device=x.device).mul_(256)
    if x.is_contiguous():
        return k.view(n, c, 1, 1)
    return k.view(n, 1, 1, c).expand(n, 1, w, c).contiguous().permute(0, 3, 1, 2)


def table_index(x: torch.Tensor) -> torch.Tensor:
    """int32 value + 256 * (C * sample + channel) for every value of x, in x's memory layout: what
    channel_histograms and apply_table share (computed once when a group needs both)."""
    return x.to(torch.int32).add_(_table_offsets(x))


def channel_histograms(index: torch.Tensor, num_samples: int, bincount: bool | None = None) -> torch.Tensor:
    """int64 [num_samples, C, 256] value counts per sample and channel. `index` is table_index of
    num_samples images, or a slice of it (the samples outside the slice count nothing).

    bincount (the default on the CPU) is about twice as fast as index_add_ there; on CUDA it reads
    the index's max back to the host to size its output, a sync, so accelerators take index_add_.
    """
    c = index.shape[1]
    flat = _memory_order(index)
    size = num_samples * c * 256
    if bincount is None:
        bincount = flat.device.type == "cpu"
    if bincount:
        counts = torch.bincount(flat, minlength=size)
    else:
        counts = torch.zeros(size, dtype=torch.int32, device=flat.device)
        counts.index_add_(0, flat, torch.ones((), dtype=torch.int32, device=flat.device).expand_as(flat))
    return counts.view(num_samples, c, 256).long()


def apply_table(x: torch.Tensor, table: torch.Tensor, index: torch.Tensor | None = None,
                inplace: bool = False) -> torch.Tensor:
    """Map every value of sample i, channel c through table[i, c] (or table[i, 0] for all
    channels). The result has x's memory layout; `inplace` writes it into x (the lookup reads only
    the table and the index, so x may be overwritten) and saves a copy back."""
    n, c, h, w = x.shape
    index = table_index(x) if index is None else index
    flat_table = table.expand(n, c, 256).reshape(-1)
    if inplace:
        torch.index_select(flat_table, 0, _memory_order(index), out=_memory_order(x))
        return x
    out = flat_table.index_select(0, _memory_order(index))
    if x.is_contiguous():
        return out.view(n, c, h, w)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


def gray_mean(x: torch.Tensor) -> torch.Tensor:
    """float32 [N] mean of the floored luma. A float32 sum of integers is exact in any order below
    2**24 / 255 pixels (~256 x 256), so the batch agrees with torchvision's per-image reduction."""
    return _grayscale(x).mean(dim=(1, 2, 3))


# ---- per-value ops, one call each (what autoaugment.apply_plan fuses) -------------------------------

def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return apply_table(x, brightness_table(factor, x.device))


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return apply_table(x, contrast_table(factor, gray_mean(x)))


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    return apply_table(x, autocontrast_table(x))


def equalize(x: torch.Tensor) -> torch.Tensor:
    index = table_index(x)
    return apply_table(x, equalize_table(channel_histograms(index, x.shape[0])), index)


# ---- bitwise per-value ops, in place ------------------------------------------------------------
# These cost about as much as a copy of the batch, so they work in place on the caller's (already
# gathered) samples rather than make a new tensor that would then be copied back.

def solarize_(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert values >= threshold (float64 [N] on the host), in place. torchvision compares the
    uint8 image with a Python float, which promotes both to float32, so the threshold is rounded to
    float32 first (255 * 2/30 is 17.0000004 in float64 but 17.0 in float32, and 17 gets inverted).
    For an integer v, v >= t holds exactly when v >= ceil(t), so the comparison then runs on the
    uint8 values themselves, with no wider copy of the image (torchvision rejects thresholds above
    255)."""
    lowest = _per_sample(threshold.float().ceil().clamp(0, 255), x.device, torch.uint8).unsqueeze(1)
    # v >= t as max(v, t) == v, and ~v as v ^ 255: on the CPU a comparison or where() against a
    # per-sample value runs element by element, several times slower than these whole-tensor ops.
    at_or_above = torch.maximum(x, lowest) == x
    return x.bitwise_xor_(at_or_above.view(torch.uint8).neg_())


def posterize_(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of every value, in place."""
    bits = bits.long().clamp(0, 8)
    mask = ((1 << bits) - 1) << (8 - bits)
    return x.bitwise_and_(_per_sample(mask, x.device, torch.uint8).unsqueeze(1))


def invert_(x: torch.Tensor) -> torch.Tensor:
    return x.bitwise_not_()


# ---- ops that mix pixels ------------------------------------------------------------------------

def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, floored, float32 N x 1 x H x W (torchvision's order of operations). The
    result depends only on each pixel's (r, g, b), not on the planes' dtype (uint8 or float32) or
    strides: checked for all 2**24 colours on this build, contiguous and channels_last."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def adjust_saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the sample's own grayscale ("Color" in AutoAugment), written back into x. The
    blend runs on one planar (N x C x H x W contiguous) float32 copy: on channels_last the
    per-channel planes are strided and broadcasting the grey plane over the channels gives an inner
    loop of 3 values, both several times slower than the planar float ops."""
    ratio = _per_sample(factor, x.device).unsqueeze(1)
    alpha = _per_sample(1.0 - factor, x.device).unsqueeze(1)
    planar = x.to(torch.float32, memory_format=torch.contiguous_format)
    gray = _grayscale(planar)
    planar.mul_(ratio).addcmul_(gray, alpha).clamp_(0, 255)
    return x.copy_(planar)  # float -> uint8 truncates, as torchvision's .to(uint8)


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


def warp_affine_(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-sample affine warp, nearest neighbour, 0 outside the image (AutoAugment's defaults),
    written back into x (the image is packed into a new buffer before any of it is overwritten).

    `theta`, a float32 [N, 2, 3] host tensor (geometry.affine_matrices), maps output pixels to input
    pixels, both measured in pixels from the image centre. The grid is built in pixel units with
    the same float32 bmm torchvision uses, then read by grid_sample; F.affine_grid rounds
    differently, and under nearest sampling a different rounding picks a different pixel at ties
    (hundreds of pixels per batch for ShearX). The grid must stay float32: under autocast the bmm
    would run in bf16/fp16 and land half a pixel off (autocast is switched off here); with TF32
    matmuls enabled globally it is off by ~0.05 px at 224 px, so a few pixels near ties take a
    neighbour's value.

    Nearest sampling moves whole pixels, so grid_sample reads one packed plane instead of C float
    channels: a pixel's (up to 3) bytes as one int32, converted to float32 exactly, sampled (0
    outside the image is the pixel (0, 0, 0), torchvision's fill) and unpacked. A third of the
    floats to convert, sample and round, and a third of the bytes of a float copy of the image.
    """
    n, c, h, w = x.shape
    if c > 3:
        raise ValueError(f"warp_affine_ packs a pixel into one float32 exactly for up to 3 channels, got {c}")
    # Scaled on the host, where theta is made: building it from Python numbers on an accelerator
    # would be a blocking copy.
    scaled = (theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h])).contiguous()
    scaled = host_to(scaled, x.device)
    xs = torch.arange(w, dtype=torch.float32, device=x.device) - (w - 1) * 0.5
    ys = torch.arange(h, dtype=torch.float32, device=x.device) - (h - 1) * 0.5
    base = torch.stack([xs.expand(h, w), ys.unsqueeze(1).expand(h, w), torch.ones(h, w, device=x.device)], dim=-1)
    # Three adjacent bytes of an int32 span at most 24 significant bits in either byte order, so
    # the conversion to float32 and back is exact.
    pixels = torch.zeros(n, h, w, 4, dtype=torch.uint8, device=x.device)
    for ch in range(c):  # one channel at a time: a [..., :c] copy would loop over 3 bytes at a time
        pixels[..., ch] = x[:, ch]
    packed = pixels.view(torch.int32).to(torch.float32).view(n, 1, h, w)
    with torch.autocast(x.device.type, enabled=False):
        grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(scaled).view(n, h, w, 2)
        sampled = F.grid_sample(packed, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    pixels = sampled.to(torch.int32).view(torch.uint8).view(n, h, w, 4)
    for ch in range(c):
        x[:, ch] = pixels[..., ch]
    return x
