"""What each sample gets: the op tables of torchvision's AutoAugment (ImageNet policy), RandAugment
and TrivialAugmentWide, and `sample_plan`, which draws every sample's own ops and magnitudes.

The plan is drawn on the host with a CPU generator. It is a handful of numbers per sample, and
knowing it on the host is what lets `autoaugment.apply_plan` group samples by op without reading
anything back from the device (a device->host sync per step).

A magnitude here is exactly the number torchvision hands to its per-op function (degrees, pixels,
enhance offset, bits, solarize fraction), sign included, so a plan can be replayed through
torchvision op by op (tests/test_augment.py does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Order matters: indices are stored in plans and drawn by position, so reordering changes every
# draw. autoaugment.py sorts samples so that each family of ops forms one run.
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
       "Color", "Sharpness", "Posterize", "Invert",
       "Brightness", "Contrast", "Solarize", "AutoContrast", "Equalize")
OP_INDEX = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = frozenset(OP_INDEX[n] for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"))
# Ops applied through a per-sample, per-channel table of the 256 values (ops.py). Posterize, Invert
# and Solarize are per-value too, but a bitwise op or a uint8 comparison is cheaper than a lookup.
PER_VALUE = frozenset(OP_INDEX[n] for n in ("Brightness", "Contrast", "AutoContrast", "Equalize"))
# Ops whose magnitude torchvision negates with probability 1/2.
SIGNED = frozenset(OP_INDEX[n] for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                                         "Brightness", "Color", "Contrast", "Sharpness"))

POLICIES = ("imagenet", "randaugment", "trivialaugment")

# torchvision's AutoAugmentPolicy.IMAGENET: 25 sub-policies of two (op, probability, magnitude bin)
# on 10 bins. Duplicated rows are in the original and weight those sub-policies double.
IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
IMAGENET_NUM_BINS = 10

# RandAugment and TrivialAugmentWide draw uniformly from these (Invert is AutoAugment-only).
RANDOM_OPS = tuple(OP_INDEX[n] for n in OPS if n != "Invert")


def magnitude_table(op: str, num_bins: int, height: int, width: int, wide: bool) -> torch.Tensor | None:
    """torchvision's magnitude bins for one op: AutoAugment/RandAugment (`wide=False`) or
    TrivialAugmentWide (`wide=True`). float32 like torchvision's, so values match bit for bit."""
    linear_max = {  # op -> (narrow max, wide max); magnitudes are linspace(0, max, num_bins)
        "ShearX": (0.3, 0.99), "ShearY": (0.3, 0.99),
        "TranslateX": (150.0 / 331.0 * width, 32.0), "TranslateY": (150.0 / 331.0 * height, 32.0),
        "Rotate": (30.0, 135.0),
        "Brightness": (0.9, 0.99), "Color": (0.9, 0.99), "Contrast": (0.9, 0.99), "Sharpness": (0.9, 0.99),
    }
    if op in linear_max:
        return torch.linspace(0.0, linear_max[op][wide], num_bins)
    if op == "Posterize":  # 8 bits down to 4 (narrow) or 2 (wide)
        levels = 6 if wide else 4
        return (8 - (torch.arange(num_bins) / ((num_bins - 1) / levels))).round().int().float()
    if op == "Solarize":  # threshold as a fraction of 255, from 1 (no-op) down to 0
        return torch.linspace(1.0, 0.0, num_bins)
    return None  # Identity, AutoContrast, Equalize, Invert take no magnitude


def _table(num_bins: int, height: int, width: int, wide: bool) -> torch.Tensor:
    """[len(OPS), num_bins] float64 magnitudes, zero rows for ops without one."""
    rows = []
    for op in OPS:
        t = magnitude_table(op, num_bins, height, width, wide)
        rows.append(torch.zeros(num_bins, dtype=torch.float64) if t is None else t.double())
    return torch.stack(rows)


@dataclass(frozen=True)
class Slot:
    """One op per sample, applied to the whole batch at once: `ops[i]` indexes OPS and
    `magnitudes[i]` is torchvision's signed magnitude for it (0 where the op takes none)."""
    ops: torch.Tensor         # int64 [N], CPU
    magnitudes: torch.Tensor  # float64 [N], CPU


