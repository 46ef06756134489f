"""What every loader shares: the builder's arguments, where the converted files are, rank
splitting, the host-to-device copy, and the on-device normalisation."""
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.errors import LoaderError
from core.shards import Shards, find_shards
from storage.cache import node_cache

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_CROP_RATIO = 0.875  # the default val crop: shorter side to size / 0.875, then center crop (224 <- 256)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
SHUFFLES = ("global", "shards")


@dataclass
class LoaderSpec:
    """The builder's arguments, the same for every loader."""
    split: str
    data: Path
    batch_size: int  # per device
    workers: int = 2
    image_size: int = 224  # px at the start; loader.set_resolution(px) changes it per epoch
    val_crop_ratio: float = VAL_CROP_RATIO  # val: the center crop's side / the resized shorter side
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    options: object = None  # the loader's own options (loaders/options.py), made by build_loader
    # the train order (epoch_indices): "global" (one permutation of all samples) or "shards" (the
    # shard list shuffled, then samples within windows of `shuffle_window` shards: a cache smaller
    # than the split holds what a stretch of steps reads; see storage/)
    shuffle: str = "global"
    shuffle_window: int = 8

    def __post_init__(self):
        self.data = Path(self.data)
        self.device = torch.device(self.device)
        if self.split not in ("train", "val"):
            raise LoaderError(f"split must be 'train' or 'val', not {self.split!r}")
        if self.batch_size < 1:
            raise LoaderError(f"batch size per device must be >= 1, got {self.batch_size}")
        self.image_size = check_resolution(self.image_size, "--image-size")
        if self.shuffle not in SHUFFLES:
            raise LoaderError(f"--shuffle {self.shuffle!r}: choose one of {', '.join(SHUFFLES)}")
        if self.shuffle_window < 1:
            raise LoaderError(f"--shuffle-window {self.shuffle_window}: shards per window, at least 1")
        if not 0 < self.val_crop_ratio <= 1:
            raise LoaderError(f"--val-crop-ratio {self.val_crop_ratio}: use a fraction in (0, 1], the crop's "
                              f"share of the resized shorter side (0.875: 224 px from 256)")

    @property
    def train(self) -> bool:
        return self.split == "train"


def check_resolution(px, what: str = "set_resolution") -> int:
    """`px` as an int, or a LoaderError naming `what` set it."""
    if isinstance(px, bool) or int(px) != px or px < 1:
        raise LoaderError(f"{what} {px!r}: a resolution is a whole number of pixels, at least 1")
    return int(px)


def val_resize_px(size_px: int, crop_ratio: float) -> int:
    """Val: the shorter side is resized to this, then the center size_px square is cut (256 -> 224)."""
    return int(size_px / crop_ratio)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x 3 x H x W on the device -> ImageNet-normalised `dtype`, memory format kept."""
    mean, inv_std = _normalize_constants(images.device, dtype)
    return (images.to(dtype) - mean) * inv_std


_NORMALIZE_CONSTANTS = {}  # (device, dtype) -> (mean, 1 / std), both 1 x 3 x 1 x 1 and scaled to 0-255


def _normalize_constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device and dtype: a tensor built from a Python list is a copy from pageable
    host memory, which on CUDA blocks the host until the device has caught up; once per step it
    would keep the host from queueing the next step (and a graphed replay would wait for it)."""
    key = (device, dtype)
    if key not in _NORMALIZE_CONSTANTS:
        mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1) * 255)
        _NORMALIZE_CONSTANTS[key] = (mean, inv_std)
    return _NORMALIZE_CONSTANTS[key]


def use_shards(spec: LoaderSpec) -> Shards | None:
    """The record shards to read (option source: "auto" = when present, "shards", "folder"); for a
    remote dataset (storage/), the ones its manifest lists, fetched into the node's cache as read."""
    if spec.options.source == "folder":
        return None
    cache = node_cache(spec.data)
    if cache is not None and not spec.options.shards_dir:
        shards = cache.shards(spec.split)
        if shards is None and spec.options.source == "shards":
            raise LoaderError(f"{cache.url}: no shards/{spec.split}-*.tar in its manifest: publish them "
                              f"(`python convert/to_shards.py DATA`, then `python convert/publish_remote.py DATA URL`)")
        return shards
    folder = spec.options.shards_dir or spec.data / "shards"
    return find_shards(folder, spec.split, spec.data, required=spec.options.source == "shards")


