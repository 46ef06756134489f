"""Decoding where the batch trains (loaders/device_decode.py, --decode device): the JPEG header
parser, the batched crop + resize against torchvision's, the loader against its host path, the
images that fall back to the host, the errors, the prefetch thread, and a training run. Here the
CPU is the device; the CUDA tests run where there is one."""
import io
import json
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from convert.make_sample import make_sample
from core.errors import LoaderError
from engine.optim import OptimizerConfig, build_optimizer
from engine.precision import Precision
from engine.step import DeviceInput, TrainStep
from loaders import build_loader
from loaders.device_decode import (DECODER, DEVICE_WORK, crop_resize, decode_image, decode_stream, jpeg_header,
                                   plan_groups, prefetch)
from model import create_model
from test_train import REPO, ok, records

CPU = torch.device("cpu")


def needs_cuda(test):
    """Skipped without CUDA; `pytest -m cuda` selects these on a GPU (bench/accelerator.sh)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="needs a CUDA device (nvJPEG)")(test))



def _encode(mode: str, fmt: str = "JPEG", size=(50, 40), **kw) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt, kw, expected", [
    ("RGB", "JPEG", {}, (40, 50, True)),
    ("RGB", "JPEG", {"subsampling": 0}, (40, 50, True)),  # 4:4:4 is still baseline
    ("RGB", "JPEG", {"exif": b"Exif\x00\x00" + bytes(30_000)}, (40, 50, True)),  # a large APP1 before the frame
    # a thumbnail's frame header inside APP1 (another size, progressive): the walk skips the segment
    ("RGB", "JPEG", {"exif": b"Exif\x00\x00\xff\xd8\xff\xc2\x00\x11\x08\x00\x10\x00\x20\x01" + bytes(100)},
     (40, 50, True)),
    ("RGB", "JPEG", {"progressive": True}, (40, 50, False)),
    ("L", "JPEG", {}, (40, 50, False)),
    ("CMYK", "JPEG", {}, (40, 50, False)),
    ("RGB", "PNG", {}, None),
])
def test_the_header_gives_the_size_and_whether_nvjpeg_takes_it(mode, fmt, kw, expected):
    data = _encode(mode, fmt, **kw)
    assert jpeg_header(data) == expected and jpeg_header(memoryview(bytearray(data))) == expected  # read in place
    assert tuple(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8)).shape) == (3, 40, 50)


def test_a_12_bit_jpeg_is_not_for_nvjpegs_batched_path():
    """Extended sequential (SOF1) allows 12 bits per sample, which nvJPEG's batched decoder does not
    take (it failed the whole batch): the frame's precision byte is read, not only its marker.
    PIL writes no 12-bit JPEG, so an 8-bit one's frame header is rewritten: SOF1, precision 12."""
    data = bytearray(_encode("RGB"))
    frame = data.index(b"\xff\xc0")
    assert data[frame + 4] == 8 and jpeg_header(bytes(data)) == (40, 50, True)
    data[frame + 1] = 0xC1  # extended sequential, still 8 bits: nvJPEG takes it
    assert jpeg_header(bytes(data)) == (40, 50, True)
    data[frame + 4] = 12
    assert jpeg_header(bytes(data)) == (40, 50, False)


def test_a_truncated_or_foreign_file_has_no_header():
    data = _encode("RGB")
    assert jpeg_header(data[:20]) is None and jpeg_header(b"GIF89a" + data) is None and jpeg_header(b"") is None


def test_the_decoder_is_torchcodec_and_matches_torchvision_bit_for_bit():
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as torchvision_decode
    assert DECODER == "torchcodec"  # requirements.txt has it; torchvision.io is only the fallback
    for mode, fmt in (("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")):
        data = torch.frombuffer(bytearray(_encode(mode, fmt)), dtype=torch.uint8)
        assert torch.equal(decode_image(data), torchvision_decode(data, mode=ImageReadMode.RGB)), (mode, fmt)


