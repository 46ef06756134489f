"""Pack an ImageNet-layout folder into WebDataset tar shards with DALI index files.

    python convert/to_shards.py DATASET [--out DIR] [--shard-size 1000] [--max-resolution 512] [--skip-bad]

Writes OUT/{split}-{i:06d}.tar: per image `<key>.jpg` (RGB JPEG, re-encoded at --max-resolution
and --jpeg-quality, the same pixels as to_ffcv stores) and `<key>.cls` (the label, ASCII
decimal); OUT/{split}-{i:06d}.idx, the index DALI's fn.readers.webdataset(index_paths=...)
reads; OUT/classes.json (class folder names in label order). The train split is written in a
fixed shuffled order: ImageNet's scan order holds ~1,300 images of one class in a row, more than
a streaming reader's shuffle buffer can mix, so shuffling happens once here (seeded: the shards
are the same bytes on every run) and the reader's buffer only mixes locally. val stays in scan
order. OUT defaults to DATASET/shards/. With no DATASET, the built-in sample is used.
"""
import io
import re
import tarfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from convert.cli import check_options, common_parser, default_workers, parse_with_preset, summarize
from convert.images import JPEG_QUALITY, MAX_RES_PX, BadImage, load_image, worker_setup
from convert.make_sample import sample_root
from convert.publish import bad_files_error, partial_path, prepare_out, publish_with_manifest
from core.dataset import SPLITS, scan
from core.errors import DatasetError, run_command
from core.manifest import crc32c, sample_crc_text
from core.memory import PeakRSS

TRAIN_ORDER_SEED = 0
SHARD_SIZE = 1000  # images per shard: ~70 MB at the defaults, 1,282 shards for ImageNet's train split
TAR_BLOCK = 512


# Baseline (not progressive), 4:2:0: what nvJPEG's batched decoder and the GPUs' hardware JPEG
# engines take (--decode device), and the smallest file at a given quality.
JPEG_PARAMS = [cv2.IMWRITE_JPEG_PROGRESSIVE, 0, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]


