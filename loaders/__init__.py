"""Loaders: turn a dataset on disk into training batches on the device.

The contract, the same for every loader (tested once for all in tests/test_loaders.py):

    loader = build_loader("ffcv" | "dali" | "torchvision", split="train" | "val", data=ROOT,
                          batch_size=PER_DEVICE, workers=N, image_size=PX, seed=S,
                          device=torch.device(...), rank=R, world_size=W, options={...},
                          val_crop_ratio=0.875)
    loader.set_resolution(px)         # the size of the next epoch's batches (image_size until set)
    loader.set_epoch(e)               # reshuffles reproducibly from (seed, e)
    len(loader)                       # batches per epoch on this rank
    for images, labels in loader:     # images: uint8 N x 3 x H x W, channels_last, on `device`
        x = normalize(images)         # labels: int64 N, on `device`

- Train: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) to S x S, horizontal flip p=0.5;
  each rank gets a disjoint part of the epoch's permutation and the same number of full batches
  (the last partial batch is dropped the same way everywhere, so DDP never waits on a rank).
- Val: resize the shorter side to int(S / val_crop_ratio), center crop S x S. Across all ranks
  every image comes out exactly once: no padding, no dropped tail (ranks may differ by one batch,
  so evaluate with the bare model, not through DDP collectives).
- S is `loader.resolution`: image_size until `set_resolution(px)` sets another, on either split.
  Set it before iterating an epoch (a resolution schedule sets it before each set_epoch); an
  epoch being iterated keeps its size. The loader keeps no history: a resumed run sets the
  epoch's size again from its schedule and gets that epoch's order at that size (torchvision:
  its crops too, bitwise). Each loader sets it its own way: FFCV the decoder's output size, DALI
  a new pipeline when the size changes, torchvision the sampler's keys (its persistent workers
  hold their own copy of the dataset).
- Labels follow the converter's classes.json (the ImageFolder order); a dataset whose class
  folders disagree with it is an error rather than a silent shift of labels.
- A batch is valid until the next few are drawn (FFCV refills its buffers): clone what you keep.
- Normalisation (ImageNet mean/std) is not the loader's job: `normalize` runs on the device.
- Attributes: `classes` (names in label order), `num_samples` (images this rank yields per epoch),
  `first_batch_s` (wall seconds to the first batch of the latest epoch: worker start, JIT),
  `decoding` (where and with what its JPEGs are decoded, for the log: option `decode`, see
  loaders/options.py).

Options: each loader declares its own (loaders/options.py); `options` is a dict of them, and a
key the loader does not have is a LoaderError naming the ones it has.

Adding a loader: one module with `build(spec: LoaderSpec)`, its options class, and a line in
LOADERS below.
"""
import importlib

from core.errors import LoaderError
from loaders.common import IMAGENET_MEAN, IMAGENET_STD, LoaderSpec, normalize  # noqa: F401
from loaders.options import DALIOptions, FFCVOptions, TorchvisionOptions, make_options, options_from_flags

# name -> (module, its options, what to install when its library is missing)
LOADERS = {
    "ffcv": ("loaders.ffcv_loader", FFCVOptions,
             "pip install ffcv==1.0.2 (needs Debian's pkg-config libturbojpeg0-dev libopencv-dev; "
             "`make setup` does both)"),
    "dali": ("loaders.dali_loader", DALIOptions, "pip install nvidia-dali-cuda120==2.4.0 (or `make setup`)"),
    "torchvision": ("loaders.torchvision_loader", TorchvisionOptions,
                    "pip install torchvision==0.29.1 (or `make setup`)"),
}


def build_loader(name: str, options: dict | None = None, **kwargs):
    """Build the loader `name` from the keyword arguments of LoaderSpec (see the contract above)."""
    if name not in LOADERS:
        raise LoaderError(f"--loader {name!r} is not one of {', '.join(LOADERS)}")
    module_name, options_class, install = LOADERS[name]
    spec = LoaderSpec(**kwargs, options=make_options(name, options_class, options or {}))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LoaderError(f"--loader {name}: {e.name or e} is not installed: {install}") from None
    return module.build(spec)


def loader_options(name: str, flags) -> dict:
    """The options of loader `name` that the trainer's parsed flags set (e.g. --ffcv-order)."""
    return options_from_flags(LOADERS[name][1], flags)
