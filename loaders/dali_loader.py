"""DALI loader: an NVIDIA DALI pipeline that runs entirely on the CPU.

Train reads the samples in the trainer's order (common.epoch_indices: the images of global step
k the same whatever the world size, each rank its part, a resume starting at its step without
reading what it skips): an external source reads each JPEG's bytes, from the record shards (a
seek to the offset their index files give) or, when no shards exist, from the ImageFolder's
files (labels from our own file list, so they follow the same class map). DALI's readers cannot
be given an order: the webdataset reader shuffles in its own buffer and shards per rank by
position. Val: the readers (`fn.readers.webdataset` with the converter's index files, or
`fn.readers.file`) with DALI's own sharding (contiguous, disjoint), pad_last_batch, and the
iterator's PARTIAL policy drop the padding, so each image is counted once.

Decoding, cropping and flipping are DALI CPU operators in DALI's own threads; no `.gpu()`
anywhere. Option decode "device" (what "auto" picks on CUDA) decodes with DALI's "mixed"
operator instead: nvJPEG, the hardware JPEG engine taking hw_decoder_load of each batch, with
the crop fused into the decode, and the resize and flip on the GPU; nvJPEG's buffers are sized
up front as NVIDIA's DeepLearningExamples size them, so they are not reallocated.

Options: shards_dir (default DATA/shards), source ("auto" | "shards" | "folder"),
decode ("auto" | "cpu" | "device"), prefetch (batches queued ahead, default 2), hw_decoder_load.

Train: one pipeline serves consecutive epochs (its source goes on into the next epoch's order):
building and tearing one down costs ~0.5 s, half of a 400-image epoch. An epoch counts as read
to its end once its last batch is handed out (the trainer asks for exactly len() batches and
never for the end of the iterator). A new one, seeded from (seed, epoch, rank), is built on the
first epoch, when set_epoch does not follow the last epoch read to its end (a repeat, a resume,
an epoch broken off), and when the size changes: the output
size is part of the graph (feeding it in as an input instead would leave the batches already
prefetched at the old size). A resumed run sees the same images at each step as an unbroken one;
its crops come from its own pipeline's random stream.
"""
import os

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from core.dataset import split_index
from core.errors import LoaderError
from loaders.common import (RRC_RATIO, RRC_SCALE, LoaderSpec, check_resolution, check_start_step, epoch_indices,
                            num_batches, timed_epoch, to_device, use_shards, val_resize_px)
from loaders.files import OpenFiles, read_into
from storage.cache import node_cache

MAX_LABEL_DIGITS = 8  # .cls holds the label as ASCII decimal
# nvJPEG's buffers sized for the largest ImageNet image up front (NVIDIA DeepLearningExamples, RN50)
NVJPEG_DEVICE_PADDING_BYTES = 211_025_920
NVJPEG_HOST_PADDING_BYTES = 140_544_512


def _ascii_labels(raw: torch.Tensor) -> torch.Tensor:
    """N x MAX_LABEL_DIGITS zero-padded ASCII digits -> int64 labels."""
    digits = raw.to(torch.int64) - ord("0")
    valid = (digits >= 0) & (digits <= 9)
    labels = torch.zeros(raw.shape[0], dtype=torch.int64)
    for j in range(raw.shape[1]):
        labels = torch.where(valid[:, j], labels * 10 + digits[:, j], labels)
    return labels


