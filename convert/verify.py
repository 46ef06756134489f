"""Check converted data against the checksums its converter wrote, and name what is damaged.

    python convert/verify.py DATA [--workers N]

DATA is a dataset root (DATA/ffcv and DATA/shards are checked, whichever exist) or one converted
folder. Every file in a folder's manifest.json is read whole and checked chunk by chunk, and each
shard's samples one by one against the .crc beside its index, in parallel with a progress bar.
Prints one line per damaged byte range or sample and exits 1, or says all is intact and exits 0.
"""
import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from convert.cli import default_workers
from core.dataset import CONVERTED_DIRS
from core.errors import DatasetError, run_command
from core.manifest import MANIFEST, chunk_problems, read_manifest
from core.shards import damaged_samples


def folders_to_check(root: Path) -> list[Path]:
    root = Path(root)
    if (root / MANIFEST).exists():
        return [root]
    found = [root / sub for sub in CONVERTED_DIRS if (root / sub / MANIFEST).exists()]
    if not found:
        raise DatasetError(f"no {MANIFEST} in {root} or in {', '.join(f'{root}/{s}' for s in CONVERTED_DIRS)}: "
                           f"data converted before checksums existed; re-run `python convert/to_ffcv.py {root}` "
                           f"or `python convert/to_shards.py {root}`")
    return found


def _check(job) -> list[str]:
    kind, path, description = job
    return chunk_problems(path, description) if kind == "file" else damaged_samples(path)


def verify(root, workers: int | None = None, progress: bool = True) -> tuple[list[str], int]:
    """(one line per damage found, files checked)."""
    jobs = []
    for folder in folders_to_check(root):
        for name, description in read_manifest(folder).items():
            jobs.append(("file", folder / name, description))
            if name.endswith(".tar") and (folder / name).exists():
                jobs.append(("samples", folder / name, None))
    jobs.sort(key=lambda j: -(j[2] or {"size": 0})["size"])  # the largest first: the pool ends together
    problems = []
    with ProcessPoolExecutor(workers or default_workers()) as pool:
        for found in tqdm(pool.map(_check, jobs), total=len(jobs), unit="check", desc="verify",
                          disable=not progress):
            problems += found
    return sorted(problems), sum(j[0] == "file" for j in jobs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="dataset root (holding ffcv/ and/or shards/) or one converted folder")
    p.add_argument("--workers", type=int, default=None, help=f"processes (default: all {default_workers()} cores)")
    a = p.parse_args(argv)
    problems, files = verify(a.data, a.workers, progress=sys.stderr.isatty())
    if problems:
        raise DatasetError(f"verify: {len(problems)} damaged in {a.data}:\n" + "\n".join(f"  {x}" for x in problems)
                           + "\nre-run the converter on the original dataset to rewrite them")
    print(f"verify: {files} files in {a.data} match their checksums")
    return files


if __name__ == "__main__":
    run_command(main)
