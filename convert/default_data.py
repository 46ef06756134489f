"""The dataset a command uses when it is given no --data: the built-in sample, built once and
converted once for each loader that reads converted files.

It sits above make_sample.py and the converters (it calls both; the converters only call
make_sample.sample_root), so the imports in convert/ run one way.
"""
import sys
from pathlib import Path

from convert.make_sample import default_sample_dir, sample_root

__all__ = ["default_sample_dir", "ensure_sample"]


def ensure_sample(data=None, who: str = "", loaders=()) -> Path:
    """`data` if given; else the built-in sample dataset, built once (saying so) and converted once
    for each of `loaders` that reads converted files (ffcv: .beton files; dali: record shards)."""
    if data:
        return Path(data)
    path = sample_root(None, who)
    if "ffcv" in loaders and not (path / "ffcv" / "val.beton").exists():
        from convert.to_ffcv import convert as to_ffcv  # here: it loads numba, which only ffcv runs need
        print(f"{who}: converting the sample dataset for FFCV into {path / 'ffcv'}", file=sys.stderr)
        to_ffcv(path, progress=False)
    if "dali" in loaders and not list((path / "shards").glob("val-*.idx")):
        from convert.to_shards import convert as to_shards
        print(f"{who}: writing record shards of the sample dataset into {path / 'shards'}", file=sys.stderr)
        to_shards(path, progress=False)
    return path
