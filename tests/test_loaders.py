"""The loader contract (loaders/__init__.py), tested once for every loader on real files:
FFCV .beton files read by FFCV, shards read by DALI's CPU pipeline, JPEGs decoded by torchvision."""
import collections
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from convert.make_sample import make_sample
from core.dataset import split_index
from core.errors import LoaderError, UserError
from loaders import LOADERS, build_loader
from loaders.common import RRC_RATIO, RRC_SCALE, VAL_CROP_RATIO

NAMES = list(LOADERS)
# Every loader, and each source it can read: the contract holds for all of them.
VARIANTS = {"ffcv": ("ffcv", {}),
            "dali-shards": ("dali", {"source": "shards"}), "dali-folder": ("dali", {"source": "folder"}),
            "torchvision-shards": ("torchvision", {"source": "shards"}),
            "torchvision-folder": ("torchvision", {"source": "folder"}),
            # decoded where the batch trains (here the CPU): workers read bytes, the batch is decoded at once
            "torchvision-device": ("torchvision", {"source": "shards", "decode": "device"}),
            "torchvision-folder-device": ("torchvision", {"source": "folder", "decode": "device"})}
SIZE_PX = 32


def _convert(root: Path) -> Path:
    from convert.to_ffcv import convert as to_ffcv
    from convert.to_shards import convert as to_shards
    to_ffcv(root, progress=False, workers=2)
    to_shards(root, progress=False, workers=2, shard_size=7)  # several shards, the last one short
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 classes; 5 val images each: 15 does not divide by 2 ranks x batch 4."""
    root = make_sample(tmp_path_factory.mktemp("loaders"), num_classes=3, train_per_class=8,
                       val_per_class=5, quiet=True)
    return _convert(root)


def _build(variant, root, split, batch_size=4, rank=0, world_size=1, size=SIZE_PX, workers=2,
           val_crop_ratio=VAL_CROP_RATIO, **kw):
    name, options = VARIANTS.get(variant, (variant, {}))
    kw = {**options, **kw}
    return build_loader(name, split=split, data=root, batch_size=batch_size, workers=workers, image_size=size,
                        val_crop_ratio=val_crop_ratio, seed=kw.pop("seed", 0), rank=rank,
                        world_size=world_size, options=kw)


def _folder_histogram(root: Path, split: str) -> dict:
    classes = sorted(p.name for p in (root / split).iterdir())
    return {i: len(list((root / split / c).iterdir())) for i, c in enumerate(classes)}


def _collect(loader):
    """[(label, checksum of the image's pixels)] over one epoch."""
    out = []
    for images, labels in loader:
        for image, label in zip(images, labels):
            out.append((int(label), int(image.to(torch.int64).sum()) * 1_000_003 + int(image[0, 0, 0])))
    return out


def _val_images(loader) -> torch.Tensor:
    return torch.cat([images for images, _ in _epoch(loader)])


def _epoch(loader) -> list:
    """One epoch's batches, copied: FFCV refills its buffers with later batches."""
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.parametrize("name", VARIANTS)
def test_val_yields_every_image_once_with_the_contracts_types(dataset, name):
    loader = _build(name, dataset, "val")
    seen = []
    for images, labels in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, SIZE_PX, SIZE_PX)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and images.device.type == labels.device.type == "cpu"
        seen += labels.tolist()
    assert len(seen) == 15 == loader.num_samples
    assert len(loader) == 4  # ceil(15 / 4): the partial last batch is kept
    assert collections.Counter(seen) == _folder_histogram(dataset, "val")
    assert loader.classes == sorted(p.name for p in (dataset / "val").iterdir())


@pytest.mark.parametrize("name", VARIANTS)
def test_train_batches_are_full_and_the_epoch_order_is_reproducible(dataset, name):
    loader = _build(name, dataset, "train")
    assert len(loader) == 24 // 4
    loader.set_epoch(3)
    first = [labels.tolist() for _, labels in loader]
    assert [len(b) for b in first] == [4] * 6
    loader.set_epoch(3)
    again = [labels.tolist() for _, labels in loader]
    loader.set_epoch(4)
    other = [labels.tolist() for _, labels in loader]
    assert first == again
    assert first != other
    assert loader.first_batch_s is not None and loader.first_batch_s >= 0


def _trainer_epoch(loader, epoch: int) -> list:
    """One epoch read as engine/loop.py's train_one_epoch reads it: set_epoch, then exactly len()
    batches through StepBoundaryLoader, then its close. Never the iterator's end (list() asks for
    it; the trainer does not), so a loader cannot rely on reaching it. The batches copied."""
    from engine.faults import StepBoundaryLoader
    loader.set_epoch(epoch)
    batches = StepBoundaryLoader(loader, epoch)
    out = [tuple(t.clone() for t in batches.next_batch(i)) for i in range(len(loader))]
    batches.close(len(loader))
    return out


@pytest.mark.parametrize("variant", ["dali-shards", "dali-folder"])
def test_dali_keeps_one_pipeline_over_consecutive_epochs(dataset, variant):
    """A DALI pipeline costs ~0.5 s to build and tear down: one serves a run's consecutive epochs
    at one size (its source goes on into the next epoch's order), and each epoch of the stream is
    still one full pass over the data. Read as the trainer reads it (with list(), which also asks
    for the end of each epoch, a loader that noted the epoch's end only there passed here and
    still built a pipeline every epoch in training)."""
    loader = _build(variant, dataset, "train")
    histograms = []
    for epoch, px in enumerate((SIZE_PX, SIZE_PX, SIZE_PX, 48, 48)):
        loader.set_resolution(px)  # the size is part of the graph: 48 needs a new pipeline, once
        batches = _trainer_epoch(loader, epoch)
        assert {tuple(images.shape[1:]) for images, _ in batches} == {(3, px, px)}
        histograms.append(collections.Counter(int(label) for _, labels in batches for label in labels))
        assert loader.builds == 1 + (px == 48), epoch
    assert histograms == [collections.Counter(_folder_histogram(dataset, "train"))] * 5
    _trainer_epoch(loader, 1)  # a repeat (or a resume) starts a new pipeline seeded for that epoch
    assert loader.builds == 3
    loader.set_epoch(2)  # follows the repeat read to its end: the same pipeline
    next(iter(loader))  # broken off after one batch: the next epoch cannot go on from it
    assert loader.builds == 3
    _trainer_epoch(loader, 3)
    assert loader.builds == 4


@pytest.mark.parametrize("variant", ["dali-shards", "dali-folder"])
def test_dali_builds_one_pipeline_for_a_whole_run_of_the_real_training_loop(dataset, variant):
    """Three epochs of engine/loop.py's train_one_epoch on a real model and optimizer: one build."""
    from engine.distributed import Runtime
    from engine.loop import EpochPlan, train_one_epoch
    from engine.optim import OptimizerConfig, build_optimizer
    from engine.precision import Precision
    from engine.step import DeviceInput, TrainStep
    from model import create_model
    cpu = torch.device("cpu")
    loader = _build(variant, dataset, "train")
    model = create_model("mobilenetv3_small_050", num_classes=3).to(memory_format=torch.channels_last)
    step = TrainStep(model, build_optimizer(model, OptimizerConfig(name="sgd", lr=0.01)), Precision(False), cpu)
    steps = len(loader)
    for epoch in range(3):
        loader.set_epoch(epoch)
        plan = EpochPlan(epoch, epoch * steps, steps, lambda _: 0.01, log=lambda _: None, progress=False)
        assert train_one_epoch(step, DeviceInput(), loader, plan, Runtime(cpu))["steps"] == steps
    assert loader.builds == 1


@pytest.mark.parametrize("variant", ["dali-shards", "dali-folder"])
def test_a_dali_loader_dropped_ends_its_pipelines_at_once_without_the_garbage_collector(dataset, variant):
    """The pipelines end when the loader goes, not whenever the collector next runs: once, that was
    inside numba's compilation of a later FFCV loader, and DALI's shutdown there crashed the
    interpreter. Pipeline._pipes is DALI's own register of the pipelines alive (weak references)."""
    import gc

    from nvidia.dali.pipeline import Pipeline

    def alive():
        return sum(ref() is not None for ref in Pipeline._pipes)

    gc.collect()
    before = alive()
    gc.disable()
    try:
        train, val = _build(variant, dataset, "train"), _build(variant, dataset, "val")
        _trainer_epoch(train, 0)
        _epoch(val)
        assert alive() == before + 2
        del train, val
        assert alive() == before
    finally:
        gc.enable()


@pytest.mark.parametrize("name", VARIANTS)
def test_set_resolution_sizes_the_next_epochs_train_batches(dataset, name):
    """A resolution schedule's steps, 48 px then back to 32: each epoch comes out at its own size
    and is still one full pass over the data."""
    loader = _build(name, dataset, "train")
    assert loader.resolution == SIZE_PX
    for epoch, px in enumerate((48, SIZE_PX)):
        loader.set_resolution(px)
        loader.set_epoch(epoch)
        batches = _epoch(loader)
        assert loader.resolution == px
        assert {tuple(images.shape[1:]) for images, _ in batches} == {(3, px, px)}
        assert all(images.is_contiguous(memory_format=torch.channels_last) for images, _ in batches)
        assert collections.Counter(int(label) for _, labels in batches for label in labels) == \
            collections.Counter(_folder_histogram(dataset, "train"))


@pytest.mark.parametrize("variant", ["torchvision-shards", "torchvision-folder"])
def test_torchvision_resolution_reaches_its_persistent_workers(dataset, variant):
    """The workers persist across epochs with their own copy of the dataset: the size must come to
    them with the sampler's keys. The batches equal those of a loader built at that size without
    workers, bit for bit (crops seeded per (seed, epoch, index), whatever the worker)."""
    loader = _build(variant, dataset, "train")
    list(loader)
    pids = [w.pid for w in loader.dataloader._iterator._workers]
    loader.set_resolution(48)
    loader.set_epoch(1)
    got = _epoch(loader)
    assert [w.pid for w in loader.dataloader._iterator._workers] == pids  # the same workers served it
    fresh = _build(variant, dataset, "train", size=48, workers=0)
    fresh.set_epoch(1)
    expected = _epoch(fresh)
    assert len(got) == len(expected) == 6
    for (images, labels), (want_images, want_labels) in zip(got, expected):
        assert images.shape[-1] == 48 and torch.equal(images, want_images) and torch.equal(labels, want_labels)


def _reference_val_crop(path: Path, size: int, crop_ratio: float) -> torch.Tensor:
    """PIL on the original file: shorter side to int(size / crop_ratio) (antialiased bilinear), then
    the centre size x size."""
    image = Image.open(path).convert("RGB")
    scale = int(size / crop_ratio) / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.BILINEAR)
    left, top = round((w - size) / 2), round((h - size) / 2)
    return torch.from_numpy(np.array(image.crop((left, top, left + size, top + size)))).permute(2, 0, 1)


