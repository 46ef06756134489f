"""What both converters share: the scan of an ImageNet-layout folder, image decoding and
validation, the max-resolution resize, atomic publishing, peak-memory measurement and the
command-line options they have in common.

    DATASET/train/<class>/<image>   DATASET/val/<class>/<image>

Not a script: `python convert/to_ffcv.py` and `python convert/to_shards.py` use it.
"""
import argparse
import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import psutil
from PIL import Image, ImageFile

# Defaults shared by both converters (and the benchmark), so .beton files and shards hold the same pixels.
MAX_RES_PX = 512
JPEG_QUALITY = 90
SPLITS = ("train", "val")
# torchvision's ImageFolder list, so a converted split holds exactly the files ImageFolder would load.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

MAX_RES_HELP = (
    f"longest image side kept, in px (default {MAX_RES_PX}); larger images are shrunk (cv2 INTER_AREA, "
    "the filter FFCV uses), smaller ones are kept as they are. Why 512: most ImageNet photos are "
    "500x375 or 500x333, so 512 keeps them at native resolution (FFCV's ImageNet recipe used 500). "
    "Training at 224 px crops boxes down to 8%% of the image area (RandomResizedCrop) and scales "
    "them up to 224: at 512x384 such a box is still ~125 px wide; at 256 it would be ~60 px and blurry."
)


class DatasetError(SystemExit):
    """A predictable problem with the input or the options: one message that says what to do, no traceback."""


class BadImage(Exception):
    """An image file that cannot be decoded completely."""


@dataclass
class Split:
    name: str
    root: Path
    # Relative paths as one numpy bytes array, not a list of str: forked workers read it without
    # touching refcounts, so it is never copied into each worker (1.28 M paths ~ 50 MB once).
    files: np.ndarray
    labels: np.ndarray  # int32, index into Dataset.classes

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.files[i])

    def rel(self, i: int) -> str:
        """The file as a user finds it under the dataset root, e.g. train/n01440764/x.JPEG."""
        return f"{self.name}/{os.fsdecode(self.files[i])}"


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    splits: dict[str, Split]
    ignored: Counter  # non-image files left out, by extension (or by name for dotfiles like .DS_Store)


def class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())  # ImageFolder.find_classes


def _kind(name: str) -> str:
    return os.path.splitext(name)[1].lower() or name


def scan(root, splits=SPLITS, limit: int | None = None) -> Dataset:
    """List every image of `splits` in ImageFolder order (sorted classes, then sorted paths), with labels.

    Raises DatasetError for a missing or empty folder, a missing split, class folders that differ
    between splits, and class folders without images. `limit` keeps the first N images per split.
    """
    root = Path(root)
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (ImageNet layout)"
    if not root.exists():
        raise DatasetError(f"no such folder: {root}: pass the dataset root, the folder that holds train/ and val/")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder: pass the dataset root that holds train/ and val/")
    if not any(root.iterdir()):
        raise DatasetError(f"{root} is empty: {layout}; try `python convert/make_sample.py {root}` for a sample")
    if not (root / "train").is_dir():
        raise DatasetError(f"no train/ folder in {root}: {layout}")
    classes = class_dirs(root / "train")
    if not classes:
        raise DatasetError(f"{root}/train has no class folders: {layout}")
    # val/ is checked whenever it exists, so labels mean the same in every split ever converted.
    for name in dict.fromkeys([*splits, "val"]):
        split_dir = root / name
        if not split_dir.is_dir():
            if name in splits:
                raise DatasetError(f"no {name}/ folder in {root}: add it, or pass --splits "
                                   f"{','.join(s for s in splits if s != name) or 'train'}")
            continue
        theirs = class_dirs(split_dir)
        if theirs != classes:
            only_train = sorted(set(classes) - set(theirs))
            only_other = sorted(set(theirs) - set(classes))
            raise DatasetError(f"train/ and {name}/ must have the same class folders: "
                               f"only in train/: {', '.join(only_train) or '-'}; "
                               f"only in {name}/: {', '.join(only_other) or '-'}")

    ignored, empty, out = Counter(), [], {}
    for name in splits:
        split_dir = root / name
        ignored.update(_kind(e.name) for e in os.scandir(split_dir) if not e.is_dir())
        files, labels = [], []
        for label, cls in enumerate(classes):
            before = len(files)
            for folder, _, names in sorted(os.walk(split_dir / cls, followlinks=True)):  # ImageFolder's walk
                for fname in sorted(names):
                    if fname.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(os.fsencode(os.path.relpath(os.path.join(folder, fname), split_dir)))
                    else:
                        ignored[_kind(fname)] += 1
            if len(files) == before:
                empty.append(f"{name}/{cls}")
            labels += [label] * (len(files) - before)
        if limit is not None:
            files, labels = files[:limit], labels[:limit]
        out[name] = Split(name, split_dir, np.array(files, dtype=bytes), np.array(labels, dtype=np.int32))
    if empty:
        raise DatasetError(f"class folders with no images in {root}: {', '.join(empty)}: "
                           f"add images or remove the folder (from every split)")
    return Dataset(root, classes, out, ignored)


def load_rgb(path) -> np.ndarray:
    """Decode any image file to H x W x 3 uint8 RGB, the way ImageFolder does (PIL, .convert('RGB')).

    PIL reads the file's content, not its name, so a PNG named .JPEG decodes as PNG; CMYK
    (Adobe-inverted too) and grayscale JPEGs become RGB. Anything incomplete raises BadImage.
    """
    # Another import may have set this; with it True, PIL pads a truncated JPEG with grey and
    # returns it as a valid image. The converters must reject such files instead.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # every way a file can fail to decode is a bad file, reported with its reason
        raise BadImage(f"{type(e).__name__}: {e}") from None


