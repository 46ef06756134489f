"""Apply a plan (policies.sample_plan) to a uint8 batch. Per slot the batch is gathered in op
order, so each op's samples are one contiguous run: one affine warp serves all geometric ops, one
table lookup all table ops (ops.py), one call each the rest, all in place on the gathered copy.
On the CPU each run goes in chunks of a few MB (CPU_CHUNK_VALUES), on an accelerator whole.

All grouping is decided from the host-side plan, so nothing is read back from the device.
"""
from __future__ import annotations

import torch

from . import ops
from .geometry import affine_matrices
from .policies import GEOMETRIC, OP_INDEX, OPS, PER_VALUE, Slot

_GEOMETRIC_RUN, _PER_VALUE_RUN = -1, -2
# Samples are sorted by this rank, not by op index: Identity first, then OPS order except that
# Solarize (not a table op) moves to the end, so that the table ops stay one run.
_SORT_RANK = torch.tensor([i if name != "Solarize" else len(OPS) for i, name in enumerate(OPS)])


def _runs(sorted_ops: list[int], family=lambda op: op) -> list[tuple[int, int, int]]:
    """(key, start, end) runs of equal family(op) in a sorted op list."""
    runs: list[tuple[int, int, int]] = []
    for i, op in enumerate(sorted_ops):
        key = family(op)
        if runs and runs[-1][0] == key:
            runs[-1] = (key, runs[-1][1], i + 1)
        else:
            runs.append((key, i, i + 1))
    return runs


def _family(op: int) -> int:
    """Geometric ops share one run, table ops another (_SORT_RANK keeps each family contiguous)."""
    return _GEOMETRIC_RUN if op in GEOMETRIC else _PER_VALUE_RUN if op in PER_VALUE else op


def _per_value_(x: torch.Tensor, sorted_ops: list[int], mags: torch.Tensor) -> None:
    """Build each sample's table by its op, then map the whole group through them in one lookup,
    in place."""
    index = ops.table_index(x)
    tables = []
    for op, s, e in _runs(sorted_ops):
        name, m, dev = OPS[op], mags[s:e], x.device
        if name == "Brightness":
            t = ops.brightness_table(1.0 + m, dev)
        elif name == "Contrast":
            t = ops.contrast_table(1.0 + m, ops.gray_mean(x[s:e]))
        elif name == "AutoContrast":
            t = ops.autocontrast_table(x[s:e])
        else:  # Equalize
            t = ops.equalize_table(ops.channel_histograms(index[s:e], x.shape[0])[s:e])
        tables.append(t.expand(e - s, x.shape[1], 256))
    ops.apply_table(x, torch.cat(tables), index, inplace=True)


# On the CPU a run is applied in chunks of samples whose float32 temporaries stay within a few MB.
# A whole run's temporaries (64 images of 224 px: 38 MB as float32) stream through DRAM, and above
# glibc's ~32 MB mmap threshold, or once the heap trims them, each call gets fresh pages from the
# OS; both together cost about as much as the arithmetic (bench/augment_cost.py, and the same ops
# ran ~2x faster with glibc told to keep freed memory). On an accelerator a run is one chunk, so
# one launch per op group as before.
CPU_CHUNK_VALUES = 1 << 20