@pytest.mark.parametrize("name", VARIANTS)
def test_val_resolution_and_crop_ratio_give_the_reference_center_crop(dataset, name):
    """Val at another crop ratio, its size set after an epoch at the built one: the same pixels as
    a loader built at that size, and (on 16 px cells, as below) as PIL's resize + centre crop."""
    size, ratio = 128, 0.6
    loader = _build(name, dataset, "val", val_crop_ratio=ratio)
    assert _val_images(loader).shape == (15, 3, SIZE_PX, SIZE_PX)
    loader.set_resolution(size)
    images = _val_images(loader)
    assert images.shape == (15, 3, size, size)
    assert torch.equal(images, _val_images(_build(name, dataset, "val", size=size, val_crop_ratio=ratio)))
    blur = torch.nn.AvgPool2d(16)
    paths = split_index(dataset, "val").paths
    reference = blur(torch.stack([_reference_val_crop(p, size, ratio) for p in paths]).to(torch.float32))
    per_image = (blur(images.to(torch.float32)) - reference).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 3.0, per_image
    # The tolerance tells the ratios apart: the default one's crops are far from these.
    default = blur(torch.stack([_reference_val_crop(p, size, VAL_CROP_RATIO) for p in paths]).to(torch.float32))
    assert (default - reference).abs().mean(dim=(1, 2, 3)).min() > 3.0


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_crop_ratio_or_resolution_names_the_flag(dataset, name):
    for ratio in (0, -0.5, 1.2):
        with pytest.raises(LoaderError, match=f"--val-crop-ratio {ratio}"):
            _build(name, dataset, "val", val_crop_ratio=ratio)
    with pytest.raises(LoaderError, match="--image-size 0"):
        _build(name, dataset, "val", size=0)
    loader = _build(name, dataset, "val", val_crop_ratio=1.0)  # the whole shorter side: allowed
    with pytest.raises(LoaderError, match="set_resolution 0"):
        loader.set_resolution(0)
    assert loader.resolution == SIZE_PX


