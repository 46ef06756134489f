"""What both converter commands share: their common options, the option checks, and the summary line."""
import argparse
import os
import sys
import time
from pathlib import Path

from convert.images import JPEG_QUALITY, MAX_RES_HELP, MAX_RES_PX
from core.dataset import SPLITS, Dataset
from core.errors import DatasetError
from core.memory import PeakRSS


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_options(max_res_px, jpeg_quality, workers, limit):
    """The option checks both converters need; the message names the flag."""
    if max_res_px < 16:
        raise DatasetError(f"--max-resolution {max_res_px}: use at least 16 px (default {MAX_RES_PX})")
    if not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"--jpeg-quality {jpeg_quality}: use 1..100 (default {JPEG_QUALITY})")
    if workers is not None and workers < 1:
        raise DatasetError(f"--workers {workers}: use 1 or more (default: all {default_workers()} cores)")
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit {limit}: use 1 or more, or leave it out to convert everything")


def summarize(tool: str, dataset: Dataset, written: dict, bad: dict, out: Path, workers: int,
              start_s: float, rss: PeakRSS) -> dict:
    """The end-of-run numbers as a plain dict, printed as one line to stderr. The clock starts
    after the scan, when images start being converted."""
    wall_s = time.perf_counter() - start_s
    images = sum(written.values())
    summary = dict(tool=tool, out=str(out), images=written, skipped={k: len(v) for k, v in bad.items()},
                   ignored=dict(dataset.ignored), classes=len(dataset.classes), workers=workers,
                   wall_s=round(wall_s, 3), imgs_per_s=round(images / wall_s, 1),
                   peak_rss_mb=round(rss.peak_rss_mb, 1), peak_pss_mb=round(rss.peak_pss_mb, 1))
    ignored = ", ".join(f"{k}: {v}" for k, v in sorted(dataset.ignored.items())) or "none"
    print(f"{tool}: wrote {images} images ({', '.join(f'{k} {v}' for k, v in written.items())}) "
          f"to {out} in {wall_s:.1f} s: {summary['imgs_per_s']} img/s on {workers} workers; peak memory "
          f"of all processes: RSS {rss.peak_rss_mb:.0f} MB, PSS {rss.peak_pss_mb:.0f} MB; "
          f"skipped {sum(summary['skipped'].values())} bad files; ignored non-image files: {ignored}",
          file=sys.stderr)
    return summary


# Storage presets, as flag defaults (a flag on the command line still wins). accuracy: today's
# defaults, every image a JPEG at 512 px. fast: FFCV's ImageNet recipe (max side 400-500 px, half
# the images stored as raw pixels that need no decoding, quality 90): more disk, faster loading,
# for a schedule that trains at low resolution (configs/mobilenetv3_large_fast.yaml).
PRESETS = {
    "accuracy": {"max_res_px": MAX_RES_PX, "jpeg_quality": JPEG_QUALITY, "write_mode": "jpg"},
    "fast": {"max_res_px": 400, "jpeg_quality": 90, "write_mode": "proportion", "compress_probability": 0.5},
}


def parse_with_preset(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, with --preset's values as the defaults of the flags this converter has."""
    first, _ = parser.parse_known_args(argv)
    dests = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in PRESETS[first.preset].items() if k in dests})
    return parser.parse_args(argv)


def _split_list(text: str) -> tuple:
    return tuple(s for s in text.split(",") if s)


def common_parser(doc: str) -> argparse.ArgumentParser:
    """The options both converters take, with their help text in one place."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default=None,
                   help="dataset root holding train/<class>/<image> and val/<class>/<image> "
                        "(default: build and use the built-in sample dataset)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: a folder inside DATASET, named below)")
    p.add_argument("--preset", choices=list(PRESETS), default="accuracy",
                   help="storage preset, as defaults for the flags below: accuracy (every image a JPEG, "
                        "512 px) or fast (FFCV's recipe: 400 px, to_ffcv stores half the images as raw "
                        "pixels; more disk, faster loading); bench/README.md has the disk and img/s of each")
    p.add_argument("--max-resolution", type=int, default=MAX_RES_PX, dest="max_res_px", metavar="PX",
                   help=MAX_RES_HELP)
    p.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY, metavar="Q",
                   help=f"quality of the stored JPEGs, 1..100 (default {JPEG_QUALITY}, as FFCV's ImageNet recipe); "
                        f"they are baseline 4:2:0 JPEGs, what nvJPEG's batched decoder and the GPUs' hardware "
                        f"JPEG engines take (train.py --decode device), and the smallest at a given quality")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"processes decoding and encoding images (default: all {default_workers()} cores)")
    p.add_argument("--splits", type=_split_list, default=SPLITS, metavar="LIST",
                   help="comma-separated split folders to convert (default: train,val)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="convert only the first N images of each split, in scan order (whole classes "
                        "first, so not a balanced subset): for trial runs")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out image files that cannot be decoded (empty, truncated, not an image), "
                        "list them in OUT/skipped.txt and count them in the summary. Without it, any "
                        "such file stops the conversion before anything is written, listing them all")
    return p
