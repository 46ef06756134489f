"""The fallback loader: needs no conversion, reads the ImageFolder directly (or the record
shards when present: option source "auto" | "shards" | "folder", shards_dir).

Decodes with libjpeg-turbo through TorchCodec (loaders/device_decode.py; PNG, CMYK and grayscale
come out RGB), crops with transforms v2 on uint8 tensors (no PIL round trip), and batches in
DataLoader workers that persist across epochs. Augmentation is seeded per sample from (seed, epoch, index), so it does not
depend on which worker drew the sample: a resumed run sees the same crops as an unbroken one.
The output size travels with each sample's key from the sampler, because the persistent workers
hold their own copies of the dataset: set_resolution changes what the next epoch's keys carry.

Option decode "device" (what "auto" picks on CUDA): the workers only read each JPEG's bytes and
draw its crop and flip, from the same per-sample seed as the host path, so the boxes are the
same; the batch is decoded, cropped and resized where it trains (loaders/device_decode.py), one
batch ahead of the step. Images nvJPEG's batched decoder does not take (progressive, CMYK,
grayscale, PNG) are decoded by their worker instead and counted in `host_decoded`.
"""
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms import v2

from core.dataset import split_index
from core.errors import LoaderError
from core.manifest import crc32c
from loaders.common import (RRC_RATIO, RRC_SCALE, LoaderSpec, check_resolution, check_start_step, epoch_indices,
                            ignore_stop_signals, num_batches, pin_if_useful, timed_epoch, to_device, use_shards,
                            val_resize_px)
from loaders.device_decode import DECODER, DeviceStage, decode_error, decode_image, jpeg_header, prefetch


