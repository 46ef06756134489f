"""The fallback loader: needs no conversion, reads the ImageFolder directly (or the record
shards when present: option source "auto" | "shards" | "folder", shards_dir).

Reads, parses and crops a batch at a time (`_Images.__getitems__`, which DataLoader calls with the
whole batch's keys): the batch's bytes are read straight into one buffer, the crop boxes of the
batch are drawn at once in numpy (loaders/crops.py), and the batch is built directly. Decodes with
libjpeg-turbo through TorchCodec (loaders/device_decode.py; PNG, CMYK and grayscale come out RGB),
crops and resizes with transforms v2 on uint8 tensors (no PIL round trip), in DataLoader workers
that persist across epochs. Each box is a function of (seed, epoch, index) alone, not of which
worker, batch or rank reads the sample: a resumed run sees the same crops as an unbroken one. The
boxes follow RandomResizedCrop's distribution, not its draws. The output size travels with each
sample's key from the sampler, because the persistent workers hold their own copies of the
dataset: set_resolution changes what the next epoch's keys carry.

Option decode "device" (what "auto" picks on CUDA): `workers` threads only read each batch's JPEG
bytes, parse their headers and draw their boxes (the same boxes as the host path's); the batch is
decoded, cropped and resized where it trains (loaders/device_decode.py), one batch ahead of the
step. Images nvJPEG's batched decoder does not take (progressive, CMYK, grayscale, PNG) are
decoded by their thread instead and counted in `host_decoded`.
"""
import collections
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms import v2

from core.dataset import split_index
from core.errors import LoaderError
from core.manifest import crc32c
from loaders.common import (LoaderSpec, check_resolution, check_start_step, epoch_indices, ignore_stop_signals,
                            num_batches, pin_if_useful, timed_epoch, to_device, use_shards, val_resize_px)
from loaders.crops import crop_flip_boxes
from loaders.device_decode import DECODER, DeviceStage, decode_error, decode_image, jpeg_header, prefetch
from loaders.files import OpenFiles, file_sizes, read_files, read_into
from storage.cache import by_file, node_cache


