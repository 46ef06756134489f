"""The fallback loader: needs no conversion, reads the ImageFolder directly (or the record
shards when present: option source "auto" | "shards" | "folder", shards_dir).

Decodes with libjpeg-turbo through torchvision.io (PNG, CMYK and grayscale come out RGB), crops
with transforms v2 on uint8 tensors (no PIL round trip), and batches in DataLoader workers that
persist across epochs. Augmentation is seeded per sample from (seed, epoch, index), so it does not
depend on which worker drew the sample: a resumed run sees the same crops as an unbroken one.
"""
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from core.dataset import split_index
from loaders.common import (RRC_RATIO, RRC_SCALE, VAL_CROP_RATIO, LoaderSpec, epoch_indices,
                            num_batches, pin_if_useful, timed_epoch, to_device, use_shards)


class _RandomResizedCropFlip:
    """v2.RandomResizedCrop + RandomHorizontalFlip(0.5), the same draws from the same RNG and the
    same pixels, but kept in the decoder's H x W x C memory: the crop is made compact channels_last
    before the resize, so the uint8 resize neither repacks its input nor its output and the batch
    collate is a plain copy. v2 on the strided crop returned C x H x W memory, and turning that
    into channels_last batches cost 0.26 ms/image, a seventh of the worker's time."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, h, w = v2.RandomResizedCrop.get_params(image, scale=list(RRC_SCALE), ratio=list(RRC_RATIO))
        crop = image[:, top:top + h, left:left + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
        out = v2.functional.resize(crop, [self.size, self.size], antialias=True)
        if torch.rand(1) < 0.5:
            out = out.flip(-1)
        return out[0]


def transforms_for(spec: LoaderSpec):
    """uint8 C x H x W in (the decoder's H x W x C memory), uint8 C x S x S out."""
    if spec.train:
        return _RandomResizedCropFlip(spec.image_size)
    return v2.Compose([v2.Resize(int(spec.image_size / VAL_CROP_RATIO), antialias=True),
                       v2.CenterCrop(spec.image_size)])


class _Images(Dataset):
    """Item key (index, epoch) -> (uint8 3 x S x S image, label)."""

    def __init__(self, transform, seed: int):
        self.transform, self.seed = transform, seed

    def __getitem__(self, key):
        index, epoch = key
        data, label = self.read(index)
        image = decode_image(data, mode=ImageReadMode.RGB)
        # The CPU generator alone: torch.manual_seed also queues seeds for every accelerator
        # backend, ~80x the cost, paid per image.
        torch.default_generator.manual_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
        return self.transform(image), label


class _FolderImages(_Images):
    def __init__(self, paths, labels, transform, seed: int):
        super().__init__(transform, seed)
        self.paths, self.labels = paths, labels

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        return read_file(str(self.paths[index])), self.labels[index]


class _ShardImages(_Images):
    """Seeks straight to a sample's bytes inside its tar, by the DALI index's offsets."""

    def __init__(self, shards, transform, seed: int):
        super().__init__(transform, seed)
        self.tars = [str(t) for t in shards.tars]
        self.rows = shards.samples()  # tar, jpg offset, jpg size, cls offset, cls size
        self.files = {}  # per worker process: open tar files

    def __len__(self):
        return len(self.rows)

    def read(self, index):
        tar, jpg_at, jpg_size, cls_at, cls_size = (int(v) for v in self.rows[index])
        f = self.files.get(tar) or self.files.setdefault(tar, open(self.tars[tar], "rb"))
        f.seek(jpg_at)
        jpg = f.read(jpg_size)
        f.seek(cls_at)
        return torch.frombuffer(bytearray(jpg), dtype=torch.uint8), int(f.read(cls_size))

    def __getstate__(self):  # workers open their own file handles
        return {**self.__dict__, "files": {}}


class _EpochSampler(Sampler):
    """Yields (index, epoch) for this rank's part of the epoch (see common.epoch_indices)."""

    def __init__(self, num_samples: int, spec: LoaderSpec):
        self.num_samples, self.spec, self.epoch = num_samples, spec, 0

    def __iter__(self):
        return ((int(i), self.epoch) for i in epoch_indices(self.num_samples, self.spec, self.epoch))

    def __len__(self):
        return len(epoch_indices(self.num_samples, self.spec, self.epoch))


def _collate(items):
    """Stack straight into an N x H x W x C buffer (in shared memory inside a worker): one copy,
    and its N x C x H x W view is channels_last. Stacking then converting copied twice more and
    grew each worker's heap by ~1 GB at 224 px."""
    c, h, w = items[0][0].shape
    out = torch.empty((len(items), h, w, c), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()
    torch.stack([image.permute(1, 2, 0) for image, _ in items], out=out)
    return out.permute(0, 3, 1, 2), torch.tensor([label for _, label in items], dtype=torch.int64)


class TorchvisionLoader:
    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        shards = use_shards(spec)
        if shards is not None:
            self.classes = shards.classes
            self.dataset = _ShardImages(shards, transforms_for(spec), spec.seed)
        else:
            index = split_index(spec.data, spec.split)
            self.classes = index.classes
            self.dataset = _FolderImages(index.paths, index.labels, transforms_for(spec), spec.seed)
        self.sampler = _EpochSampler(len(self.dataset), spec)
        workers = max(0, spec.workers)
        self.dataloader = DataLoader(
            self.dataset, batch_size=spec.batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=_collate, pin_memory=pin_if_useful(spec.device), drop_last=spec.train,
            persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
            # Its own generator: a new iterator draws a worker base seed, and drawing it from the
            # global RNG would shift dropout's stream whenever workers (re)start, e.g. on resume.
            generator=torch.Generator().manual_seed(spec.seed))
        self.num_samples = len(self.sampler)
        self.first_batch_s = None

    def set_epoch(self, epoch: int):
        self.sampler.epoch = epoch

    def __len__(self):
        return num_batches(len(self.dataset), self.spec)

    def __iter__(self):
        device = self.spec.device
        return timed_epoch(self, (to_device(images, labels, device) for images, labels in self.dataloader))


def build(spec: LoaderSpec) -> TorchvisionLoader:
    return TorchvisionLoader(spec)

