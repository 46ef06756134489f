"""FFCV loader: reads the converter's .beton files with FFCV's own Loader.

Decoding, RandomResizedCrop / CenterCrop and flipping run in FFCV's JIT-compiled threads. The
first epoch pays numba's compile: `first_batch_s` carries it so the trainer logs it apart from
the img/s figure.

set_resolution sets the decoder's output size, as ffcv-imagenet's progressive resizing does.
That needs no recompile in FFCV 1.0.2: each epoch's iterator allocates its buffers from the
decoders' declared sizes (Graph.allocate_memory), and the compiled code takes every size from
those buffers.

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

from core.dataset import check_class_map, read_class_map
from core.errors import LoaderError
from loaders.common import RRC_RATIO, RRC_SCALE, LoaderSpec, check_resolution, timed_epoch

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM}


def beton_path(spec: LoaderSpec) -> Path:
    beton_dir = Path(spec.options.beton_dir or spec.data / "ffcv")
    path = beton_dir / f"{spec.split}.beton"
    if not path.exists():
        raise LoaderError(f"no {path.name} under {beton_dir}: run `python convert/to_ffcv.py {spec.data}`"
                         + (f" --out {beton_dir}" if spec.options.beton_dir else ""))
    return path


class FFCVLoader:
    def __init__(self, spec: LoaderSpec):
        self.spec = spec
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

        order = spec.options.order
        distributed = spec.world_size > 1
        if distributed and order == "quasi_random":
            raise LoaderError("--ffcv-order quasi_random does not work in distributed mode: use random")
        # FFCV's numba threads cannot exceed the cores: --workers 16 on a smaller host means all cores.
        threads = min(max(1, spec.workers), os.cpu_count() or 1)
        common = dict(batch_size=spec.batch_size, num_workers=threads,
                      os_cache=spec.options.os_cache,
                      pipelines={"image": image_ops, "label": label_ops}, seed=spec.seed)
        if spec.train:
            # FFCV's distributed mode: DistributedSampler semantics, equal batch counts per rank.
            self.loader = Loader(str(path), order=ORDERS[order], distributed=distributed,
                                 drop_last=True, **common)
        else:
            # FFCV's distributed val pads with repeated images; rank::world instead counts each once.
            total = self._count(path)
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

    def set_epoch(self, epoch: int):
        # FFCV draws epoch e's order from seed + e (DistributedSampler.set_epoch when distributed).
        self.loader.next_epoch = epoch

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return timed_epoch(self, ((images, labels.to(torch.int64).reshape(-1))
                                  for images, labels in self.loader))


def build(spec: LoaderSpec) -> FFCVLoader:
    return FFCVLoader(spec)