def test_the_same_val_image_comes_out_of_every_loader_nearly_the_same(dataset):
    size = 128
    blur = torch.nn.AvgPool2d(16)  # compare 8 x 8 cells of 16 x 16 px
    batches = {name: blur(_val_images(_build(name, dataset, "val", size=size)).to(torch.float32))
               for name in NAMES}
    batches["torchvision-folder"] = blur(_val_images(_build("torchvision", dataset, "val", size=size,
                                                            source="folder")).to(torch.float32))
    reference = batches["torchvision-folder"]  # decoded from the original JPEGs
    for name in NAMES:  # the torchvision and DALI loaders read the shards here (source "auto")
        per_image = (batches[name] - reference).abs().mean(dim=(1, 2, 3))
        # FFCV and DALI read the converter's copy (resized to 512 px, re-encoded at quality 90)
        # and place the center crop with their own rounding (up to a pixel) and filters (OpenCV
        # area, DALI and torchvision antialiased linear). Pixel by pixel that costs up to ~15
        # grey levels on these 1/f textures, so the comparison is on 16 px cells, where the
        # loaders agree within ~1.5 levels. Measured on this data, a horizontal flip costs ~14
        # levels, the neighbouring image ~32, and a crop 15% too tight ~7.
        assert per_image.max() < 3.0, (name, per_image)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, root, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = {}
        for name in VARIANTS:
            val = _build(name, root, "val", rank=rank, world_size=2)
            out[(name, "val")] = _collect(val)
            out[(name, "val size")] = (len(val), val.num_samples, sum(1 for _ in val), len(out[(name, "val")]))
            train = _build(name, root, "train", batch_size=5, rank=rank, world_size=2)
            train.set_epoch(1)
            out[(name, "train")] = (len(train), [len(labels) for _, labels in train])
        results[rank] = out
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_see_disjoint_parts_and_every_val_image_exactly_once(dataset):
    single = {name: _collect(_build(name, dataset, "val")) for name in VARIANTS}
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_worker, args=(str(dataset), _free_port(), results), nprocs=2)
        results = dict(results)
    for name in VARIANTS:
        both = results[0][(name, "val")] + results[1][(name, "val")]
        assert len(both) == 15
        assert collections.Counter(both) == collections.Counter(single[name]), name
        for rank in (0, 1):  # len() and num_samples announce what this rank's val epoch yields
            batches_announced, images_announced, batches, images = results[rank][(name, "val size")]
            assert (batches_announced, images_announced) == (batches, images), (name, rank)
        # Train: 24 images over 2 ranks, batch 5 -> 2 full batches on each rank, never 3 on one.
        assert results[0][(name, "train")] == results[1][(name, "train")] == (2, [5, 5]), name