class TrainSource:
    """What the train pipeline's external source reads: this rank's (JPEG bytes, label) batches in
    the trainer's order. An object of its own, not the loader's methods: the pipeline holds its
    source, and a source holding the loader closed a reference cycle (loader -> iterator ->
    pipeline -> source -> loader) that only the garbage collector ended, whenever it next ran: once
    inside numba's compilation of an FFCV loader, where DALI's shutdown crashed the interpreter.
    Without it the pipeline ends when the loader drops it."""

    def __init__(self, spec: LoaderSpec, shards, total: int, cache, tar_of, paths=None, labels=None):
        self.spec, self.shards, self.total, self.cache, self.tar_of = spec, shards, total, cache, tar_of
        self.paths, self.labels = paths, labels
        self.tars = [str(t) for t in shards.tars] if shards is not None else None
        self.rows = None  # the shards' sample offsets, read on first use
        self.files = OpenFiles(self.tars) if shards is not None else None  # at most MAX_OPEN_FILES open

    def batches(self, epoch: int, start: int):
        """Endless batches: epoch `epoch` from its step `start`, then each following epoch whole."""
        read = self._shard_sample if self.shards is not None else self._file_sample
        while True:
            for batch in self.indices(epoch, start).reshape(-1, self.spec.batch_size):
                jpegs, labels = zip(*(read(int(i)) for i in batch))
                yield list(jpegs), [np.array([label], dtype=np.int32) for label in labels]
            epoch, start = epoch + 1, 0

    def indices(self, epoch: int, start: int = 0):
        sizes = None if self.tar_of is None else np.bincount(self.tar_of, minlength=len(self.tars))
        return epoch_indices(self.total, self.spec, epoch, start, sizes)

    def _file_sample(self, index: int):
        return np.fromfile(self.paths[index], dtype=np.uint8), self.labels[index]

    def _shard_sample(self, index: int):
        if self.rows is None:
            self.rows = self.shards.samples()  # tar, jpg offset, size, cls offset, size
        tar, jpg_at, jpg_size, cls_at, cls_size = (int(v) for v in self.rows[index])
        if self.cache is not None:  # remote: the tar held under the cache's lock for this read only
            name = f"shards/{self.tars[tar].rsplit('/', 1)[-1]}"
            jpg, cls = self.cache.read(name, [(jpg_at, jpg_size), (cls_at, cls_size)])
            return np.frombuffer(jpg, dtype=np.uint8), int(cls)
        jpg = np.empty(jpg_size, dtype=np.uint8)
        with self.files.open(tar) as fd:
            read_into(fd, memoryview(jpg), jpg_at, self.tars[tar])
            return jpg, int(os.pread(fd, cls_size, cls_at))


