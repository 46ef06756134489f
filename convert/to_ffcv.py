"""Pack an ImageNet-layout folder into FFCV .beton files.

    python convert/to_ffcv.py DATASET [--out DIR] [--max-resolution 512] [--write-mode jpg] [--skip-bad]

Writes OUT/train.beton and OUT/val.beton (fields `image`: RGBImageField, `label`: IntField, in
scan order: sorted class folders, then sorted file names) and OUT/classes.json (class folder
names in label order, as torchvision's ImageFolder). OUT defaults to DATASET/ffcv/. With no
DATASET, the built-in sample dataset is built and used.
"""
import multiprocessing.util
import time
from functools import partial
from pathlib import Path

import numpy as np

from convert.cli import check_options, common_parser, default_workers, parse_with_preset, summarize
from convert.images import JPEG_QUALITY, MAX_RES_PX, BadImage, load_image, worker_setup
from convert.make_sample import sample_root
from convert.publish import bad_files_error, partial_path, prepare_out, publish_with_manifest
from core.dataset import SPLITS, scan
from core.errors import DatasetError, run_command
from core.memory import PeakRSS

WRITE_MODES = ("jpg", "raw", "smart", "proportion")
SMART_THRESHOLD_PX = 256 * 256  # 'smart': JPEG for images with more pixels than this, raw below


class _Images:
    """What FFCV's writer processes index: (RGB image, label). A bad file is logged, not raised:
    an exception in a worker makes FFCV 1.0.2's writer wait forever for the missing images."""

    def __init__(self, split, max_res_px: int, bad_log: Path):
        self.split, self.max_res_px, self.bad_log = split, max_res_px, bad_log
        self._set_up = False
        # Set each writer process up as soon as it is forked, not at its first image: a process
        # still waiting for its first chunk when the converter is SIGKILLed would wait forever.
        multiprocessing.util.register_after_fork(self, _Images._worker_setup)

    def _worker_setup(self):
        if not self._set_up:
            worker_setup()
            self._set_up = True

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        self._worker_setup()  # already done where the writer forks; this covers other start methods
        # 'proportion' mode draws np.random.rand() per image inside FFCV: seeding with the index
        # makes which images are stored as JPEG depend on the image, not on worker timing.
        np.random.seed(i)
        try:
            img = load_image(self.split.path(i), self.max_res_px)
        except BadImage as e:
            with open(self.bad_log, "a") as f:  # one short O_APPEND write per line: safe across workers
                f.write(f"{i}\t{str(e).replace(chr(10), ' ')}\n")
            img = np.zeros((1, 1, 3), np.uint8)  # placeholder; a split with bad files is rewritten or not published
        return img, int(self.split.labels[i])