def _chunks(x: torch.Tensor, start: int, end: int):
    """(start, end) slices of samples start..end: the whole range on an accelerator, pieces of at
    most CPU_CHUNK_VALUES values (at least one sample) on the CPU."""
    if x.device.type != "cpu":
        yield start, end
        return
    step = max(1, CPU_CHUNK_VALUES // max(1, x[0].numel()))
    for s in range(start, end, step):
        yield s, min(s + step, end)


def _transform_runs_(x: torch.Tensor, sorted_ops: list[int], mags: torch.Tensor) -> None:
    """In place on x (a gathered copy): samples sorted by op, no Identity; mags float64 on the host."""
    _, _, h, w = x.shape
    for key, start, end in _runs(sorted_ops, _family):
        for s, e in _chunks(x, start, end):
            _transform_(x[s:e], key, sorted_ops[s:e], mags[s:e], h, w)


def _transform_(x: torch.Tensor, key: int, sorted_ops: list[int], mags: torch.Tensor, h: int, w: int) -> None:
    """One run (or chunk of one) of a family or op, in place."""
    if key == _GEOMETRIC_RUN:
        ops.warp_affine_(x, affine_matrices(torch.tensor(sorted_ops), mags, h, w))
    elif key == _PER_VALUE_RUN:
        _per_value_(x, sorted_ops, mags)
    elif OPS[key] == "Color":
        ops.adjust_saturation_(x, 1.0 + mags)
    elif OPS[key] == "Sharpness":
        x.copy_(ops.adjust_sharpness(x, 1.0 + mags))
    elif OPS[key] == "Posterize":  # torchvision passes int(magnitude)
        ops.posterize_(x, mags.trunc().long())
    elif OPS[key] == "Solarize":  # threshold as a fraction of 255
        ops.solarize_(x, 255.0 * mags)
    elif OPS[key] == "Invert":
        ops.invert_(x)
    else:
        raise ValueError(f"no batched kernel for op {OPS[key]}")


def apply_op(images: torch.Tensor, op: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """One op on every sample, each with its own magnitude (float64 [N], torchvision's meaning),
    through the same path a slot takes. uint8 N x C x H x W contiguous in, a new tensor out."""
    if op == "Identity":
        return images.clone()
    x = images.clone()
    _transform_runs_(x, [OP_INDEX[op]] * images.shape[0], magnitudes.double())
    return x


def _apply_sorted(rows: torch.Tensor, plan: list[Slot], as_images) -> torch.Tensor:
    """rows: N samples as rows of bytes (_sample_rows); as_images views rows as N x C x H x W.
    Each slot gathers the rows in its op order (Identity first, left as is), transforms the runs
    in place, and the next slot gathers from there; one last gather restores the original order.
    Only index_select moves samples: on the CPU it is several times faster than index_copy_, and
    on a GPU either is one launch."""
    n = rows.shape[0]
    position = torch.arange(n)  # position[j] = original index of the sample now in row j
    for slot in plan:
        ops_now = slot.ops[position]
        if bool((ops_now == OP_INDEX["Identity"]).all()):
            continue
        order = torch.argsort(_SORT_RANK[ops_now], stable=True)
        position = position[order]
        rows = rows.index_select(0, ops.host_to(order, rows.device))
        sorted_ops = ops_now[order].tolist()
        first = sum(1 for op in sorted_ops if op == OP_INDEX["Identity"])
        _transform_runs_(as_images(rows[first:]), sorted_ops[first:], slot.magnitudes[position][first:])
    return rows.index_select(0, ops.host_to(torch.argsort(position), rows.device))


def _sample_rows(images: torch.Tensor):
    """(rows, as_images): the batch as an N x (bytes per sample) view in memory order, so gathers
    copy whole contiguous samples, and the inverse view. Kernels then see the caller's layout:
    a channels_last batch is never transposed."""
    n, c, h, w = images.shape
    if images.is_contiguous():
        return images.view(n, -1), lambda r: r.view(-1, c, h, w)
    if images.is_contiguous(memory_format=torch.channels_last):
        return images.permute(0, 2, 3, 1).view(n, -1), lambda r: r.view(-1, h, w, c).permute(0, 3, 1, 2)
    raise ValueError("images must be contiguous or channels_last (loaders deliver channels_last)")


def apply_plan(images: torch.Tensor, plan: list[Slot]) -> torch.Tensor:
    """uint8 N x C x H x W in, a new uint8 tensor of the same shape and memory format out
    (index_select always copies, so the caller's batch is never modified)."""
    rows, as_images = _sample_rows(images)
    return as_images(_apply_sorted(rows, plan, as_images))