def _signed(ops: torch.Tensor, magnitudes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # torchvision negates when rand() <= 0.5; draw for every sample so the stream does not depend
    # on which ops were drawn.
    negate = torch.rand(ops.shape, generator=g, dtype=torch.float64) <= 0.5
    signed = torch.tensor([i in SIGNED for i in range(len(OPS))])[ops]
    return torch.where(negate & signed, -magnitudes, magnitudes)


def _lookup(table: torch.Tensor, ops: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Magnitude at a (possibly fractional) bin: linear between bins, exact at integer bins."""
    lo = levels.floor().long().clamp(0, table.shape[1] - 1)
    hi = (lo + 1).clamp(max=table.shape[1] - 1)
    frac = levels - lo.double()
    return table[ops, lo] + frac * (table[ops, hi] - table[ops, lo])


def sample_plan(policy: str, n: int, height: int, width: int, g: torch.Generator, *,
                num_ops: int = 2, magnitude: int = 9, magnitude_std: float = 0.0,
                num_bins: int = 31) -> list[Slot]:
    """Each of `n` samples draws its own ops and magnitudes; returns the slots in the order they
    apply. `g` is a CPU generator; the draw is a pure function of its state.

    imagenet: a sub-policy per sample, each of its two ops kept with the policy's probability.
    randaugment: `num_ops` ops per sample, uniform over RANDOM_OPS, at bin `magnitude` of
        `num_bins`; `magnitude_std > 0` draws the bin per op from N(magnitude, std) clipped to the
        bins (timm's mstd, but on torchvision's bin scale), `inf` draws it uniformly in [0, magnitude].
    trivialaugment: one op per sample, uniform over RANDOM_OPS, at a uniform bin of 31.
    """
    if policy == "imagenet":
        table = _table(IMAGENET_NUM_BINS, height, width, wide=False)
        op_ids = torch.tensor([[OP_INDEX[name] for name, _, _ in sub] for sub in IMAGENET_POLICY])
        probs = torch.tensor([[p for _, p, _ in sub] for sub in IMAGENET_POLICY], dtype=torch.float64)
        bins = torch.tensor([[b or 0 for _, _, b in sub] for sub in IMAGENET_POLICY])
        sub = torch.randint(len(IMAGENET_POLICY), (n,), generator=g)
        slots = []
        for k in range(2):
            keep = torch.rand(n, generator=g, dtype=torch.float64) <= probs[sub, k]
            ops = torch.where(keep, op_ids[sub, k], OP_INDEX["Identity"])
            mags = _lookup(table, ops, bins[sub, k].double())
            slots.append(Slot(ops, _signed(ops, mags, g)))
        return slots

    if policy == "randaugment":
        if not 0 <= magnitude < num_bins:
            raise ValueError(f"randaugment magnitude {magnitude} must be in [0, {num_bins - 1}]")
        table = _table(num_bins, height, width, wide=False)
        choices = torch.tensor(RANDOM_OPS)
        slots = []
        for _ in range(num_ops):
            ops = choices[torch.randint(len(choices), (n,), generator=g)]
            levels = torch.full((n,), float(magnitude), dtype=torch.float64)
            if magnitude_std == float("inf"):
                levels = torch.rand(n, generator=g, dtype=torch.float64) * magnitude
            elif magnitude_std > 0:
                levels = levels + magnitude_std * torch.randn(n, generator=g, dtype=torch.float64)
            levels = levels.clamp(0, num_bins - 1)
            slots.append(Slot(ops, _signed(ops, _lookup(table, ops, levels), g)))
        return slots

    if policy == "trivialaugment":
        table = _table(num_bins, height, width, wide=True)
        choices = torch.tensor(RANDOM_OPS)
        ops = choices[torch.randint(len(choices), (n,), generator=g)]
        levels = torch.randint(num_bins, (n,), generator=g).double()
        return [Slot(ops, _signed(ops, _lookup(table, ops, levels), g))]

    raise ValueError(f"unknown auto-augment policy {policy!r}: use one of {POLICIES} or 'none'")