class _RandomResizedCropFlip:
    """RandomResizedCrop + RandomHorizontalFlip(0.5) with boxes from loaders/crops.py (the same
    boxes the device path uses), kept in the decoder's H x W x C memory: the crop is made compact
    channels_last before the resize, so the uint8 resize neither repacks its input nor its output
    and the batch collate is a plain copy. v2 on the strided crop returned C x H x W memory, and
    turning that into channels_last batches cost 0.26 ms/image, a seventh of the worker's time."""

    def __init__(self, size: int):
        self.size = size  # px when the call names none

    def __call__(self, image: torch.Tensor, size: int | None, box) -> torch.Tensor:
        """box: (top, left, h, w, flip), from crops.crop_flip_boxes."""
        size = size or self.size
        top, left, h, w, flip = (int(v) for v in box)
        crop = image[:, top:top + h, left:left + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
        out = v2.functional.resize(crop, [size, size], antialias=True)
        return (out.flip(-1) if flip else out)[0]


class _ResizeCenterCrop:
    """v2.Resize(shorter side to size / crop_ratio) + v2.CenterCrop(size), at the size of each call."""

    def __init__(self, size: int, crop_ratio: float):
        self.size, self.crop_ratio = size, crop_ratio  # px when the call names none

    def __call__(self, image: torch.Tensor, size: int | None = None, box=None) -> torch.Tensor:
        size = size or self.size
        resized = v2.functional.resize(image, [val_resize_px(size, self.crop_ratio)], antialias=True)
        return v2.functional.center_crop(resized, [size])


def transforms_for(spec: LoaderSpec):
    """`transform(image, size=spec.image_size, box)`: uint8 C x H x W in (the decoder's H x W x C
    memory), uint8 C x size x size out; box: train's (top, left, h, w, flip) from crops.py, which
    val's ignores (`transform(image)` there)."""
    if spec.train:
        return _RandomResizedCropFlip(spec.image_size)
    return _ResizeCenterCrop(spec.image_size, spec.val_crop_ratio)


class _Images(Dataset):
    """A batch of keys (index, epoch, size) -> one collated batch, read, parsed and cropped as a
    batch (DataLoader calls __getitems__ with the whole batch's keys; so do the loader's threads).

    Host decode: (uint8 N x 3 x S x S images, channels_last, int64 labels, damaged indices).
    Device decode: ((blob, sizes, host_images, params, indices, size), labels, damaged): the
    JPEGs back to back in one uint8 buffer, sizes[i] 0 where sample i comes decoded in
    host_images instead (an image nvJPEG's batched decoder does not take: progressive, CMYK,
    grayscale, PNG), params int64 N x 5 (top, left, h, w, flip; train) or N x 2 (h, w; val).
    Damaged samples (bytes that fail their checksum) are listed last; val leaves them out, train
    fills their slots (see _fill_damaged), so a train batch stays full.

    Every box comes from crops.crop_flip_boxes on (seed, epoch, index): the same for both
    decodes, and whichever worker, batch or rank reads the sample."""

    def __init__(self, transform, seed: int):
        self.transform, self.seed, self.decode_on_device = transform, seed, False
        self.train = isinstance(transform, _RandomResizedCropFlip)
        self.max_bad_samples = 0  # the loader's option: damaged samples it may meet before it stops

    def __getitems__(self, keys):
        indices = np.fromiter((k[0] for k in keys), dtype=np.int64, count=len(keys))
        epochs = np.fromiter((k[1] for k in keys), dtype=np.int64, count=len(keys))  # each key's own
        size = keys[0][2]  # one output size per batch (the sampler's, fixed for an epoch)
        blob, sizes, labels, good = self.read_batch(indices)
        damaged, read = indices[~good].tolist(), indices  # read: the sample whose bytes fill each slot
        if self.train and not good.all():
            blob, sizes, labels, good, read, more = self._fill_damaged(indices, blob, sizes, labels, good)
            damaged += more
        ends = np.cumsum(sizes).tolist()
        spans = [(end - n, end) for end, n, ok in zip(ends, sizes.tolist(), good.tolist()) if ok]
        indices, read, epochs, labels = indices[good], read[good], epochs[good], labels[good]
        if self.decode_on_device:
            return self._bytes_batch(blob, spans, indices, read, epochs, size), torch.from_numpy(labels), damaged
        images = [self._decode(blob[a:b], index) for (a, b), index in zip(spans, read.tolist())]
        return self._crop_batch(images, indices, epochs, size), torch.from_numpy(labels), damaged

    def _fill_damaged(self, indices: np.ndarray, blob: torch.Tensor, sizes: np.ndarray, labels: np.ndarray,
                      good: np.ndarray):
        """Train: each damaged sample's slot gets the next good sample in dataset order (index + 1,
        + 2, ...: in the same shard mostly, a read nearby), its label with it and the slot's own
        crop box (so not the crop it gets in its own slot). Dropping the slot instead shrank the
        batch, and a batch left empty was no step at all: that rank ran one step fewer than the
        others and DDP hung. A function of the data alone, so every worker, rank and resumed run
        fills it alike. At most max_bad_samples + 1 tries per slot: past that many damaged
        samples the run stops.

        -> (blob, sizes, labels, good, read, the damaged samples met on the way)."""
        ends = np.cumsum(sizes)
        pieces = [blob[end - n:end] for end, n in zip(ends.tolist(), sizes.tolist())]
        sizes, labels, good, read = sizes.copy(), labels.copy(), good.copy(), indices.copy()
        met = []
        tries = min(self.max_bad_samples + 1, len(self) - 1)
        for k in np.flatnonzero(~good).tolist():
            for step in range(1, tries + 1):
                candidate = (int(indices[k]) + step) % len(self)
                piece, n, label, ok = self.read_batch(np.array([candidate], dtype=np.int64))
                if not ok[0]:
                    met.append(candidate)
                    continue
                pieces[k], sizes[k], labels[k], good[k], read[k] = piece, n[0], label[0], True, candidate
                break
        return torch.cat(pieces), sizes, labels, good, read, met

    def _boxes(self, indices: np.ndarray, epochs: np.ndarray, heights, widths) -> np.ndarray:
        if self.train:
            return crop_flip_boxes(self.seed, epochs, indices, heights, widths)
        return np.stack([np.asarray(heights, np.int64), np.asarray(widths, np.int64)], 1).reshape(-1, 2)

    def _crop_batch(self, images: list, indices: np.ndarray, epochs: np.ndarray, size: int) -> torch.Tensor:
        """Crop each decoded image into one N x S x S x C buffer (in shared memory inside a worker):
        its N x C x S x S view is channels_last. Stacking then converting copied twice more and
        grew each worker's heap by ~1 GB at 224 px."""
        boxes = self._boxes(indices, epochs, [i.shape[1] for i in images], [i.shape[2] for i in images])
        out = torch.empty((len(images), size, size, 3), dtype=torch.uint8)
        if get_worker_info() is not None:  # in a worker process: to the main one in shared memory
            out.share_memory_()
        for image, box, dst in zip(images, boxes, out):
            dst.copy_(self.transform(image, size, box).permute(1, 2, 0))
        return out.permute(0, 3, 1, 2)

    def _bytes_batch(self, blob: torch.Tensor, spans: list, indices: np.ndarray, read: np.ndarray,
                     epochs: np.ndarray, size: int):
        """indices: each slot's sample (its crop box); read: the sample whose bytes fill it (its name)."""
        view = memoryview(blob.numpy())
        heights, widths, on_device, host_images = [], [], [], []
        for (a, b), index in zip(spans, read.tolist()):
            header = jpeg_header(view[a:b])  # read in place: no copy of the bytes
            if header is not None and header[2]:
                heights.append(header[0])
                widths.append(header[1])
            else:  # decoded here; the batch carries the pixels
                host_images.append(self._decode(blob[a:b], index))
                heights.append(host_images[-1].shape[1])
                widths.append(host_images[-1].shape[2])
            on_device.append(header is not None and header[2])
        sizes = torch.tensor([b - a if ok else 0 for (a, b), ok in zip(spans, on_device)], dtype=torch.int64)
        if int(sizes.sum()) != blob.numel():  # damaged or host-decoded samples inside: keep the rest
            kept = [blob[a:b] for (a, b), ok in zip(spans, on_device) if ok]
            blob = torch.cat(kept) if kept else blob[:0]
        params = torch.from_numpy(self._boxes(indices, epochs, heights, widths))
        return blob, sizes, host_images, params, torch.from_numpy(read), size

    def _decode(self, data: torch.Tensor, index: int) -> torch.Tensor:
        try:
            return decode_image(data)
        except RuntimeError as e:  # name the sample: the trainer's message carries this line
            raise LoaderError(f"{self.name(index)}: cannot decode it ({decode_error(e)})") from None


class _FolderImages(_Images):
    def __init__(self, paths, labels, transform, seed: int):
        super().__init__(transform, seed)
        self.paths, self.labels = [str(p) for p in paths], np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.paths)

    def read_batch(self, indices: np.ndarray):
        """(the files' bytes back to back, sizes, labels, good): every file is good. The sizes come
        from stat, so each file is opened only while it is read: one descriptor per reader thread,
        whatever the batch size (loaders/files.py)."""
        paths = [self.paths[i] for i in indices.tolist()]
        sizes = file_sizes(paths)
        blob = torch.empty(int(sizes.sum()), dtype=torch.uint8)
        read_files(paths, sizes, memoryview(blob.numpy()))
        return blob, sizes, self.labels[indices], np.ones(len(indices), dtype=bool)

    def name(self, index) -> str:
        return self.paths[index]