@pytest.fixture(scope="module")
def coordinate_dataset(tmp_path_factory) -> Path:
    """Images whose red channel encodes x and green encodes y, so a crop's box can be read back."""
    root = tmp_path_factory.mktemp("coords")
    h, w = 240, 320
    ys, xs = np.mgrid[0:h, 0:w]
    pixels = np.stack([xs * 255.0 / (w - 1), ys * 255.0 / (h - 1), np.full_like(xs, 128.0)], -1)
    pixels = (pixels + 0.5).astype(np.uint8)
    for split, n in (("train", 48), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n // 2):
                Image.fromarray(pixels).save(root / split / c / f"{c}_{i}.JPEG", quality=95)
    return _convert(root)


def _boxes(images: torch.Tensor, h: int, w: int):
    """Per image: (area fraction, aspect ratio w/h in source pixels, flipped?) read from the pixels."""
    img = images.to(torch.float32)
    left, right = img[:, 0, :, 1].mean(1), img[:, 0, :, -2].mean(1)   # red: x
    top, bottom = img[:, 1, 1, :].mean(1), img[:, 1, -2, :].mean(1)   # green: y
    x0, x1 = torch.minimum(left, right) * (w - 1) / 255, torch.maximum(left, right) * (w - 1) / 255
    y0, y1 = top * (h - 1) / 255, bottom * (h - 1) / 255
    side = images.shape[-1]
    bw = (x1 - x0) * side / (side - 3)  # the columns read sit 1.5 px inside the crop's edges
    bh = (y1 - y0) * side / (side - 3)
    return (bw * bh / (h * w)).numpy(), (bw / bh).numpy(), (left > right).numpy()


def _reference_areas(h, w, n, seed=0):
    from torchvision.transforms import v2
    torch.manual_seed(seed)
    areas = []
    for _ in range(n):
        _, _, ch, cw = v2.RandomResizedCrop.get_params(torch.zeros(3, h, w), list(RRC_SCALE), list(RRC_RATIO))
        areas.append(ch * cw / (h * w))
    return np.array(areas)


@pytest.mark.parametrize("name", VARIANTS)
def test_train_crops_follow_the_random_resized_crop_distribution(coordinate_dataset, name):
    loader = _build(name, coordinate_dataset, "train", batch_size=8, size=48)
    areas, aspects, flips = [], [], []
    for epoch, px in enumerate((48, 32, 48, 32)):  # and after each change of resolution
        loader.set_resolution(px)
        loader.set_epoch(epoch)
        for images, _ in loader:
            a, r, f = _boxes(images, 240, 320)
            areas += list(a)
            aspects += list(r)
            flips += list(f)
    areas, aspects, flips = map(np.array, (areas, aspects, flips))
    assert len(areas) == 192
    # Bounds: 8%..100% of the image, aspect 3/4..4/3 (slack for reading edges off JPEG pixels).
    assert areas.min() > RRC_SCALE[0] * 0.8 and areas.max() < 1.06
    assert aspects.min() > RRC_RATIO[0] * 0.9 and aspects.max() < RRC_RATIO[1] * 1.1
    reference = _reference_areas(240, 320, 4000)
    # The mean and quartiles match torchvision's sampler within ~3 standard errors of 192 draws;
    # a fixed crop, a center crop or a scale range off by 2x fails by far more.
    assert abs(areas.mean() - reference.mean()) < 0.07
    for q in (0.25, 0.5, 0.75):
        assert abs(np.quantile(areas, q) - np.quantile(reference, q)) < 0.1, q
    assert 0.35 < flips.mean() < 0.65  # horizontal flip with p = 0.5


@pytest.mark.parametrize("name", VARIANTS)
def test_a_class_map_that_disagrees_with_the_folders_is_an_error(dataset, tmp_path, name):
    root = tmp_path / "renamed"
    shutil.copytree(dataset, root)
    first = sorted((root / "val").iterdir())[0]
    for split in ("train", "val"):
        (root / split / first.name).rename(root / split / "zzz_renamed")
    with pytest.raises(UserError, match="disagrees"):
        _build(name, root, "val")


def test_missing_converted_files_name_the_converter_command(tmp_path):
    root = make_sample(tmp_path / "raw", num_classes=2, train_per_class=2, val_per_class=1, quiet=True)
    with pytest.raises(UserError, match=r"python convert/to_ffcv.py"):
        _build("ffcv", root, "val")
    for name in ("dali", "torchvision"):
        with pytest.raises(UserError, match=r"python convert/to_shards.py"):
            _build(name, root, "val", source="shards")
    # DALI and torchvision fall back to the ImageFolder when no shards exist, with the same labels.
    for name in ("dali", "torchvision"):
        assert collections.Counter(_collect_labels(_build(name, root, "val"))) == _folder_histogram(root, "val")


def _collect_labels(loader):
    return [label for _, labels in loader for label in labels.tolist()]


def test_an_unknown_loader_names_the_choices():
    with pytest.raises(ValueError, match="ffcv, dali, torchvision"):
        build_loader("pil", split="val", data=".", batch_size=1)


def test_torchvision_train_crop_is_v2s_resized_crop_of_its_box_and_keeps_the_decoders_memory_layout(dataset):
    """Our crop + flip keeps H x W x C memory (so the collate is a plain copy) and must still be
    exactly torchvision v2's resized crop (and flip) of the box loaders/crops.py drew
    (tests/test_crops.py: the boxes follow v2.RandomResizedCrop's distribution)."""
    from torchvision.transforms import v2
    from loaders.crops import crop_flip_boxes
    from loaders.device_decode import decode_image
    from loaders.torchvision_loader import _RandomResizedCropFlip
    ours = _RandomResizedCropFlip(SIZE_PX)
    paths = sorted((dataset / "train").rglob("*.JPEG"))
    images = [decode_image(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)) for path in paths]
    boxes = crop_flip_boxes(0, 0, np.arange(len(images)), [i.shape[1] for i in images], [i.shape[2] for i in images])
    assert 0 < boxes[:, 4].sum() < len(boxes)  # both flipped and unflipped crops
    for image, (top, left, h, w, flip), path in zip(images, boxes.tolist(), paths):
        expected = v2.functional.resized_crop(image, top, left, h, w, [SIZE_PX, SIZE_PX], antialias=True)
        expected = v2.functional.horizontal_flip(expected) if flip else expected
        got = ours(image, SIZE_PX, (top, left, h, w, flip))
        assert torch.equal(got, expected), path
        assert got.permute(1, 2, 0).is_contiguous()