def _smooth_images(shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    noise = [torch.randint(0, 256, (1, 3, h, w), generator=g).float() for h, w in shapes]
    return [torch.nn.functional.avg_pool2d(x, 5, 1, 2)[0].round().to(torch.uint8) for x in noise]


def test_the_batched_crop_resize_is_torchvisions_resize_of_each_crop():
    images = _smooth_images([(300, 400), (512, 341), (120, 90), (40, 30)])
    # top, left, h, w, flip: downscales, a flip, and a crop smaller than the output (an upscale)
    params = torch.tensor([[10, 20, 200, 250, 0], [0, 0, 512, 341, 1], [30, 5, 60, 80, 0], [3, 2, 20, 25, 1]])
    out = crop_resize(images, params, 56, train=True, crop_ratio=0.875)
    assert out.shape == (4, 3, 56, 56) and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last)
    for image, (top, left, h, w, flip), got in zip(images, params.tolist(), out):
        crop = image[None, :, top:top + h, left:left + w]
        exact = v2.functional.resize(crop.float(), [56, 56], antialias=True)[0].round().clamp(0, 255)
        host = v2.functional.resize(crop.contiguous(memory_format=torch.channels_last), [56, 56], antialias=True)[0]
        if flip:
            exact, host = exact.flip(-1), host.flip(-1)
        # the same filter as torch's float path; its uint8 path rounds between its passes: 1 level at most
        assert (got.float() - exact).abs().max() <= 1 and (got.float() - exact).abs().mean() < 0.02
        assert (got.float() - host.float()).abs().max() <= 1


@pytest.mark.parametrize("size_px, ratio", [(56, 0.875), (32, 1.0), (48, 0.7)])
def test_the_val_crop_is_resize_shorter_side_then_center_crop(size_px, ratio):
    images = _smooth_images([(300, 400), (401, 257), (90, 90), (64, 200)])
    params = torch.tensor([list(i.shape[1:]) for i in images])
    out = crop_resize(images, params, size_px, train=False, crop_ratio=ratio)
    for image, got in zip(images, out):
        resized = v2.functional.resize(image[None].float(), [int(size_px / ratio)], antialias=True)
        expected = v2.functional.center_crop(resized, [size_px])[0].round().clamp(0, 255)
        assert (got.float() - expected).abs().max() <= 1


def test_a_batch_is_padded_to_within_twice_the_sum_of_its_crops_whatever_its_largest_image():
    g = torch.Generator().manual_seed(0)
    heights = [2372] + torch.randint(60, 500, (255,), generator=g).tolist()  # one large photo among 255 crops
    widths = [2400] + torch.randint(60, 500, (255,), generator=g).tolist()
    groups = plan_groups(heights, widths)
    assert sorted(i for group in groups for i in group) == list(range(256))
    padded_px = sum(len(group) * max(heights[i] for i in group) * max(widths[i] for i in group) for group in groups)
    crops_px = sum(h * w for h, w in zip(heights, widths))
    assert padded_px <= 2 * crops_px
    assert 256 * 2372 * 2400 > 50 * crops_px  # what padding all to the largest took
    assert len(groups) <= 20  # a few batched products per batch, not one per image (sides drawn apart: 14 here)
    assert plan_groups([300] * 8, [400] * 8) == [list(range(8))]  # equal crops: one group