class _RandomResizedCropFlip:
    """v2.RandomResizedCrop + RandomHorizontalFlip(0.5), the same draws from the same RNG and the
    same pixels, but kept in the decoder's H x W x C memory: the crop is made compact channels_last
    before the resize, so the uint8 resize neither repacks its input nor its output and the batch
    collate is a plain copy. v2 on the strided crop returned C x H x W memory, and turning that
    into channels_last batches cost 0.26 ms/image, a seventh of the worker's time."""

    def __init__(self, size: int):
        self.size = size  # px when the call names none

    def __call__(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = size or self.size
        top, left, h, w, flip = self.params(*image.shape[-2:])
        crop = image[:, top:top + h, left:left + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
        out = v2.functional.resize(crop, [size, size], antialias=True)
        return (out.flip(-1) if flip else out)[0]

    @staticmethod
    def params(height: int, width: int) -> list[int]:
        """[top, left, h, w, flip] for an image of height x width, drawn from the global generator:
        what the device path needs, and the same draws, in the same order, as the host path."""
        shape_only = torch.empty(1, dtype=torch.uint8).expand(3, height, width)  # get_params reads the size
        box = v2.RandomResizedCrop.get_params(shape_only, scale=list(RRC_SCALE), ratio=list(RRC_RATIO))
        return [*box, int(torch.rand(1) < 0.5)]


class _ResizeCenterCrop:
    """v2.Resize(shorter side to size / crop_ratio) + v2.CenterCrop(size), at the size of each call."""

    def __init__(self, size: int, crop_ratio: float):
        self.size, self.crop_ratio = size, crop_ratio  # px when the call names none

    def __call__(self, image: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = size or self.size
        resized = v2.functional.resize(image, [val_resize_px(size, self.crop_ratio)], antialias=True)
        return v2.functional.center_crop(resized, [size])


def transforms_for(spec: LoaderSpec):
    """`transform(image, size=spec.image_size)`: uint8 C x H x W in (the decoder's H x W x C
    memory), uint8 C x size x size out."""
    if spec.train:
        return _RandomResizedCropFlip(spec.image_size)
    return _ResizeCenterCrop(spec.image_size, spec.val_crop_ratio)


class _Images(Dataset):
    """Item key (index, epoch, size) -> (uint8 3 x size x size image, label), or (None, index) for
    a sample whose bytes fail their checksum (the batch leaves it out and the loader counts it).

    With decode_on_device: (payload, label, params, index, size), payload being the JPEG's bytes
    (1-D) or, for an image the device decoder does not take, the decoded 3 x H x W image; params
    [top, left, h, w, flip] (train) or [h, w] (val). A damaged sample: (None, .., index, size)."""

    def __init__(self, transform, seed: int):
        self.transform, self.seed, self.decode_on_device = transform, seed, False

    def __getitem__(self, key):
        index, epoch, size = key
        data, label = self.read(index)
        if self.decode_on_device:
            return self._bytes_item(data, label, index, epoch, size)
        if data is None:
            return None, index
        self._seed(index, epoch)
        return self.transform(self._decode(data, index), size), label

    def _bytes_item(self, data, label, index: int, epoch: int, size: int):
        if data is None:
            return None, None, None, index, size
        header = jpeg_header(memoryview(data.numpy()))  # read in place: no copy of the bytes
        if header is not None and header[2]:
            height, width = header[:2]
        else:  # decoded here; the batch carries the pixels
            data = self._decode(data, index)
            height, width = data.shape[-2:]
        self._seed(index, epoch)
        train = isinstance(self.transform, _RandomResizedCropFlip)
        return data, label, self.transform.params(height, width) if train else [height, width], index, size

    def _seed(self, index: int, epoch: int):
        # The CPU generator alone: torch.manual_seed also queues seeds for every accelerator
        # backend, ~80x the cost, paid per image.
        torch.default_generator.manual_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))

    def _decode(self, data: torch.Tensor, index: int) -> torch.Tensor:
        try:
            return decode_image(data)
        except RuntimeError as e:  # name the sample: the trainer's message carries this line
            raise LoaderError(f"{self.name(index)}: cannot decode it ({decode_error(e)})") from None


class _FolderImages(_Images):
    def __init__(self, paths, labels, transform, seed: int):
        super().__init__(transform, seed)
        self.paths, self.labels = paths, labels

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        with open(self.paths[index], "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), self.labels[index]

    def name(self, index) -> str:
        return str(self.paths[index])


class _ShardImages(_Images):
    """Seeks straight to a sample's bytes inside its tar, by the DALI index's offsets."""

    def __init__(self, shards, transform, seed: int):
        super().__init__(transform, seed)
        self.tars = [str(t) for t in shards.tars]
        self.rows = shards.samples()  # tar, jpg offset, jpg size, cls offset, cls size
        self.crcs = shards.sample_checksums()  # None for shards written before checksums existed
        self.shards, self.names = shards, None
        self.files = {}  # per worker process: open tar files

    def __len__(self):
        return len(self.rows)

    def read(self, index):
        tar, jpg_at, jpg_size, cls_at, cls_size = (int(v) for v in self.rows[index])
        f = self.files.get(tar) or self.files.setdefault(tar, open(self.tars[tar], "rb"))
        f.seek(jpg_at)
        jpg = f.read(jpg_size)
        f.seek(cls_at)
        cls = f.read(cls_size)
        if self.crcs is not None and (crc32c(jpg), crc32c(cls)) != tuple(self.crcs[index]):
            return None, None
        return torch.frombuffer(bytearray(jpg), dtype=torch.uint8), int(cls)

    def name(self, index) -> str:
        if self.names is None:  # read from the index files only when a sample needs naming
            self.names = self.shards.sample_names()
        return self.names[index]

    def __getstate__(self):  # workers open their own file handles
        return {**self.__dict__, "files": {}}


class _EpochSampler(Sampler):
    """Yields (index, epoch, size) for this rank's part of the epoch (see common.epoch_indices),
    from global step `start_step` on: a resume starts there without reading what it skips. The
    key tells the worker that serves it the epoch's size. len() is the whole epoch's."""

    def __init__(self, num_samples: int, spec: LoaderSpec):
        self.num_samples, self.spec, self.epoch, self.size = num_samples, spec, 0, spec.image_size
        self.start_step = 0

    def __iter__(self):
        epoch, size = self.epoch, self.size  # fixed for the whole epoch, whatever is set meanwhile
        indices = epoch_indices(self.num_samples, self.spec, epoch, self.start_step)
        return ((int(i), epoch, size) for i in indices)

    def __len__(self):
        return len(epoch_indices(self.num_samples, self.spec, self.epoch))


def _collate(items):
    """Stack straight into an N x H x W x C buffer (in shared memory inside a worker): one copy,
    and its N x C x H x W view is channels_last. Stacking then converting copied twice more and
    grew each worker's heap by ~1 GB at 224 px. Damaged samples are left out; their indices come
    third."""
    damaged = [index for image, index in items if image is None]
    items = [item for item in items if item[0] is not None]
    if not items:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), damaged
    c, h, w = items[0][0].shape
    out = torch.empty((len(items), h, w, c), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()
    torch.stack([image.permute(1, 2, 0) for image, _ in items], out=out)
    return out.permute(0, 3, 1, 2), torch.tensor([label for _, label in items], dtype=torch.int64), damaged


def _collate_bytes(items):
    """decode_on_device items -> ((blob, sizes, host_images, params, indices, size), labels, damaged):
    the batch's JPEGs back to back in one buffer (in shared memory inside a worker), sizes[i] 0
    where sample i comes decoded in host_images instead."""
    damaged = [item[3] for item in items if item[0] is None]
    items = [item for item in items if item[0] is not None]
    jpegs = [payload for payload, *_ in items if payload.dim() == 1]
    blob = torch.empty(sum(j.numel() for j in jpegs), dtype=torch.uint8)
    if get_worker_info() is not None:
        blob.share_memory_()
    if jpegs:
        torch.cat(jpegs, out=blob)
    sizes = torch.tensor([p.numel() if p.dim() == 1 else 0 for p, *_ in items], dtype=torch.int64)
    host_images = [p for p, *_ in items if p.dim() == 3]
    params = torch.tensor([item[2] for item in items], dtype=torch.int64)
    indices = torch.tensor([item[3] for item in items], dtype=torch.int64)
    size = items[0][4] if items else 0
    labels = torch.tensor([item[1] for item in items], dtype=torch.int64)
    return (blob, sizes, host_images, params, indices, size), labels, damaged


class TorchvisionLoader:
    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.decode = spec.options.resolved_decode(spec.device)
        shards = use_shards(spec)
        if shards is not None:
            self.classes = shards.classes
            self.dataset = _ShardImages(shards, transforms_for(spec), spec.seed)
        else:
            index = split_index(spec.data, spec.split)
            self.classes = index.classes
            self.dataset = _FolderImages(index.paths, index.labels, transforms_for(spec), spec.seed)
        self.sampler = _EpochSampler(len(self.dataset), spec)
        self.dataset.decode_on_device = on_device = self.decode == "device"
        self.stage = DeviceStage(spec.device, spec.train, spec.val_crop_ratio, self.dataset.name) if on_device else None
        workers = max(0, spec.workers)
        self.dataloader = DataLoader(
            self.dataset, batch_size=spec.batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=_collate_bytes if on_device else _collate,
            pin_memory=pin_if_useful(spec.device) and not on_device, drop_last=spec.train,
            persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
            worker_init_fn=ignore_stop_signals,
            # Its own generator: a new iterator draws a worker base seed, and drawing it from the
            # global RNG would shift dropout's stream whenever workers (re)start, e.g. on resume.
            generator=torch.Generator().manual_seed(spec.seed))
        self.num_samples = len(self.sampler)
        self.first_batch_s = None
        self.bad_samples = []  # names of the distinct damaged samples left out so far (shards with checksums)
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
        """decode "device": images decoded by the workers instead (not baseline 3-component JPEGs)."""
        return self.stage.host_decoded if self.stage is not None else 0

    def _batches(self):
        if self.stage is not None:
            yield from prefetch(self._host_batches(), self._on_device, self.spec.device)
            return
        for images, labels in self._host_batches():
            yield to_device(images, labels, self.spec.device)

    def _host_batches(self):
        for images, labels, damaged in self.dataloader:
            if damaged:
                self._skip(damaged)
            if len(labels):
                yield images, labels

    def _on_device(self, batch):
        """A host batch of JPEG bytes -> the contract's batch (in prefetch's thread, a batch ahead)."""
        (blob, sizes, host_images, params, indices, size), labels = batch
        return (self.stage(blob, sizes, host_images, params, indices, size),
                labels.to(self.spec.device, non_blocking=True))

    def _skip(self, damaged: list[int]):
        """Count damaged samples (each once, whichever epoch meets it again); past --max-bad-samples,
        stop naming the one that went over."""
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

