"""The batched crop sampler (loaders/crops.py): torchvision's RandomResizedCrop distribution and
fallback, boxes that depend on (seed, epoch, index) alone, and the loader's batches that follow
from that: the same crops whichever batch, order or resumed run reads a sample."""
import functools
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from convert.make_sample import make_sample
from loaders import build_loader
from loaders.common import RRC_RATIO, RRC_SCALE
from loaders.crops import ATTEMPTS, crop_flip_boxes, uniforms
from loaders.crops import DRAWS as DRAWS_PER_SAMPLE

DRAWS = 20_000


def _areas_aspects(boxes: np.ndarray, h: int, w: int):
    return boxes[:, 2] * boxes[:, 3] / (h * w), boxes[:, 3] / boxes[:, 2]


@pytest.mark.parametrize("h, w", [(240, 320), (500, 375), (64, 48), (300, 900)])  # 300 x 900: often the fallback
def test_the_boxes_follow_torchvisions_random_resized_crop_distribution(h, w):
    ours = crop_flip_boxes(0, 0, np.arange(DRAWS), np.full(DRAWS, h), np.full(DRAWS, w))
    torch.manual_seed(0)
    theirs = np.array([v2.RandomResizedCrop.get_params(torch.empty(3, h, w), list(RRC_SCALE), list(RRC_RATIO))
                       for _ in range(DRAWS)])
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all() and (ours[:, 2] >= 1).all()
    assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()
    (area, aspect), (area_ref, aspect_ref) = _areas_aspects(ours, h, w), _areas_aspects(theirs[:, :4], h, w)
    # 20,000 draws: a standard error of ~0.002 on the mean area; a scale or ratio range off by
    # 10%, or a fallback taken too often, moves these by several times the tolerance
    assert abs(area.mean() - area_ref.mean()) < 0.01 and abs(aspect.mean() - aspect_ref.mean()) < 0.01
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(np.quantile(area, q) - np.quantile(area_ref, q)) < 0.015, q
        assert abs(np.quantile(aspect, q) - np.quantile(aspect_ref, q)) < 0.015, q
    # where in the image: the mean offset over the room left, uniform in [0, 1]
    room = np.maximum(h - ours[:, 2], 1)
    assert abs((ours[:, 0] / room).mean() - (theirs[:, 0] / np.maximum(h - theirs[:, 2], 1)).mean()) < 0.015
    assert abs(ours[:, 4].mean() - 0.5) < 0.015  # the flip, p = 0.5