class _ShardImages(_Images):
    """Reads straight to a sample's bytes inside its tar, by the DALI index's offsets."""

    def __init__(self, shards, transform, seed: int, cache=None):
        super().__init__(transform, seed)
        self.cache = cache  # a remote dataset's node cache (storage/): each tar is held only while read
        self.tars = [str(t) for t in shards.tars]
        self.rows = shards.samples()  # tar, jpg offset, jpg size, cls offset, cls size
        self.crcs = shards.sample_checksums()  # None for shards written before checksums existed
        self.shards, self.names = shards, None
        self.files = OpenFiles(self.tars)  # per process, at most MAX_OPEN_FILES open at once

    def __len__(self):
        return len(self.rows)

    def read_batch(self, indices: np.ndarray):
        """(the JPEGs' bytes back to back, sizes, labels, good): good False where a sample's bytes
        differ from the converter's checksum."""
        rows = self.rows[indices]
        sizes = rows[:, 2].astype(np.int64)
        blob = torch.empty(int(sizes.sum()), dtype=torch.uint8)
        view, starts = memoryview(blob.numpy()), (np.cumsum(sizes) - sizes).tolist()
        labels, good = np.empty(len(rows), dtype=np.int64), np.ones(len(rows), dtype=bool)
        for tar, ks in by_file(rows[:, 0]):  # each tar once, its samples in batch order
            with self._opened(tar) as fd:
                for k in ks:
                    _, jpg_at, jpg_size, cls_at, cls_size = rows[k].tolist()
                    jpg = view[starts[k]:starts[k] + jpg_size]
                    read_into(fd, jpg, jpg_at, self.tars[tar])
                    cls = os.pread(fd, cls_size, cls_at)
                    crcs = None if self.crcs is None else tuple(self.crcs[indices[k]])
                    if crcs is not None and (crc32c(jpg.toreadonly()), crc32c(cls)) != crcs:
                        good[k] = False
                        continue
                    labels[k] = int(cls)
        return blob, sizes, labels, good

    def _opened(self, tar: int):
        """The tar's fd for the block: from the bounded set of open files for local shards, held
        under the cache's lock (waiting for the fetcher first) for a remote dataset's."""
        if self.cache is not None:
            return self.cache.open(f"shards/{os.path.basename(self.tars[tar])}")
        return self.files.open(tar)

    def name(self, index) -> str:
        if self.names is None:  # read from the index files only when a sample needs naming
            self.names = self.shards.sample_names()
        return self.names[index]