LARGE_PHOTO_BATCH = """
import resource, torch
from loaders.device_decode import crop_resize
images = [torch.randint(0, 256, (3, 2372, 2400), dtype=torch.uint8)]
images += [torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8) for _ in range(15)]
params = torch.tensor([[0, 0, 2372, 2400, 0]] + [[50, 50, 200, 300, 1]] * 15)
crop_resize(images[1:3], params[1:3], 32, True, 0.875)  # first-call buffers, outside the measure
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
crop_resize(images, params, 32, True, 0.875)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
LARGE_PHOTO_CROPS_PX = 3 * (2372 * 2400 + 15 * 200 * 300)


def test_a_batch_with_one_large_photo_takes_memory_for_its_crops_not_n_times_the_photo():
    """The peak memory of crop_resize on 16 images, one 2400 x 2372 px photo and 15 small ones,
    over what the process held before (its own process: ru_maxrss is a high-water mark). Padding
    all 16 to the photo's size took 1.37 GB here; grouped, 144 MB (7 bytes per crop pixel)."""
    proc = subprocess.run([sys.executable, "-c", LARGE_PHOTO_BATCH], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra_bytes = int(proc.stdout.split()[-1])
    assert extra_bytes <= 16 * LARGE_PHOTO_CROPS_PX, extra_bytes / 2**20


def test_a_capture_waits_for_the_batch_the_decode_thread_is_on():
    """DEVICE_WORK from the decode thread's side, with the CPU as the device (StepGraph.capture's
    side, that it holds the lock while capturing, is tested on CUDA in test_step.py): a capture
    that comes while a batch is being decoded starts only once that batch is done."""
    on_it, finish, log = threading.Event(), threading.Event(), []

    def work(b):
        if b == 0:
            on_it.set()
            finish.wait(timeout=60)
        log.append(f"decoded {b}")
        return (torch.tensor(b),)

    def capture():
        with DEVICE_WORK:
            log.append("captured")

    batches = prefetch(iter(range(3)), work, CPU)
    reader = threading.Thread(target=lambda: log.extend(f"got {int(x[0])}" for x in batches))
    reader.start()
    assert on_it.wait(timeout=60)
    capturer = threading.Thread(target=capture)
    capturer.start()
    capturer.join(timeout=0.5)
    assert capturer.is_alive() and "captured" not in log  # waiting for batch 0's device work
    finish.set()
    capturer.join(timeout=60)
    reader.join(timeout=60)
    assert log.index("captured") > log.index("decoded 0")
    assert [e for e in log if e.startswith("got")] == ["got 0", "got 1", "got 2"]


def test_no_batch_is_decoded_while_a_capture_holds_the_lock():
    started, got = threading.Event(), []

    def work(b):
        started.set()
        return (torch.tensor(b),)

    with DEVICE_WORK:  # as StepGraph.capture holds it
        reader = threading.Thread(target=lambda: got.extend(int(x[0]) for x in prefetch(iter(range(3)), work, CPU)))
        reader.start()
        assert not started.wait(timeout=0.5)  # the decode thread waits at the lock
    reader.join(timeout=60)
    assert started.is_set() and got == [0, 1, 2]


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    """Grayscale, CMYK and PNG files among the JPEGs, and record shards of them (written as RGB
    baseline JPEGs by the converter)."""
    from convert.to_shards import convert as to_shards
    root = make_sample(tmp_path_factory.mktemp("device_decode"), num_classes=3, train_per_class=7,
                       val_per_class=4, oddities=True, quiet=True)
    to_shards(root, progress=False, workers=2)
    return root


def _epochs(source, decode, root, split, size_px=40, epoch=1, resolution=None):
    loader = build_loader("torchvision", split=split, data=root, batch_size=4, workers=2, image_size=size_px,
                          seed=3, options={"source": source, "decode": decode})
    if resolution:
        loader.set_resolution(resolution)
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader], loader