def epoch_indices(num_samples: int, spec: LoaderSpec, epoch: int, start_step: int = 0,
                  shard_sizes=None) -> np.ndarray:
    """The sample indices this rank reads in `epoch`, from global step `start_step` on.

    Train: one order drawn from (seed, epoch) and the order's settings, the same whatever the world
    size, cut into global batches of batch_size x world_size (the tail that fills none is dropped);
    rank r takes the r-th contiguous batch_size of each. So the images of global step k are the
    same on 1 or N devices with the same global batch, and a resume at step k on another world
    size goes on with exactly the images the unbroken run would have seen. Val: rank::world_size
    in order, so every image appears exactly once across ranks.

    The order: spec.shuffle "global" is a permutation of all samples; "shards" (given
    `shard_sizes`, the samples of each shard in index order) shuffles the shards, then the samples
    within each window of spec.shuffle_window consecutive shards of that list.
    """
    if not spec.train:
        return np.arange(spec.rank, num_samples, spec.world_size)
    if spec.shuffle == "shards":
        if shard_sizes is None:
            raise LoaderError("--shuffle shards: this loader reads no record shards; use --shuffle global")
        order = shard_window_order(np.asarray(shard_sizes, dtype=np.int64), spec.seed, epoch, spec.shuffle_window)
    else:
        order = np.random.default_rng([spec.seed, epoch]).permutation(num_samples)
    steps = num_batches(num_samples, spec)
    by_step = order[:steps * spec.batch_size * spec.world_size].reshape(steps, spec.world_size, spec.batch_size)
    return by_step[start_step:, spec.rank].reshape(-1)


def shard_window_order(shard_sizes: np.ndarray, seed: int, epoch: int, window: int) -> np.ndarray:
    """Every sample once: shards in a random order, then each window of `window` shards' samples
    permuted together. A stretch of steps reads about `window` shards (two where windows meet)."""
    rng = np.random.default_rng([seed, epoch, 1])  # not the global order's stream
    starts = np.cumsum(shard_sizes) - shard_sizes
    shards = rng.permutation(len(shard_sizes))
    parts = []
    for w in range(0, len(shards), window):
        members = np.concatenate([np.arange(starts[s], starts[s] + shard_sizes[s]) for s in shards[w:w + window]])
        parts.append(members[rng.permutation(len(members))])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def num_batches(num_samples: int, spec: LoaderSpec) -> int:
    """Batches per epoch on this rank (see epoch_indices): train, the epoch's global steps."""
    if spec.train:
        return num_samples // (spec.world_size * spec.batch_size)
    mine = len(range(spec.rank, num_samples, spec.world_size))
    return -(-mine // spec.batch_size)


def check_start_step(start_step: int, steps: int) -> int:
    """`start_step` of set_epoch as an int in [0, steps], or a LoaderError."""
    if isinstance(start_step, bool) or int(start_step) != start_step or not 0 <= start_step <= steps:
        raise LoaderError(f"set_epoch start_step {start_step!r}: a global step of the epoch, 0 to {steps}")
    return int(start_step)


def ignore_stop_signals(worker_id: int = 0):
    """A loader worker process's init: SIGTERM and SIGUSR1 are the trainer's to act on, at a step
    boundary (engine/stop.py). torchrun and Slurm send them to every process of the job, workers
    included, and a worker they ended would fail the loader before the step could finish. So the
    worker blocks both and a thread takes them: only a SIGTERM from its own parent (the
    DataLoader's, or multiprocessing's at exit, which then joins it) ends it."""
    stop_signals = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # inherited by the thread below

    def take():
        while True:
            info = signal.sigwaitinfo(stop_signals)
            if info.si_signo == signal.SIGTERM and info.si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=take, name="stop-signals", daemon=True).start()


def pin_if_useful(device: torch.device) -> bool:
    """Pinned host memory only pays when an accelerator copies from it."""
    return device.type != "cpu"


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """Host batch -> device batch: channels_last uint8 images, int64 labels, copied without blocking."""
    images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(torch.int64).reshape(-1)
    if device.type == "cpu":
        return images, labels
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def timed_epoch(owner, batches):
    """Yield `batches`, recording on `owner.first_batch_s` the wall time to the first one
    (worker start-up, JIT compilation): the trainer logs it apart from the img/s figure."""
    start_s = time.perf_counter()
    owner.first_batch_s = None
    for i, batch in enumerate(batches):
        if i == 0:
            owner.first_batch_s = time.perf_counter() - start_s
        yield batch