# -- open files ---------------------------------------------------------------------------------
# Files a loader may open beyond what its process holds at the start: MAX_OPEN_FILES shards, the
# reader threads' one file each, and what a DataLoader's worker processes use to hand their batches
# over (queues, shared-memory handles; with 48 that, not the loader, ran out).
FD_HEADROOM = 64


@pytest.fixture(scope="module")
def many_files(tmp_path_factory) -> Path:
    """320 tiny train JPEGs (4 batches of 80) and their record shards, 2 images each: 160 tars."""
    from convert.to_shards import convert as to_shards
    root = tmp_path_factory.mktemp("many_files")
    rng = np.random.default_rng(0)
    for split, n in (("train", 320), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n // 2):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / c / f"{i}.JPEG")
    to_shards(root, progress=False, workers=2, shard_size=2)
    return root


@pytest.mark.parametrize("variant", ["torchvision-folder-device", "torchvision-device", "torchvision-shards",
                                     "dali-shards"])
def test_an_epoch_reads_within_a_real_open_file_limit(many_files, variant):
    """`ulimit -n` for real (RLIMIT_NOFILE in a subprocess), FD_HEADROOM files above what the process
    holds: batch 80 x 4 reader threads is 320 files at once (80 in each batch alone) when a
    batch's files are all opened before any is read, and up to 160 when every shard read stays
    open. Both ran out (EMFILE); the readers now hold one file each, the shards at most
    MAX_OPEN_FILES per process. (A DataLoader whose worker runs out of files hangs: hence the
    timeout.)"""
    from loaders.files import MAX_OPEN_FILES
    assert MAX_OPEN_FILES + 16 <= FD_HEADROOM < 80
    name, options = VARIANTS[variant]
    code = f"""
import os, resource
from loaders import build_loader
loader = build_loader({name!r}, split="train", data={str(many_files)!r}, batch_size=80, workers=4, image_size=16,
                      options={options!r})
held = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (held + {FD_HEADROOM}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
for epoch in range(2):
    loader.set_epoch(epoch)
    print(epoch, [len(labels) for _, labels in loader], flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == [f"{epoch} {[80] * 4}" for epoch in range(2)], proc.stdout