@pytest.mark.parametrize("source", ["shards", "folder"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_device_decoded_batches_are_the_host_paths_within_rounding(odd_dataset, source, split):
    host, _ = _epochs(source, "cpu", odd_dataset, split)
    device, loader = _epochs(source, "device", odd_dataset, split, resolution=48)
    device_at_40, _ = _epochs(source, "device", odd_dataset, split)
    assert len(device) == len(host) > 0 and device[0][0].shape[-1] == 48  # set_resolution reaches it
    diffs = []
    for (a, la), (b, lb) in zip(host, device_at_40):
        assert torch.equal(la, lb) and b.is_contiguous(memory_format=torch.channels_last)
        diffs.append((a.float() - b.float()).abs())
    # the same crop boxes from the same seeds: only rounding apart (a wrong box differs by tens)
    assert max(d.max() for d in diffs) <= 1 and torch.cat([d.flatten() for d in diffs]).mean() < 0.2


def test_images_nvjpeg_does_not_take_are_decoded_by_the_workers_and_counted(odd_dataset):
    paths = sorted((odd_dataset / "train").rglob("*.JPEG"))
    expected = sum(1 for p in paths if not (jpeg_header(p.read_bytes()) or (0, 0, False))[2])
    assert expected == 3  # the sample's grayscale, CMYK and PNG files
    for source, host_decoded in (("folder", expected), ("shards", 0)):  # the converter wrote RGB baseline
        loader = build_loader("torchvision", split="train", data=odd_dataset, batch_size=1, workers=1,
                              image_size=32, options={"source": source, "decode": "device"})
        loader.set_epoch(0)
        assert sum(len(y) for _, y in loader) == len(paths)
        assert loader.host_decoded == host_decoded, source


def test_a_jpeg_the_device_decoder_refuses_is_named_after_the_batch_is_retried(tmp_path):
    """A header that looks baseline over a broken body: the batched call fails as a whole, each
    image is tried alone, and the one that fails is named, as the host path names it."""
    root = make_sample(tmp_path / "broken", num_classes=2, train_per_class=4, val_per_class=1, quiet=True)
    victim = sorted((root / "train").rglob("*.JPEG"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[:data.index(b"\xff\xda")] + b"\xff\xd9")  # no scan: no image in it
    assert jpeg_header(victim.read_bytes())[2]  # the workers send it to the device decoder
    loader = build_loader("torchvision", split="train", data=root, batch_size=8, workers=1,
                          options={"source": "folder", "decode": "device"})
    loader.set_epoch(0)
    with pytest.raises(LoaderError, match=rf"{victim}: cannot decode it on cpu \(Invalid JPEG file structure: "
                                          rf"missing SOS marker\)$"):
        list(loader)
    assert loader.stage.retried == 1


def test_auto_decodes_on_the_device_only_on_cuda(odd_dataset):
    loader = build_loader("torchvision", split="val", data=odd_dataset, batch_size=4, options={"decode": "auto"})
    assert loader.decode == "cpu" and loader.stage is None


def test_every_loader_says_where_it_decodes(odd_dataset):
    from convert.to_ffcv import convert as to_ffcv
    if not (odd_dataset / "ffcv" / "val.beton").exists():
        to_ffcv(odd_dataset, splits=("val",), progress=False, workers=2)
    expected = {("torchvision", "cpu"): "in 2 worker process(es) (torchcodec)",
                ("torchvision", "device"): "on cpu in batches (torchcodec)",
                ("dali", "cpu"): "in 2 DALI CPU thread(s)", ("ffcv", "cpu"): "in 2 FFCV CPU thread(s)"}
    for (name, decode), decoding in expected.items():
        loader = build_loader(name, split="val", data=odd_dataset, batch_size=4, workers=2,
                              options={"decode": decode})
        assert loader.decoding == decoding


def test_ffcv_and_dali_say_where_they_can_decode(odd_dataset):
    with pytest.raises(LoaderError, match=r"--decode device: --loader ffcv decodes on the CPU only; the loaders "
                                          r"that decode on the device are torchvision, dali"):
        build_loader("ffcv", split="val", data=odd_dataset, batch_size=4, options={"decode": "device"})
    with pytest.raises(LoaderError, match=r"--loader dali decodes on a CUDA device only, not cpu.*torchvision"):
        build_loader("dali", split="val", data=odd_dataset, batch_size=4, options={"decode": "device"})
    with pytest.raises(LoaderError, match=r"--decode 'gpu': choose one of auto, cpu, device"):
        build_loader("torchvision", split="val", data=odd_dataset, batch_size=4, options={"decode": "gpu"})


def test_prefetch_keeps_order_raises_in_turn_and_stops_its_thread():
    def batches():
        yield from range(5)
        raise LoaderError("sample 5 is damaged")

    got = []
    with pytest.raises(LoaderError, match="sample 5"):
        for item in prefetch(batches(), lambda b: (torch.tensor(b),), CPU):
            got.append(int(item[0]))
    assert got == [0, 1, 2, 3, 4]  # every batch made before the failure, in order, then the failure

    stream = prefetch(iter(range(100)), lambda b: (torch.tensor(b),), CPU)
    assert int(next(stream)[0]) == 0
    stream.close()  # a consumer that stops early (--max_steps) ends the thread
    assert not [t for t in threading.enumerate() if t.name == "device-decode"]


def test_a_cpu_run_decoding_on_the_device_learns_as_the_host_path_does(default_sample, tmp_path):
    """The demo's recipe on the sample dataset through --loader torchvision, decoded by its workers
    and decoded as a batch with the CPU as the device: the same crops, so the same learning."""
    data = default_sample  # the sample's defaults: 10 classes, 400 + 100 images
    results = {}
    for decode in ("cpu", "device"):
        out = tmp_path / decode
        proc = subprocess.run([sys.executable, "train.py", "--config", "configs/sample_cpu.yaml", "--data", str(data),
                               "--loader", "torchvision", "--decode", decode, "--output-dir", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        ok(proc)
        results[decode] = records(out)
    host, device = results["cpu"], results["device"]
    assert len(device) == len(host) == 8 and all(math.isfinite(r["train_loss"]) for r in device)
    # the first epoch, before the runs drift apart: the same images and crops give the same loss
    assert device[0]["train_loss"] == pytest.approx(host[0]["train_loss"], rel=0.02)
    # measured: 89 and 86 (chance is 10)
    assert device[-1]["acc1"] > 60 and abs(device[-1]["acc1"] - host[-1]["acc1"]) <= 10
    assert device[-1]["host_decoded"] == 0  # the sample's files are all baseline RGB JPEGs
    assert json.loads((tmp_path / "device" / "config.json").read_text())["decode"] == "device"


@needs_cuda
def test_cuda_nvjpeg_batches_equal_the_cpu_paths_over_many_recycled_buffers(odd_dataset):
    """The nvJPEG hazard: buffers recycled while queued kernels still read them would corrupt later
    batches; three epochs of device batches must stay within the decoders' rounding of the CPU's."""
    cuda = torch.device("cuda")
    for epoch in range(3):
        host, _ = _epochs("shards", "cpu", odd_dataset, "train", epoch=epoch)
        loader = build_loader("torchvision", split="train", data=odd_dataset, batch_size=4, workers=2,
                              image_size=40, seed=3, device=cuda, options={"source": "shards", "decode": "device"})
        loader.set_epoch(epoch)
        device = [(x.cpu(), y.cpu()) for x, y in loader]
        assert len(device) == len(host)
        for (a, la), (b, lb) in zip(host, device):
            assert torch.equal(la, lb)
            # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels
            assert (a.float() - b.float()).abs().mean() < 2.0


@needs_cuda
def test_cuda_every_prefetch_pass_decodes_on_the_same_stream():
    """One decode stream per device, made once: streams come from a round-robin pool of 32, so a
    stream per pass (each epoch, each validation pass) would come round to the capture stream."""
    cuda, seen = torch.device("cuda", 0), set()

    def work(b):
        seen.add(torch.cuda.current_stream(cuda).cuda_stream)
        return (torch.full((1,), b, device=cuda),)

    for _ in range(40):  # more passes than the pool holds
        assert [int(x[0]) for x in prefetch(iter(range(2)), work, cuda)] == [0, 1]
    assert seen == {decode_stream(cuda).cuda_stream}
    assert decode_stream(torch.device("cuda")) is decode_stream(cuda)


@needs_cuda
def test_cuda_a_batch_with_one_large_photo_takes_memory_for_its_crops():
    """The CPU test's batch on the GPU: the allocator's peak over what the images hold is bounded
    by the crops (16 bytes per crop pixel), not by 16 x the photo (1.37 GB before the crops were
    grouped), and the pixels are the CPU's within rounding."""
    cuda = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 2372, 2400), dtype=torch.uint8, generator=g)]
    images += [torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8, generator=g) for _ in range(15)]
    params = torch.tensor([[0, 0, 2372, 2400, 0]] + [[50, 50, 200, 300, 1]] * 15)
    on_cuda = [image.to(cuda) for image in images]
    crop_resize(on_cuda[1:3], params[1:3], 32, True, 0.875)  # cuBLAS's workspace, outside the measure
    torch.cuda.synchronize(cuda)
    torch.cuda.reset_peak_memory_stats(cuda)
    before = torch.cuda.memory_allocated(cuda)
    out = crop_resize(on_cuda, params, 32, True, 0.875)
    torch.cuda.synchronize(cuda)
    extra_bytes = torch.cuda.max_memory_allocated(cuda) - before
    assert extra_bytes <= 16 * LARGE_PHOTO_CROPS_PX + 64 * 2**20, extra_bytes / 2**20
    expected = crop_resize(images, params, 32, True, 0.875)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.cpu().float() - expected.float()).abs().max() <= 1


@needs_cuda
def test_cuda_graphed_training_on_device_decoded_batches(odd_dataset):
    """train.py's GPU path in one process: nvJPEG batches from the decode thread, and the step
    captured (StepGraph holds DEVICE_WORK meanwhile) and replayed over three epochs."""
    cuda = torch.device("cuda", 0)
    loader = build_loader("torchvision", split="train", data=odd_dataset, batch_size=4, workers=2, image_size=40,
                          seed=3, device=cuda, options={"source": "shards", "decode": "device"})
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_100", num_classes=3, dropout=0.0).to(
        cuda, memory_format=torch.channels_last).train()
    step = TrainStep(model, build_optimizer(model, OptimizerConfig(name="sgd", lr=0.01)),
                     Precision(True, torch.bfloat16), cuda, cuda_graphs=True)
    inputs, losses = DeviceInput(), []
    for epoch in range(3):
        loader.set_epoch(epoch)
        losses += [step(*inputs(images, labels, i)) for i, (images, labels) in enumerate(loader)]
    assert step.note is None and step.graph.captures == 1 and len(losses) == 3 * len(loader)
    assert torch.isfinite(torch.stack(losses)).all() and not DEVICE_WORK.locked()