def _write(split, path: Path, fields, max_res_px: int, workers: int, indices, progress: bool) -> dict:
    """Write one .beton; return {index: reason} for the files that could not be decoded."""
    import ffcv.writer  # imported here: it takes seconds (numba), and --help or a bad path should not wait

    bad_log = partial_path(path.parent / f"{split.name}.bad")
    bad_log.unlink(missing_ok=True)
    n = len(split) if indices is None else len(indices)
    # The largest sample must fit in one page, or the writer process dies (and the writer hangs):
    # a raw max_res_px^2 image, with room for a JPEG that came out bigger than the raw pixels.
    page_size = 1 << max(23, int(2 * 3 * max_res_px ** 2 - 1).bit_length())
    writer = ffcv.writer.DatasetWriter(str(path), fields, page_size=page_size, num_workers=workers)
    original_tqdm = ffcv.writer.tqdm  # FFCV's progress bar, relabelled: images/s and ETA per split
    ffcv.writer.tqdm = partial(original_tqdm, unit="img", desc=f"to_ffcv {split.name}", disable=not progress)
    try:
        writer.from_indexed_dataset(_Images(split, max_res_px, bad_log), indices=indices,
                                    chunksize=max(1, min(100, n // (4 * workers))))
    finally:
        ffcv.writer.tqdm = original_tqdm
    bad = {}
    if bad_log.exists():
        for line in bad_log.read_text().splitlines():
            i, why = line.split("\t", 1)
            bad[int(i)] = why
        bad_log.unlink()
    return bad


def convert(root=None, out=None, *, splits=SPLITS, max_res_px: int = MAX_RES_PX,
            jpeg_quality: int = JPEG_QUALITY, write_mode: str = "jpg", compress_probability: float = 0.5,
            workers: int | None = None, limit: int | None = None, skip_bad: bool = False,
            progress: bool = True) -> dict:
    """Convert `root` to OUT/{split}.beton + OUT/classes.json; return the run's summary dict."""
    check_options(max_res_px, jpeg_quality, workers, limit)
    if write_mode not in WRITE_MODES:
        raise DatasetError(f"--write-mode {write_mode}: use one of {', '.join(WRITE_MODES)}")
    if not 0 <= compress_probability <= 1:
        raise DatasetError(f"--compress-probability {compress_probability}: use a number in 0..1")
    root = sample_root(root, "to_ffcv")
    dataset = scan(root, splits, limit)
    out = prepare_out(out, root / "ffcv")
    workers = workers or default_workers()
    from ffcv.fields import IntField, RGBImageField
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=None,  # resized by load_image
                                     smart_threshold=SMART_THRESHOLD_PX * 3, jpeg_quality=jpeg_quality,
                                     compress_probability=compress_probability),
              "label": IntField()}
    finals = [out / f"{name}.beton" for name in dataset.splits]
    start_s = time.perf_counter()
    try:
        with PeakRSS() as rss:
            bad, written = {}, {}
            for name, split in dataset.splits.items():
                path = partial_path(out / f"{name}.beton")
                found = _write(split, path, fields, max_res_px, workers, None, progress)
                bad[name] = [(split.rel(i), why) for i, why in sorted(found.items())]
                if skip_bad and len(found) == len(split):
                    raise DatasetError(f"none of the {len(split)} images in {root}/{name} can be decoded "
                                       f"(first: {bad[name][0][0]}: {bad[name][0][1]}): nothing to write")
                if found and skip_bad:
                    # FFCV needs the image count before it starts, so the good images are written
                    # again (only when some file is bad).
                    good = [i for i in range(len(split)) if i not in found]
                    _write(split, path, fields, max_res_px, workers, good, progress)
                written[name] = len(split) - len(found)
            if any(bad.values()) and not skip_bad:
                raise bad_files_error(bad)
            publish_with_manifest(finals, out, dataset, bad, keep=lambda name: True)
    finally:
        # After a failure nothing half-written stays behind; after publish, a no-op.
        for final in finals + [out / f"{name}.bad" for name in dataset.splits]:
            partial_path(final).unlink(missing_ok=True)
    return summarize("to_ffcv", dataset, written, bad, out, workers, start_s, rss)


def build_parser():
    p = common_parser(__doc__)
    p.add_argument("--write-mode", choices=WRITE_MODES, default="jpg",
                   help="how images are stored (default jpg). jpg: JPEG at --jpeg-quality, the smallest "
                        "files (~70 KB/image on the sample dataset), decoded at load time like the shards; "
                        "raw: uncompressed pixels, no decoding at load time but 5-10x the disk (a 500x375 "
                        "image is 563 KB raw); "
                        f"smart: JPEG for images over {SMART_THRESHOLD_PX} pixels (256x256), raw for "
                        "smaller ones; proportion: each image JPEG with probability "
                        "--compress-probability, raw otherwise (FFCV's ImageNet recipe: 0.5)")
    p.add_argument("--compress-probability", type=float, default=0.5, metavar="P",
                   help="with --write-mode proportion, the fraction of images stored as JPEG, 0..1 "
                        "(default 0.5); the choice is fixed per image, so reruns give the same files")
    p.epilog = "Output: OUT/train.beton, OUT/val.beton, OUT/classes.json (OUT defaults to DATASET/ffcv/)."
    return p


def main(argv=None):
    a = parse_with_preset(build_parser(), argv)
    return convert(a.dataset, a.out, splits=a.splits, max_res_px=a.max_res_px, jpeg_quality=a.jpeg_quality,
                   write_mode=a.write_mode, compress_probability=a.compress_probability, workers=a.workers,
                   limit=a.limit, skip_bad=a.skip_bad)


if __name__ == "__main__":
    run_command(main)