def _torchvisions_box(u: np.ndarray, h: int, w: int, scale, ratio) -> tuple[list, bool]:
    """(box, fell back): torchvision's RandomResizedCrop attempts for one h x w image, written as
    its make_params is, one scalar at a time, fed this sample's uniforms (crops.py's order: 10
    areas, 10 log aspects, 10 tops, 10 lefts) in place of torch's generator; when none fits,
    torchvision's own fallback (asked with a scale no crop can meet)."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for a in range(ATTEMPTS):
        area = h * w * (scale[0] + (scale[1] - scale[0]) * u[a])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[ATTEMPTS + a])
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return [int(u[2 * ATTEMPTS + a] * (h - ch + 1)), int(u[3 * ATTEMPTS + a] * (w - cw + 1)), ch, cw], False
    return _torchvisions_fallback(h, w, tuple(ratio)), True


@functools.cache
def _torchvisions_fallback(h: int, w: int, ratio: tuple) -> list:
    return list(v2.RandomResizedCrop.get_params(torch.empty(3, h, w), [2.0, 2.0], list(ratio)))


@pytest.mark.parametrize("h, w, scale, ratio, fallbacks", [
    (1000, 10, RRC_SCALE, RRC_RATIO, "all"),  # no crop of >= 8% area and aspect 3/4..4/3 fits
    (10, 1000, RRC_SCALE, RRC_RATIO, "all"),
    (300, 900, RRC_SCALE, RRC_RATIO, "some"),  # wider than 4/3: the fallback is a central 4:3 crop
    (30, 31, (0.9, 1.0), (0.5, 2.0), "some"),  # within the ratios: the fallback is the whole image
    (30, 31, RRC_SCALE, RRC_RATIO, "none"),  # rounding at a small size; 10 failed attempts: ~1e-10
])
def test_each_box_is_torchvisions_choice_from_the_same_draws_fallback_included(h, w, scale, ratio, fallbacks):
    """Box by box against torchvision's algorithm fed the same uniforms: the first attempt that
    fits, else its fallback. The mixed cases take both branches, so neither can be missing."""
    n = 2000
    boxes = crop_flip_boxes(5, 1, np.arange(n), np.full(n, h), np.full(n, w), scale=scale, ratio=ratio)
    u = uniforms(5, 1, np.arange(n), DRAWS_PER_SAMPLE)
    expected = [_torchvisions_box(row, h, w, scale, ratio) for row in u]
    fell_back = sum(fell for _, fell in expected)
    assert {"all": fell_back == n, "some": 0.02 * n < fell_back < 0.9 * n, "none": fell_back == 0}[fallbacks], fell_back
    assert boxes[:, :4].tolist() == [box for box, _ in expected]
    assert (boxes[:, 4] == (u[:, -1] < 0.5)).all()  # the flip: the last draw


def test_a_samples_box_depends_on_seed_epoch_and_index_alone():
    heights, widths = np.array([300, 400, 500, 333]), np.array([400, 300, 375, 500])
    batch = crop_flip_boxes(7, 3, np.array([10, 11, 12, 13]), heights, widths)
    for k in range(4):  # alone, or in another batch, in another place
        assert (crop_flip_boxes(7, 3, np.array([13 - k, 10 + k]), heights[[3 - k, k]], widths[[3 - k, k]])[1]
                == batch[k]).all()
    assert (crop_flip_boxes(7, np.array([3, 3, 3, 3]), np.array([10, 11, 12, 13]), heights, widths) == batch).all()
    for other in (crop_flip_boxes(8, 3, np.arange(10, 14), heights, widths),
                  crop_flip_boxes(7, 4, np.arange(10, 14), heights, widths)):
        assert (other != batch).any(axis=1).all()  # another seed or epoch: other boxes


def test_the_draws_are_uniform_and_pinned():
    u = uniforms(0, 0, np.arange(50_000), 4)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.02  # neighbouring indices independent
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.02  # and a sample's draws
    # pinned: a change of the stream changes every run's crops, and resuming a run across the change
    assert np.round(uniforms(0, 0, np.array([0, 1]), 2), 6).tolist() == PINNED


PINNED = [[0.129646, 0.04992], [0.851303, 0.186705]]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from convert.to_shards import convert as to_shards
    root = make_sample(tmp_path_factory.mktemp("crops"), num_classes=2, train_per_class=6, val_per_class=1,
                       quiet=True)
    to_shards(root, progress=False, workers=2)
    return root


def _loader(root, decode, batch_size=4, source="shards"):
    return build_loader("torchvision", split="train", data=root, batch_size=batch_size, workers=1, image_size=32,
                        seed=3, options={"source": source, "decode": decode})


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_a_sample_gets_the_same_crop_in_any_batch_and_after_a_resume(sample, decode):
    loader = _loader(sample, decode)
    keys = [(i, 2, 32) for i in range(8)]
    whole = loader.dataset.__getitems__(keys)
    parts = [loader.dataset.__getitems__(keys[5:1:-1]), loader.dataset.__getitems__(keys[:2] + keys[6:])]
    by_index = {}
    for batch, index_order in zip(parts, ([5, 4, 3, 2], [0, 1, 6, 7])):
        for k, index in enumerate(index_order):
            by_index[index] = _sample(batch, k, decode)
    for index in range(8):
        assert all(torch.equal(a, b) for a, b in zip(_sample(whole, index, decode), by_index[index])), index
    # a resumed run: a new loader that starts at epoch 2 gives epoch 2's batches of an unbroken one
    unbroken = _loader(sample, decode)
    for epoch in range(3):
        unbroken.set_epoch(epoch)
        expected = [(x.clone(), y.clone()) for x, y in unbroken]
    resumed = _loader(sample, decode)
    resumed.set_epoch(2)
    got = list(resumed)
    assert len(got) == len(expected) == 3
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, expected))


def _sample(batch, k: int, decode: str) -> tuple:
    """Sample k of a dataset batch: (image, label) on the host path, (params, label) on the device path."""
    data, labels, _ = batch
    return (data[3][k], labels[k]) if decode == "device" else (data[k], labels[k])


def test_the_host_and_device_paths_draw_the_same_boxes(sample):
    keys = [(i, 1, 32) for i in range(12)]
    host, device = _loader(sample, "cpu", source="folder").dataset, _loader(sample, "device", source="folder").dataset
    params = device.__getitems__(keys)[0][3].numpy()
    images = [host._decode(torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8), i)
              for i, p in enumerate(host.paths[:12])]
    expected = crop_flip_boxes(3, 1, np.arange(12), [i.shape[1] for i in images], [i.shape[2] for i in images])
    assert (params == expected).all()
    got = host.__getitems__(keys)[0]
    for image, box, out in zip(images, expected, got):
        assert torch.equal(out, host.transform(image, 32, box))
