"""FFCV loader: reads the converter's .beton files with FFCV's own Loader.

Decoding, RandomResizedCrop / CenterCrop and flipping run in FFCV's JIT-compiled threads. The
first epoch pays numba's compile: `first_batch_s` carries it so the trainer logs it apart from
the img/s figure.

set_resolution sets the decoder's output size, as ffcv-imagenet's progressive resizing does.
That needs no recompile in FFCV 1.0.2: each epoch's iterator allocates its buffers from the
decoders' declared sizes (Graph.allocate_memory), and the compiled code takes every size from
those buffers.

Train order: FFCV's Loader takes any TraversalOrder, so it is given the trainer's own
(common.epoch_indices: the same images at global step k whatever the world size, each rank
its part, starting at set_epoch's start_step without reading what it skips) rather than FFCV's
distributed order (DistributedSampler's, which depends on the world size). quasi_random
(FFCV's page-wise order, for datasets larger than RAM) stays FFCV's own, on one rank only; a
resume starts it at its step by cutting that epoch's order, again without reading the rest.

Options: os_cache (bool, default True: the OS page cache holds the file, best when the dataset
fits in RAM), order ("random" | "quasi_random"; quasi_random only on one rank), beton_dir (where
the .beton files are; default DATA/ffcv).
"""
import os
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order import QuasiRandom
from ffcv.traversal_order.base import TraversalOrder

from core.dataset import check_class_map, read_class_map
from core.errors import LoaderError
from loaders.common import (RRC_RATIO, RRC_SCALE, LoaderSpec, check_resolution, check_start_step,
                            epoch_indices, timed_epoch)
from storage.cache import node_cache



class _EpochOrder(TraversalOrder):
    """This rank's samples of an epoch from global step `start_step` on: common.epoch_indices
    ("random"), or FFCV's QuasiRandom order cut at that step ("quasi_random", one rank)."""

    def __init__(self, spec: LoaderSpec, num_samples: int):
        self.spec, self.num_samples, self.start_step, self.quasi = spec, num_samples, 0, None

    def __call__(self, loader):  # FFCV 1.0.2 calls the order instance it is given with the Loader
        super().__init__(loader)
        if self.spec.options.order == "quasi_random":
            self.quasi = QuasiRandom(loader)
        return self

    def sample_order(self, epoch: int):
        if self.quasi is not None:
            return self.quasi.sample_order(epoch)[self.start_step * self.spec.batch_size:]
        return epoch_indices(self.num_samples, self.spec, epoch, self.start_step).astype(np.uint64)


def beton_path(spec: LoaderSpec) -> Path:
    cache = node_cache(spec.data)
    if cache is not None and not spec.options.beton_dir:  # remote: staged whole into the node's cache, checked
        name = f"ffcv/{spec.split}.beton"
        if name not in cache.ready_info()["sizes"]:
            raise LoaderError(f"no {name} under {cache.url}: convert (`python convert/to_ffcv.py DATA`) and publish "
                              f"it (`python convert/publish_remote.py DATA {cache.url}`)")
        return cache.stage(name)
    beton_dir = Path(spec.options.beton_dir or spec.data / "ffcv")
    path = beton_dir / f"{spec.split}.beton"
    if not path.exists():
        raise LoaderError(f"no {path.name} under {beton_dir}: run `python convert/to_ffcv.py {spec.data}`"
                         + (f" --out {beton_dir}" if spec.options.beton_dir else ""))
    return path


class FFCVLoader:
    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        if spec.train and spec.shuffle != "global":
            raise LoaderError(f"--shuffle {spec.shuffle}: --loader ffcv reads one .beton (a remote one is staged "
                              f"whole); use --shuffle global")
        path = beton_path(spec)
        class_map = path.parent / "classes.json"
        if not class_map.exists():
            raise LoaderError(f"no classes.json beside {path}: re-run `python convert/to_ffcv.py {spec.data}`")
        self.classes = check_class_map(read_class_map(class_map), spec.data / spec.split, class_map)
        size = (spec.image_size, spec.image_size)
        if spec.train:
            self.decoder = RandomResizedCropRGBImageDecoder(size, scale=RRC_SCALE, ratio=RRC_RATIO)
            image_ops = [self.decoder, RandomHorizontalFlip()]
        else:
            self.decoder = CenterCropRGBImageDecoder(size, ratio=spec.val_crop_ratio)
            image_ops = [self.decoder]
        on_device = [] if spec.device.type == "cpu" else [ToDevice(spec.device, non_blocking=True)]
        # ToTorchImage after ToDevice: the N x H x W x C buffer is permuted into a channels_last view
        image_ops += [ToTensor(), *on_device, ToTorchImage(channels_last=True)]
        label_ops = [IntDecoder(), ToTensor(), Squeeze(), *on_device]

        if spec.world_size > 1 and spec.options.order == "quasi_random":
            raise LoaderError("--ffcv-order quasi_random does not work in distributed mode: use random")
        # FFCV's numba threads cannot exceed the cores: --workers 16 on a smaller host means all cores.
        threads = min(max(1, spec.workers), os.cpu_count() or 1)
        common = dict(batch_size=spec.batch_size, num_workers=threads,
                      os_cache=spec.options.os_cache,
                      pipelines={"image": image_ops, "label": label_ops}, seed=spec.seed)
        total = self._count(path)
        if spec.train:
            self.order = _EpochOrder(spec, total)  # equal batch counts per rank, as DDP needs
            self.loader = Loader(str(path), order=self.order, drop_last=True, **common)
        else:
            # FFCV's distributed val pads with repeated images; rank::world instead counts each once.
            self.loader = Loader(str(path), order=OrderOption.SEQUENTIAL, drop_last=False,
                                 indices=np.arange(spec.rank, total, spec.world_size, dtype=np.uint64),
                                 **common)
        self.num_samples = len(self.loader) * spec.batch_size if spec.train else len(self.loader.indices)
        self.first_batch_s = None
        self.decoding = f"in {threads} FFCV CPU thread(s)"  # --decode device is refused in FFCVOptions

    @staticmethod
    def _count(path: Path) -> int:
        from ffcv.reader import Reader
        return Reader(str(path)).num_samples

    @property
    def resolution(self) -> int:
        return self.decoder.output_size[0]

    def set_resolution(self, px: int):
        # Read when the next epoch's iterator allocates its buffers (Graph.allocate_memory).
        px = check_resolution(px)
        self.decoder.output_size = (px, px)

    def set_epoch(self, epoch: int, start_step: int = 0):
        # Loader.__iter__ asks the order for epoch `next_epoch` (and len() keeps the whole epoch's).
        self.loader.next_epoch = epoch
        if self.spec.train:
            self.order.start_step = check_start_step(start_step, len(self))

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return timed_epoch(self, ((images, labels.to(torch.int64).reshape(-1))
                                  for images, labels in self.loader))


def build(spec: LoaderSpec) -> FFCVLoader:
    return FFCVLoader(spec)