def encode(job):
    """In a worker: (path, max_res_px, quality) -> (JPEG bytes, None) or (None, why it is bad)."""
    path, max_res_px, jpeg_quality = job
    try:
        img = load_image(path, max_res_px)
    except BadImage as e:
        return None, str(e)
    # cv2 (libjpeg-turbo) with FFCV's settings, so a shard JPEG is what to_ffcv's jpg mode stores.
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           JPEG_PARAMS + [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    return (buf.tobytes(), None) if ok else (None, "JPEG encoding failed")


def ordered_map(pool, fn, jobs, window: int):
    """pool.map that keeps at most `window` images in flight, so memory does not grow with the dataset."""
    pending = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class ShardWriter:
    """Tar shards of `shard_size` samples (as partial files) and their DALI index files.

    The index (format v1.2, as DALI's wds2idx writes it): a line `v1.2 <samples>`, then per sample
    `<ext> <data offset> <size> <member name>` for each of its files, in tar order; beside it the
    per-sample checksums (.crc, core/manifest.py).
    """

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.finals, self._tar = [], None

    def add(self, key: str, jpg: bytes, label: int):
        if self._tar is None or len(self._lines) == self.shard_size:
            self._close_shard()
            tar_path = self.out / f"{self.split}-{len(self.finals) // 3:06d}.tar"
            self.finals += [tar_path, tar_path.with_suffix(".idx"), tar_path.with_suffix(".crc")]
            self._tar = tarfile.open(partial_path(tar_path), "w", format=tarfile.USTAR_FORMAT)
            self._lines, self._crcs = [], []
        entry, crcs = [], []
        for ext, data in (("jpg", jpg), ("cls", str(label).encode("ascii"))):
            crcs.append(crc32c(data))
            info = tarfile.TarInfo(f"{key}.{ext}")  # mtime, owner 0: the same bytes on every run
            info.size, info.mode = len(data), 0o444
            self._tar.addfile(info, io.BytesIO(data))
            data_offset = self._tar.offset - -(-len(data) // TAR_BLOCK) * TAR_BLOCK
            entry += [ext, str(data_offset), str(len(data)), info.name]
        self._lines.append(" ".join(entry))
        self._crcs.append(tuple(crcs))

    def _close_shard(self):
        if self._tar is not None:
            self._tar.close()
            tar_path, idx_path, crc_path = self.finals[-3:]
            partial_path(idx_path).write_text(f"v1.2 {len(self._lines)}\n" + "\n".join(self._lines) + "\n")
            partial_path(crc_path).write_text(sample_crc_text(self._crcs))
            self._tar = None

    def close(self) -> list[Path]:
        self._close_shard()
        return self.finals


def shard_order(split: str, n: int) -> np.ndarray:
    """The order samples are written in: a fixed permutation for train, scan order otherwise."""
    return np.random.default_rng(TRAIN_ORDER_SEED).permutation(n) if split == "train" else np.arange(n)


def sample_key(i: int, path: Path) -> str:
    """Unique, and safe for WebDataset (a key must not contain dots) and tar: index + file stem."""
    return f"{i:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', path.stem)[:64]}"


def convert(root=None, out=None, *, splits=SPLITS, shard_size: int = SHARD_SIZE, max_res_px: int = MAX_RES_PX,
            jpeg_quality: int = JPEG_QUALITY, workers: int | None = None, limit: int | None = None,
            skip_bad: bool = False, progress: bool = True) -> dict:
    """Convert `root` to OUT/{split}-NNNNNN.tar/.idx + OUT/classes.json; return the run's summary dict."""
    check_options(max_res_px, jpeg_quality, workers, limit)
    if shard_size < 1:
        raise DatasetError(f"--shard-size {shard_size}: use 1 or more images per shard (default {SHARD_SIZE})")
    root = sample_root(root, "to_shards")
    dataset = scan(root, splits, limit)
    out = prepare_out(out, root / "shards")
    workers = workers or default_workers()
    finals, bad, written = [], {}, {}
    start_s = time.perf_counter()
    try:
        with PeakRSS() as rss, ProcessPoolExecutor(workers, initializer=worker_setup) as pool:
            for name, split in dataset.splits.items():
                writer, bad[name] = ShardWriter(out, name, shard_size), []
                order = shard_order(name, len(split))
                jobs = ((split.path(i), max_res_px, jpeg_quality) for i in order)
                results = ordered_map(pool, encode, jobs, window=8 * workers)
                for i, (jpg, why) in zip(order.tolist(), tqdm(results, total=len(split), unit="img",
                                                              desc=f"to_shards {name}", disable=not progress)):
                    if jpg is None:
                        bad[name].append((split.rel(i), why))
                    else:
                        writer.add(sample_key(i, split.path(i)), jpg, int(split.labels[i]))
                finals += writer.close()
                written[name] = len(split) - len(bad[name])
            if any(bad.values()) and not skip_bad:
                raise bad_files_error(bad)
            for name, n in written.items():
                if n == 0:
                    raise DatasetError(f"none of the images in {root}/{name} can be decoded "
                                       f"(first: {bad[name][0][0]}: {bad[name][0][1]}): nothing to write")
            publish_with_manifest(finals, out, dataset, bad,
                                  keep=lambda n: not n.startswith(tuple(f"{s}-" for s in dataset.splits)))
            for name in dataset.splits:  # shards of an earlier, larger run would be read as part of this one
                for stale in {p for ext in ("tar", "idx", "crc") for p in out.glob(f"{name}-[0-9]*.{ext}")} - set(finals):
                    stale.unlink()
    finally:
        for final in finals:  # after a failure nothing half-written stays behind; after publish, a no-op
            partial_path(final).unlink(missing_ok=True)
    return summarize("to_shards", dataset, written, bad, out, workers, start_s, rss)


def build_parser():
    p = common_parser(__doc__)
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, metavar="N",
                   help=f"images per shard (default {SHARD_SIZE}: ~70 MB shards at the default resolution "
                        "and quality; more, smaller shards spread better over workers and GPUs)")
    p.epilog = ("Output: OUT/train-000000.tar + .idx, ..., OUT/val-000000.tar + .idx, OUT/classes.json "
                "(OUT defaults to DATASET/shards/).")
    return p


def main(argv=None):
    a = parse_with_preset(build_parser(), argv)
    return convert(a.dataset, a.out, splits=a.splits, shard_size=a.shard_size, max_res_px=a.max_res_px,
                   jpeg_quality=a.jpeg_quality, workers=a.workers, limit=a.limit, skip_bad=a.skip_bad)


if __name__ == "__main__":
    run_command(main)
