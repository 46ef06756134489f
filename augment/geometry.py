"""Inverse affine matrices for the geometric ops, in torchvision's conventions, computed on the
host in float64 per sample (a few dozen numbers per batch).

Each matrix maps an output pixel (x, y), measured in pixels from the image centre, to the input
pixel it samples. The algebra follows torchvision's `_get_inverse_affine_matrix` term for term
(rotation R(a), shears SHx/SHy, centre C, translation T; M^-1 = C RSS^-1 C^-1 T^-1) because the
warp uses nearest interpolation: a float32 theta that differs in its last bit can move a sampling
point across a pixel boundary, and the image would then differ by a whole pixel, not a grey level.
"""
from __future__ import annotations

import math

import torch

from .policies import OPS


def _inverse_matrix(center: tuple[float, float], angle_deg: float, translate: tuple[float, float],
                    shear_deg: tuple[float, float]) -> list[float]:
    rot = math.radians(angle_deg)
    sx, sy = math.radians(shear_deg[0]), math.radians(shear_deg[1])
    cx, cy = center
    tx, ty = translate
    # Forward rotate+shear matrix [[a, b], [c, d]] has determinant 1, so its inverse is [[d, -b], [-c, a]].
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


def affine_matrix(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """The 2x3 inverse matrix (row-major, 6 floats) torchvision's AutoAugment family uses for `op`
    at `magnitude` on a `height` x `width` image."""
    corner = (-0.5 * width, -0.5 * height)  # torchvision shears about the top-left corner (center=[0, 0])
    if op == "ShearX":
        return _inverse_matrix(corner, 0.0, (0.0, 0.0), (math.degrees(math.atan(magnitude)), 0.0))
    if op == "ShearY":
        return _inverse_matrix(corner, 0.0, (0.0, 0.0), (0.0, math.degrees(math.atan(magnitude))))
    if op == "TranslateX":  # whole pixels: torchvision truncates the magnitude with int()
        return _inverse_matrix((0.0, 0.0), 0.0, (float(int(magnitude)), 0.0), (0.0, 0.0))
    if op == "TranslateY":
        return _inverse_matrix((0.0, 0.0), 0.0, (0.0, float(int(magnitude))), (0.0, 0.0))
    if op == "Rotate":  # F.rotate reduces the angle mod 360 and turns counter-clockwise (hence the minus)
        return _inverse_matrix((0.0, 0.0), -(magnitude % 360), (0.0, 0.0), (0.0, 0.0))
    raise ValueError(f"{op} is not a geometric op")


def affine_matrices(ops: torch.Tensor, magnitudes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float32 [N, 2, 3] inverse matrices for per-sample geometric `ops` (indices into OPS)."""
    rows = [affine_matrix(OPS[int(o)], float(m), height, width) for o, m in zip(ops, magnitudes)]
    return torch.tensor(rows, dtype=torch.float64).view(-1, 2, 3).float()
