"""Time to the first batch of a fresh epoch against a resume at 90% of it, per loader: a mid-epoch
resume starts the loader at its step (set_epoch(epoch, start_step)), reading nothing it skips.

    python bench/resume_first_batch.py --data DATA [--batch 32] [--rounds 3]

Each round builds a new loader (as a restarted run does: workers, FFCV's JIT, DALI's pipeline)
and times set_epoch + the first next(); prints the median seconds of each.
"""
import argparse
import statistics
import time

import torch

from loaders import build_loader


def first_batch_s(name: str, data: str, batch: int, start_fraction: float, skip_by_reading: bool = False) -> float:
    """skip_by_reading: the way a resume skipped before, reading and dropping the batches up to it."""
    loader = build_loader(name, split="train", data=data, batch_size=batch, workers=2, image_size=64, seed=0,
                          device=torch.device("cpu"))
    start_s = time.perf_counter()
    start_step = int(start_fraction * len(loader))
    loader.set_epoch(1, 0 if skip_by_reading else start_step)
    batches = iter(loader)
    for _ in range(start_step + 1 if skip_by_reading else 1):
        next(batches)
    return time.perf_counter() - start_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dataset converted for every loader (ffcv/, shards/)")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per loader and start")
    parser.add_argument("--loaders", default="torchvision,ffcv,dali")
    args = parser.parse_args()
    for name in args.loaders.split(","):
        fresh, resumed = ([first_batch_s(name, args.data, args.batch, f) for _ in range(args.rounds)]
                          for f in (0.0, 0.9))
        fresh_s, resumed_s = statistics.median(fresh), statistics.median(resumed)
        before_s = first_batch_s(name, args.data, args.batch, 0.9, skip_by_reading=True)
        print(f"{name:12s} fresh {fresh_s:6.2f} s   resume at 90% {resumed_s:6.2f} s (ratio {resumed_s / fresh_s:4.2f})"
              f"   reading up to it, as before: {before_s:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