def resize_max(img: np.ndarray, max_res_px: int) -> np.ndarray:
    """Shrink so the longest side is max_res_px; never enlarge. The rule and filter of FFCV's
    RGBImageField (size truncated to int, cv2 INTER_AREA), so a .beton and the shards agree."""
    h, w = img.shape[:2]
    scale = max_res_px / max(h, w)
    if scale >= 1:
        return img
    size = (max(1, int(w * scale)), max(1, int(h * scale)))  # (width, height), as cv2 wants
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def load_image(path, max_res_px: int) -> np.ndarray:
    """The pixels a converter stores for `path`: decoded to RGB, then shrunk to max_res_px."""
    return resize_max(load_rgb(path), max_res_px)


def worker_setup():
    """Run once in each worker process: one OpenCV thread (the parallelism is the processes), and
    die with the parent, so a SIGKILLed converter (OOM killer, kill -9) leaves no orphans behind."""
    cv2.setNumThreads(1)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        # The parent died before prctl took effect, and we were reparented to init or a subreaper.
        parent = multiprocessing.parent_process()
        if os.getppid() == 1 or (parent is not None and os.getppid() != parent.pid):
            os._exit(1)


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


# --- publishing: every output is written as OUT/.<name>.partial, then renamed in place -------------

def partial_path(final: Path) -> Path:
    """Hidden and suffixed, so no loader's glob (*.beton, train-*.tar) ever picks up a half-written file."""
    return final.with_name(f".{final.name}.partial")


def prepare_out(out, default: Path) -> Path:
    """Create the output folder, check it is writable, and remove partials left by a killed run."""
    path = Path(out) if out else default
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}.partial"
        probe.touch()
        probe.unlink()
    except OSError as e:
        hint = "pass --out DIR to write elsewhere" if not out else "pass a writable folder to --out"
        raise DatasetError(f"cannot write to {path} ({e.strerror or e}): {hint}") from None
    for stale in path.glob(".*.partial"):
        stale.unlink()
    return path


def write_partial(final: Path, text: str) -> Path:
    tmp = partial_path(final)
    tmp.write_text(text)
    return tmp


def publish(final_paths, out: Path, dataset: Dataset, bad: dict):
    """Rename every partial to its final name, with classes.json and skipped.txt (or remove a stale one).

    Called only when everything is written, so a failed or killed run publishes nothing. Each
    rename is atomic; data is flushed to disk first so a crash cannot publish a hollow file.
    """
    final_paths = list(final_paths) + [out / "classes.json"]
    write_partial(out / "classes.json", json.dumps(dataset.classes) + "\n")
    skipped = [f"{rel}\t{why}" for split_bad in bad.values() for rel, why in split_bad]
    if skipped:
        final_paths.append(out / "skipped.txt")
        write_partial(out / "skipped.txt", "\n".join(skipped) + "\n")
    for final in final_paths:
        fd = os.open(partial_path(final), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial_path(final), final)
    if not skipped:
        (out / "skipped.txt").unlink(missing_ok=True)  # left by an earlier --skip-bad run


def bad_files_error(bad: dict) -> DatasetError:
    lines = [f"  {rel}: {why}" for split_bad in bad.values() for rel, why in split_bad]
    return DatasetError(f"{len(lines)} image files cannot be decoded; nothing was written. Fix or delete "
                        f"them, or pass --skip-bad to leave them out (then listed in OUT/skipped.txt):\n"
                        + "\n".join(lines))


# --- measuring and reporting -------------------------------------------------------------------

class PeakRSS:
    """Peak memory of this process and all its descendants, summed over processes.

    Two sums: RSS (sampled every 0.1 s; counts pages shared between processes, such as libraries
    and memory inherited through fork, once per process, so it overstates) and PSS (each shared
    page split among its sharers, so the sum is what the tree really holds; sampled every 1 s
    because the kernel takes ~10 ms per process to compute it).
    """

    def __init__(self, interval_s: float = 0.1, pss_every: int = 10):
        self.interval_s, self.pss_every = interval_s, pss_every
        self.peak_rss_bytes = self.peak_pss_bytes = 0
        self._stop = threading.Event()

    def _sample(self, pss: bool):
        me = psutil.Process()
        rss = pss_total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                rss += p.memory_info().rss
                pss_total += p.memory_full_info().pss if pss else 0
            except psutil.Error:  # exited between listing and reading
                pass
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss_total)

    def _run(self):
        n = 0
        while not self._stop.wait(self.interval_s):
            n += 1
            self._sample(pss=n % self.pss_every == 0)

    def __enter__(self):
        self._sample(pss=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / 2**20

    @property
    def peak_pss_mb(self) -> float:
        return self.peak_pss_bytes / 2**20


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


def _split_list(text: str) -> tuple:
    return tuple(s for s in text.split(",") if s)


def common_parser(doc: str) -> argparse.ArgumentParser:
    """The options both converters take, with their help text in one place."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default=None,
                   help="dataset root holding train/<class>/<image> and val/<class>/<image> "
                        "(default: build and use the built-in sample dataset)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: a folder inside DATASET, named below)")
    p.add_argument("--max-resolution", type=int, default=MAX_RES_PX, dest="max_res_px", metavar="PX",
                   help=MAX_RES_HELP)
    p.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY, metavar="Q",
                   help=f"quality of the stored JPEGs, 1..100 (default {JPEG_QUALITY}, as FFCV's ImageNet recipe)")
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
