"""Write a small, deterministic ImageNet-layout sample dataset of real JPEGs.

    python convert/make_sample.py OUT [--classes 10] [--train-per-class 40] [--val-per-class 10] [--oddities]

Layout and names follow ImageNet: OUT/train/<wnid>/<wnid>_<n>.JPEG and
OUT/val/<wnid>/ILSVRC2012_val_<n>.JPEG. Images are photograph-like to a JPEG
decoder (1/f "natural" noise, soft edges, ImageNet-like sizes and file sizes at
quality 90), and each class has a hue and an oriented texture a small network
learns in a few CPU epochs. The same arguments always give the same bytes.
"""
import argparse
import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import DatasetError, run_command

JPEG_QUALITY = 90
SHORT_SIDE_PX = (200, 500)
ASPECT = (0.75, 1.5)  # width / height, as ImageNet's mix of portrait and landscape
DEFAULT_SEED = 0
STAMP = ".sample-complete.json"  # written last: its presence means the dataset is whole


def class_names(num_classes: int) -> list[str]:
    """ImageNet-style synset ids, sorted the way ImageFolder orders them."""
    return [f"n{1440764 + 9973 * i:08d}" for i in range(num_classes)]


def _rng(seed: int, *key) -> np.random.Generator:
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _natural_noise(rng: np.random.Generator, h: int, w: int, angle: float) -> np.ndarray:
    """1/f^2-power noise whose energy leans towards `angle`: the statistics of photographs."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    radius[0, 0] = 1.0
    theta = np.arctan2(fy, fx)
    orient = 0.35 + np.cos(theta - angle) ** 8  # oriented texture: the class's second cue
    spectrum = orient / radius ** 1.05
    spectrum[0, 0] = 0.0
    phase = rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))
    field = np.fft.irfft2(spectrum * phase, s=(h, w))
    field -= field.mean()
    return (field / (field.std() + 1e-8)).astype(np.float32)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def render(seed: int, class_idx: int, num_classes: int, split: str, index: int) -> np.ndarray:
    """One H x W x 3 uint8 image of class `class_idx`."""
    rng = _rng(seed, split, class_idx, index)
    short = int(rng.integers(SHORT_SIDE_PX[0], SHORT_SIDE_PX[1] + 1))
    aspect = float(rng.uniform(*ASPECT))
    h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
    angle = np.pi * class_idx / num_classes
    lum = _natural_noise(rng, h, w, angle)
    # A soft-edged blob: an "object" with edges, so crops differ and JPEG sees structure.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(0.15, 0.4) * h, rng.uniform(0.15, 0.4) * w
    dist = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    blob = 1.0 / (1.0 + np.exp(np.minimum(8.0 * (dist - 1.0), 50.0)))
    hue = (class_idx / num_classes + rng.normal(0.0, 0.02)) % 1.0
    base = _hsv_to_rgb(hue, rng.uniform(0.45, 0.8), rng.uniform(0.55, 0.85))
    other = _hsv_to_rgb((hue + 0.5) % 1.0, rng.uniform(0.3, 0.6), rng.uniform(0.4, 0.8))
    colour = base[None, None, :] * (1.0 - blob[..., None]) + other[None, None, :] * blob[..., None]
    img = colour * (1.0 + 0.22 * lum[..., None]) + 0.04 * lum[..., None]
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _write_one(job) -> int:
    seed, class_idx, num_classes, split, index, path, kind = job
    pixels = render(seed, class_idx, num_classes, split, index)
    img = Image.fromarray(pixels, "RGB")
    tmp = f"{path}.tmp"
    if kind == "gray":
        img.convert("L").save(tmp, "JPEG", quality=JPEG_QUALITY)
    elif kind == "cmyk":
        img.convert("CMYK").save(tmp, "JPEG", quality=JPEG_QUALITY)
    elif kind == "png":
        img.save(tmp, "PNG")
    else:
        img.save(tmp, "JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, path)
    return os.path.getsize(path)


def plan(out: Path, num_classes: int, train_per_class: int, val_per_class: int,
         seed: int, oddities: bool):
    """Every file to write, as (seed, class, num_classes, split, index, path, kind)."""
    names = class_names(num_classes)
    jobs = []
    val_counter = 0
    for c, wnid in enumerate(names):
        for i in range(train_per_class):
            jobs.append((seed, c, num_classes, "train", i,
                         out / "train" / wnid / f"{wnid}_{i + 1}.JPEG", "rgb"))
        for i in range(val_per_class):
            val_counter += 1
            jobs.append((seed, c, num_classes, "val", i,
                         out / "val" / wnid / f"ILSVRC2012_val_{val_counter:08d}.JPEG", "rgb"))
    if oddities:
        # ImageNet holds 22 CMYK JPEGs, grayscale JPEGs and one PNG named .JPEG; give each a file.
        for kind, idx in (("gray", 0), ("cmyk", 1), ("png", 2)):
            c = idx % num_classes
            jobs.append((seed, c, num_classes, "train", 10_000 + idx,
                         out / "train" / names[c] / f"{names[c]}_odd_{kind}.JPEG", kind))
    return names, jobs


def make_sample(out, num_classes: int = 10, train_per_class: int = 40, val_per_class: int = 10,
                seed: int = DEFAULT_SEED, oddities: bool = False, workers: int | None = None,
                quiet: bool = False) -> Path:
    """Write the dataset under `out` (skipped when a complete one with the same settings is there)."""
    out = Path(out)
    settings = dict(classes=num_classes, train_per_class=train_per_class,
                    val_per_class=val_per_class, seed=seed, oddities=oddities)
    stamp = out / STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("settings") == settings:
        return out
    if num_classes < 2 or train_per_class < 1 or val_per_class < 1:
        raise DatasetError("make_sample: need --classes >= 2 and at least 1 image per class and split")
    names, jobs = plan(out, num_classes, train_per_class, val_per_class, seed, oddities)
    for split in ("train", "val"):
        for wnid in names:
            (out / split / wnid).mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    total_bytes = 0
    with ProcessPoolExecutor(workers) as pool:
        for n, size in enumerate(pool.map(_write_one, jobs, chunksize=8), 1):
            total_bytes += size
            if not quiet and (n % 100 == 0 or n == len(jobs)):
                print(f"\rmake_sample: {n}/{len(jobs)} images", end="", file=sys.stderr, flush=True)
    if not quiet:
        print(f"\nmake_sample: wrote {len(jobs)} images ({total_bytes / 1e6:.1f} MB) "
              f"in {num_classes} classes to {out}", file=sys.stderr)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "images": len(jobs)}))
    os.replace(tmp, stamp)
    return out


def default_sample_dir() -> Path:
    """Where user commands build the sample dataset when given no --data."""
    return Path(os.environ.get("MNV3_SAMPLE_DIR", Path(__file__).resolve().parent.parent / "data" / "sample"))


def sample_root(data=None, who: str = "") -> Path:
    """`data` if given; else the built-in sample dataset at default_sample_dir(), built once (saying so).
    The converters call this; convert/default_data.py adds the conversions the loaders need on top."""
    if data:
        return Path(data)
    path = default_sample_dir()
    print(f"{who or 'note'}: no dataset given: using the built-in sample dataset at {path}", file=sys.stderr)
    return make_sample(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (gets train/ and val/)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--train-per-class", type=int, default=40, help="train images per class (default 40)")
    p.add_argument("--val-per-class", type=int, default=10, help="val images per class (default 10)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="same seed, same bytes (default 0)")
    p.add_argument("--oddities", action="store_true",
                   help="add ImageNet's oddities to train/: a grayscale JPEG, a CMYK JPEG, a PNG named .JPEG")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    a = p.parse_args(argv)
    make_sample(a.out, a.classes, a.train_per_class, a.val_per_class, a.seed, a.oddities, a.workers)


if __name__ == "__main__":
    run_command(main)