class _EpochSampler(Sampler):
    """Yields (index, epoch, size) for this rank's part of the epoch (see common.epoch_indices),
    from global step `start_step` on: a resume starts there without reading what it skips. The
    key tells the worker that serves it the epoch's size. len() is the whole epoch's."""

    def __init__(self, num_samples: int, spec: LoaderSpec, shard_sizes=None):
        self.num_samples, self.spec, self.epoch, self.size = num_samples, spec, 0, spec.image_size
        self.start_step, self.shard_sizes = 0, shard_sizes

    def __iter__(self):
        epoch, size = self.epoch, self.size  # fixed for the whole epoch, whatever is set meanwhile
        indices = self.indices(epoch, self.start_step)
        return ((int(i), epoch, size) for i in indices)

    def indices(self, epoch: int, start_step: int = 0):
        return epoch_indices(self.num_samples, self.spec, epoch, start_step, self.shard_sizes)

    def __len__(self):
        return len(self.indices(self.epoch))


def _whole_batch(batch):
    """DataLoader's collate_fn: __getitems__ already made the batch."""
    return batch


def _threaded(dataset: _Images, batches_of_keys, threads: int, depth: int):
    """dataset.__getitems__ of each batch of keys, in order, made by `threads` threads up to
    `depth` batches ahead."""
    with ThreadPoolExecutor(threads, thread_name_prefix="torchvision-reader") as pool:
        pending = collections.deque()
        try:
            for keys in batches_of_keys:
                pending.append(pool.submit(dataset.__getitems__, keys))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early: drop what is queued
            for future in pending:
                future.cancel()