class DALILoader:
    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.shards = use_shards(spec)
        self.use_shards = self.shards is not None
        self.decode = "mixed" if spec.options.resolved_decode(spec.device) == "device" else "cpu"
        if self.decode == "mixed" and not (spec.device.type == "cuda" and torch.cuda.is_available()):
            raise LoaderError(f"--decode device: --loader dali decodes on a CUDA device only, not {spec.device} "
                              f"(use --decode cpu, or --loader torchvision, which decodes on any device)")
        if self.use_shards:
            self.classes = self.shards.classes
            self.tars = [str(t) for t in self.shards.tars]
            self.indexes = [str(i) for i in self.shards.indexes]
            self.total = self.shards.count()
            self.cache = node_cache(spec.data)  # a remote dataset's node cache (storage/), else None
            self.tar_of = self.shards.samples()[:, 0] if self.cache is not None or spec.shuffle == "shards" else None
            self.source = TrainSource(spec, self.shards, self.total, self.cache, self.tar_of)
        else:
            index = split_index(spec.data, spec.split)
            self.classes = index.classes
            self.paths = [str(p) for p in index.paths]
            self.labels = np.asarray(index.labels, dtype=np.int32)
            self.total = len(self.paths)
            self.cache, self.tar_of = None, None
            self.source = TrainSource(spec, None, self.total, None, None, self.paths, self.labels)
        self.decoding = (f"on {spec.device} by DALI's mixed decoder (nvJPEG)" if self.decode == "mixed"
                         else f"in {max(1, spec.workers)} DALI CPU thread(s)")
        self.epoch, self.start_step = 0, 0
        self.resolution = spec.image_size
        self.first_batch_s = None
        self.num_samples = len(self) * spec.batch_size if spec.train else self._val_shard_size()
        self._val_iterator, self._val_px = None, None  # the val pipeline's iterator and its size
        self._stream = None  # the live train pipeline's endless iterator
        self._stream_serves = None  # (epoch, px) it can serve next; None: build a new one
        self.builds = 0  # train pipelines built so far (one per run at one size)

    def set_epoch(self, epoch: int, start_step: int = 0):
        self.epoch = epoch
        self.start_step = check_start_step(start_step, len(self)) if self.spec.train else 0

    def set_resolution(self, px: int):
        self.resolution = check_resolution(px)  # the next epoch's pipeline is built at it

    def __len__(self):
        if self.spec.train:
            return num_batches(self.total, self.spec)
        return -(-self._val_shard_size() // self.spec.batch_size)

    def _val_shard_size(self) -> int:
        """DALI's val shards are contiguous ranges, [r * N // W, (r + 1) * N // W), not rank::world."""
        rank, world = self.spec.rank, self.spec.world_size
        return (rank + 1) * self.total // world - rank * self.total // world

    # -- the pipeline ---------------------------------------------------------------------
    def _reader(self, shard_id: int):
        spec = self.spec
        if spec.train:  # this rank's samples in the trainer's order, from (epoch, start_step) on
            return fn.external_source(source=self.source.batches(self.epoch, self.start_step), num_outputs=2,
                                      batch=True, dtype=[types.UINT8, types.INT32])
        sharding = dict(shard_id=shard_id, num_shards=spec.world_size, pad_last_batch=True, name="Reader")
        if self.use_shards:
            jpegs, raw = fn.readers.webdataset(
                paths=self.tars, index_paths=self.indexes, ext=["jpg", "cls"],
                missing_component_behavior="error", random_shuffle=False, **sharding)
            return jpegs, fn.pad(raw, axes=(0,), shape=(MAX_LABEL_DIGITS,), fill_value=0)
        return fn.readers.file(files=self.paths, labels=self.labels.tolist(), random_shuffle=False, **sharding)

    def _seed(self) -> int:
        return int(np.random.SeedSequence([self.spec.seed, self.epoch, self.spec.rank]).generate_state(1)[0] >> 1)

    def _pipeline(self, shard_id: int):
        spec = self.spec
        size = self.resolution
        device_id = (spec.device.index or 0) if self.decode == "mixed" else None

        @pipeline_def(batch_size=spec.batch_size, num_threads=max(1, spec.workers), device_id=device_id,
                      seed=self._seed(), prefetch_queue_depth=spec.options.prefetch,
                      exec_dynamic=True)
        def pipe():
            jpegs, labels = self._reader(shard_id)
            if spec.train:
                images = fn.decoders.image_random_crop(
                    jpegs, device=self.decode, output_type=types.RGB, random_area=list(RRC_SCALE),
                    random_aspect_ratio=list(RRC_RATIO), num_attempts=10, **self._nvjpeg_hints())
                images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                                   antialias=True)
                images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
            else:
                images = fn.decoders.image(jpegs, device=self.decode, output_type=types.RGB, **self._nvjpeg_hints())
                images = fn.resize(images, resize_shorter=val_resize_px(size, spec.val_crop_ratio),
                                   interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop(images, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5)
            return images, labels

        return pipe()

    def _nvjpeg_hints(self) -> dict:
        if self.decode != "mixed":
            return {}
        return dict(device_memory_padding=NVJPEG_DEVICE_PADDING_BYTES, host_memory_padding=NVJPEG_HOST_PADDING_BYTES,
                    hw_decoder_load=self.spec.options.hw_decoder_load)

    def _val_batches(self):
        if self._val_px != self.resolution:
            self._val_iterator = None  # release the old pipeline before building
            if self.cache is not None:  # DALI's own reader opens the tars: staged, kept for the run
                for tar in self.tars:
                    self.cache.stage(f"shards/{tar.rsplit('/', 1)[-1]}")
            pipe = self._pipeline(self.spec.rank)
            pipe.build()
            self._val_iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                                                     auto_reset=True, last_batch_policy=LastBatchPolicy.PARTIAL)
            self._val_px = self.resolution
        return self._val_iterator

    def _train_stream(self):
        """The endless iterator for this epoch: the live one when it just finished the previous epoch
        at this epoch's size and this epoch starts at its beginning, else a new pipeline."""
        if self._stream_serves != (self.epoch, self.start_step, self.resolution):
            self._stream = None  # release the old pipeline's threads and buffers before building
            pipe = self._pipeline(self.spec.rank)
            pipe.build()
            self._stream = iter(DALIGenericIterator(pipe, ["images", "labels"], size=-1))
            self.builds += 1
        self._stream_serves = None  # until this epoch is read to its end
        return self._stream

    def _train_batches(self):
        stream = self._train_stream()
        batches = self._epoch_rest(stream)
        if self.cache is not None:  # the fetcher reads ahead in this order: this epoch's rest, then the next
            upcoming = np.concatenate([self.source.indices(self.epoch, self.start_step),
                                       self.source.indices(self.epoch + 1)])
            batches = self.cache.follow("train", batches, upcoming, self.spec.batch_size, self.tar_of)
        yield from batches

    def _epoch_rest(self, stream):
        for left in range(len(self) - self.start_step, 0, -1):
            batch = next(stream)
            if left == 1:  # the stream now stands at the next epoch's start
                # Noted before the last yield, not after the loop: the trainer asks for exactly
                # len() batches and never resumes this generator past its last one.
                self._stream_serves = (self.epoch + 1, 0, self.resolution)
            yield batch
        if self.start_step == len(self):  # nothing left of this epoch: the stream starts the next
            self._stream_serves = (self.epoch + 1, 0, self.resolution)

    def _batches(self):
        for batch in (self._train_batches() if self.spec.train else self._val_batches()):
            out = batch[0]
            images = out["images"].permute(0, 3, 1, 2)  # N x H x W x C buffer -> channels_last view
            raw = out["labels"]
            labels = _ascii_labels(raw) if self.use_shards and not self.spec.train else raw
            yield to_device(images, labels, self.spec.device)

    def __iter__(self):
        return timed_epoch(self, self._batches())


def build(spec: LoaderSpec) -> DALILoader:
    return DALILoader(spec)