class TorchvisionLoader:
    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.decode = spec.options.resolved_decode(spec.device)
        shards = use_shards(spec)
        self.cache, shard_sizes = None, None
        if shards is not None:
            self.classes = shards.classes
            self.cache = node_cache(spec.data)
            self.dataset = _ShardImages(shards, transforms_for(spec), spec.seed, self.cache)
            shard_sizes = np.bincount(self.dataset.rows[:, 0], minlength=len(shards.tars))
        else:
            index = split_index(spec.data, spec.split)
            self.classes = index.classes
            self.dataset = _FolderImages(index.paths, index.labels, transforms_for(spec), spec.seed)
        self.sampler = _EpochSampler(len(self.dataset), spec, shard_sizes)
        self.dataset.decode_on_device = on_device = self.decode == "device"
        self.dataset.max_bad_samples = spec.options.max_bad_samples
        self.stage = DeviceStage(spec.device, spec.train, spec.val_crop_ratio, self.dataset.name) if on_device else None
        workers = max(0, spec.workers)
        # decode "device": threads, not worker processes. The host's work is then reads and small
        # arithmetic, which threads share without pickling, queues and shared-memory files per
        # batch: measured on 2 cores, 72-85 us of CPU per image with 1-2 threads against 260 us
        # with 2 DataLoader workers (the host decode stays in processes: the same per core there).
        self.dataloader = None if on_device else DataLoader(
            self.dataset, batch_size=spec.batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=_whole_batch, pin_memory=pin_if_useful(spec.device), drop_last=spec.train,
            persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
            worker_init_fn=ignore_stop_signals,
            # Its own generator: a new iterator draws a worker base seed, and drawing it from the
            # global RNG would shift dropout's stream whenever workers (re)start, e.g. on resume.
            generator=torch.Generator().manual_seed(spec.seed))
        self.num_samples = len(self.sampler)
        self.first_batch_s = None
        self.bad_samples = []  # names of the distinct damaged samples met so far (shards with checksums)
        self.decoding = (f"on {spec.device} in batches ({DECODER}{', nvJPEG' if spec.device.type == 'cuda' else ''})"
                         if on_device else f"in {workers or 'the main'} worker process(es) ({DECODER})")

    def set_epoch(self, epoch: int, start_step: int = 0):
        self.sampler.epoch = epoch
        self.sampler.start_step = check_start_step(start_step, len(self))

    @property
    def resolution(self) -> int:
        return self.sampler.size

    def set_resolution(self, px: int):
        self.sampler.size = check_resolution(px)

    def __len__(self):
        return num_batches(len(self.dataset), self.spec)

    def __iter__(self):
        return timed_epoch(self, self._batches())

    @property
    def host_decoded(self) -> int:
        """decode "device": images decoded by the reader threads instead (not baseline 3-component JPEGs)."""
        return self.stage.host_decoded if self.stage is not None else 0

    def _batches(self):
        if self.stage is not None:
            yield from prefetch(self._host_batches(), self._on_device, self.spec.device)
            return
        for images, labels in self._host_batches():
            yield to_device(images, labels, self.spec.device)

    def _host_batches(self):
        if self.cache is None:
            return self._read_batches()
        # a remote dataset: the node's fetcher reads ahead in this order (this epoch's rest, then
        # the next epoch, so no step waits between epochs), and evicts by it
        upcoming = [self.sampler.indices(self.sampler.epoch, self.sampler.start_step)]
        if self.spec.train:
            upcoming.append(self.sampler.indices(self.sampler.epoch + 1))
        return self.cache.follow(self.spec.split, self._read_batches(), np.concatenate(upcoming),
                                 self.spec.batch_size, self.dataset.rows[:, 0])

    def _read_batches(self):
        if self.dataloader is None:
            keys = BatchSampler(self.sampler, self.spec.batch_size, drop_last=self.spec.train)
            batches = _threaded(self.dataset, keys, max(1, self.spec.workers), 2 * max(1, self.spec.workers))
        else:
            batches = self.dataloader
        for images, labels, damaged in batches:
            if damaged:
                self._skip(damaged)
            if self.spec.train and len(labels) != self.spec.batch_size:  # every rank must run every step
                raise LoaderError(f"{self.dataset.name(damaged[0])}: no good sample to put in its place "
                                  f"within {self.dataset.max_bad_samples + 1} of it: run `python convert/verify.py "
                                  f"{self.spec.data}` to list the damaged samples, and re-convert")
            if len(labels):
                yield images, labels

    def _on_device(self, batch):
        """A host batch of JPEG bytes -> the contract's batch (in prefetch's thread, a batch ahead)."""
        (blob, sizes, host_images, params, indices, size), labels = batch
        return (self.stage(blob, sizes, host_images, params, indices, size),
                labels.to(self.spec.device, non_blocking=True))

    def _skip(self, damaged: list[int]):
        """Count damaged samples (each once, whichever epoch meets it again; train fills their slots,
        val leaves them out); past --max-bad-samples, stop naming the one that went over."""
        for name in map(self.dataset.name, damaged):
            if name in self.bad_samples:
                continue
            self.bad_samples.append(name)
            if len(self.bad_samples) > self.spec.options.max_bad_samples:
                raise LoaderError(f"{self.bad_samples[-1]}: the sample's bytes differ from the converter's "
                                  f"checksum ({len(self.bad_samples)} damaged so far; --max-bad-samples "
                                  f"{self.spec.options.max_bad_samples}): run `python convert/verify.py "
                                  f"{self.spec.data}` to list them, re-convert, or allow skipping more")


def build(spec: LoaderSpec) -> TorchvisionLoader:
    return TorchvisionLoader(spec)

