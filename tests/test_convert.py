"""convert/: the scan and its errors, messy images, and both converters read back by FFCV's and DALI's own readers.

    python -m pytest -q tests/test_convert.py
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
from PIL import Image, ImageFile

from convert import images
from convert import to_ffcv, to_shards
from core.dataset import scan
from core.errors import DatasetError
from core.manifest import read_manifest, size_problems
from convert.make_sample import class_names, make_sample, render

REPO = Path(__file__).resolve().parent.parent
TOOLS = {"to_ffcv": to_ffcv, "to_shards": to_shards}
MAX_RES = 96  # the sample images are 200-750 px, so every one is shrunk, and encoding stays fast
# Stored images are JPEG at quality 90. On the sample's noise-textured images at ~100 px that moves
# a pixel by 3-5 of 255 on average (measured: at most 5.2 over 40 images); a different or flipped
# image, or an inverted CMYK, differs by 30 or more. So a mean absolute difference under 8 means
# "the same picture, JPEG-compressed" and nothing else.
MAD_LIMIT = 8.0


def mad(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def reference(path, max_res=MAX_RES):
    """The source image decoded as ImageFolder does (PIL .convert('RGB')) and shrunk like the converters."""
    with Image.open(path) as im:
        return images.resize_max(np.asarray(im.convert("RGB")), max_res)


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    """3 classes with ImageNet's oddities (grayscale, CMYK, PNG named .JPEG) and 3 non-image files."""
    root = make_sample(tmp_path_factory.mktemp("messy"), num_classes=3, train_per_class=4,
                       val_per_class=2, oddities=True, quiet=True)
    names = class_names(3)
    (root / "train" / names[0] / "notes.txt").write_text("not an image")
    (root / "train" / "readme.txt").write_text("not a class")
    (root / "val" / names[1] / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


@pytest.fixture(scope="module")
def bad_data(messy, tmp_path_factory):
    """`messy` plus three undecodable files: empty, a truncated JPEG, random bytes. -> (root, their paths)."""
    root = tmp_path_factory.mktemp("bad") / "data"
    shutil.copytree(messy, root)
    names = class_names(3)
    good = (root / "train" / names[1] / f"{names[1]}_1.JPEG").read_bytes()
    bad = {f"train/{names[0]}/empty.JPEG": b"",
           f"train/{names[1]}/truncated.JPEG": good[: len(good) // 2],
           f"val/{names[2]}/garbage.jpg": np.random.default_rng(0).bytes(5000)}
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    return root, sorted(bad)


# --- scan -----------------------------------------------------------------------------------

def test_scan_matches_imagefolder_and_counts_non_images(messy):
    from torchvision.datasets import ImageFolder
    dataset = scan(messy)
    for name in ("train", "val"):
        ref = ImageFolder(messy / name)
        split = dataset.splits[name]
        assert dataset.classes == ref.classes
        assert [str(split.path(i)) for i in range(len(split))] == [p for p, _ in ref.samples]
        assert split.labels.tolist() == [label for _, label in ref.samples]
    assert len(dataset.splits["train"]) == 3 * 4 + 3 and len(dataset.splits["val"]) == 3 * 2
    assert dataset.ignored == Counter({".txt": 2, ".DS_Store": 1})
    limited = scan(messy, limit=5).splits["train"]
    assert limited.files.tolist() == dataset.splits["train"].files[:5].tolist()


def _layout(root: Path, tree: dict):
    for rel, content in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)


@pytest.mark.parametrize("tree, expected", [
    (None, "no such folder"),
    ({}, "is empty"),
    ({"val/a/1.JPEG": ""}, "no train/ folder"),
    ({"train/a/1.JPEG": "", "train/b/1.JPEG": ""}, "no val/ folder"),
    ({"train/a/1.JPEG": "", "train/b/1.JPEG": "", "train/c/1.JPEG": "",
      "val/a/1.JPEG": "", "val/b/1.JPEG": "", "val/d/1.JPEG": ""}, "only in train/: c; only in val/: d"),
    ({"train/a/1.JPEG": "", "train/b/notes.txt": "", "val/a/1.JPEG": "", "val/b/1.JPEG": ""},
     "no images in"),
])
def test_layout_errors_are_one_line_and_say_what_to_do(tmp_path, tree, expected):
    root = tmp_path / "data"
    if tree is not None:
        root.mkdir()
        _layout(root, tree)
    with pytest.raises(DatasetError) as e:
        to_ffcv.convert(root, progress=False)
    message = str(e.value)
    assert expected in message and "\n" not in message
    if "no images in" in message:
        assert "train/b" in message
    assert not (root / "ffcv").exists()  # failed before creating any output


@pytest.mark.parametrize("tool", TOOLS)
def test_cli_wrong_path_prints_one_line_no_traceback(tool, tmp_path):
    run = subprocess.run([sys.executable, f"convert/{tool}.py", str(tmp_path / "nope")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert "no such folder" in run.stderr and "train/" in run.stderr


@pytest.mark.parametrize("tool", TOOLS)
def test_help_explains_every_option(tool):
    parser = TOOLS[tool].build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help and len(action.help) > 20, action.dest
        for flag in action.option_strings:
            assert flag in text
    assert "224" in text  # why the default --max-resolution suits training at 224 px


def test_bad_option_values_name_the_flag(tiny_sample):
    with pytest.raises(DatasetError, match="--jpeg-quality"):
        to_shards.convert(tiny_sample, jpeg_quality=0)
    with pytest.raises(DatasetError, match="--write-mode"):
        to_ffcv.convert(tiny_sample, write_mode="png")
    with pytest.raises(DatasetError, match="--shard-size"):
        to_shards.convert(tiny_sample, shard_size=0)


@pytest.mark.parametrize("tool", TOOLS)
def test_unwritable_default_output_says_pass_out(tiny_sample, tmp_path, tool):
    root = tmp_path / "data"
    shutil.copytree(tiny_sample, root)
    (root / ("ffcv" if tool == "to_ffcv" else "shards")).write_text("a file where the output folder goes")
    with pytest.raises(DatasetError, match="pass --out"):
        TOOLS[tool].convert(root, progress=False)


# --- decoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, idx", [("gray", 0), ("cmyk", 1), ("png", 2)])
def test_oddities_decode_to_the_right_rgb(messy, kind, idx):
    cls = class_names(3)[idx]
    img = images.load_rgb(messy / "train" / cls / f"{cls}_odd_{kind}.JPEG")
    truth = render(0, idx, 3, "train", 10_000 + idx)  # the pixels make_sample saved
    if kind == "gray":
        truth = np.asarray(Image.fromarray(truth).convert("L").convert("RGB"))
    assert img.shape == truth.shape and img.dtype == np.uint8
    if kind == "png":
        assert np.array_equal(img, truth)
    else:
        assert mad(img, truth) < MAD_LIMIT
        assert mad(img, 255 - truth) > 4 * MAD_LIMIT  # as an Adobe CMYK JPEG read without inversion looks


def test_truncated_empty_and_garbage_files_are_bad(messy, tmp_path, monkeypatch):
    names = class_names(3)
    jpeg = (messy / "train" / names[0] / f"{names[0]}_1.JPEG").read_bytes()
    png = (messy / "train" / names[2] / f"{names[2]}_odd_png.JPEG").read_bytes()
    cases = {"empty.JPEG": b"", "garbage.JPEG": np.random.default_rng(1).bytes(3000),
             "half.JPEG": jpeg[: len(jpeg) // 2], "no_end.JPEG": jpeg[:-2], "half_png.JPEG": png[: len(png) // 2]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    # Another import may switch PIL to padding truncated JPEGs with grey; that must not leak in.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(tmp_path / "half.JPEG") as im:
        im.load()  # the "recovery" the converters refuse: a grey-padded image, no error
    for name in cases:
        with pytest.raises(images.BadImage):
            images.load_rgb(tmp_path / name)


def test_resize_max_matches_ffcv_and_never_enlarges():
    from ffcv.fields.rgb_image import resizer
    img = np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    small = images.resize_max(img, 96)
    assert small.shape == (63, 96, 3)
    assert np.array_equal(small, resizer(img, 96))  # the same pixels FFCV's RGBImageField would store
    assert images.resize_max(img, 1000) is img
    assert images.resize_max(np.zeros((4000, 3, 3), np.uint8), 96).shape == (96, 1, 3)  # no zero-width image


# --- round trips ------------------------------------------------------------------------------

def test_ffcv_loader_reads_back_every_image_and_label(messy, tmp_path):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    out = tmp_path / "ffcv"
    summary = to_ffcv.convert(messy, out, max_res_px=MAX_RES, workers=2, progress=False)
    assert summary["images"] == {"train": 15, "val": 6} and summary["skipped"] == {"train": 0, "val": 0}
    assert summary["ignored"] == {".txt": 2, ".DS_Store": 1}
    assert sorted(os.listdir(out)) == ["classes.json", "manifest.json", "train.beton", "val.beton"]
    assert set(read_manifest(out)) == {"train.beton", "val.beton"} and size_problems(out) == []
    dataset = scan(messy)
    assert (out / "classes.json").read_text().strip() == '["n01440764", "n01450737", "n01460710"]'

    side = 48
    loader = Loader(str(out / "train.beton"), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [CenterCropRGBImageDecoder((side, side), ratio=1.0)],
                                                "label": [IntDecoder()]})
    images, labels = zip(*[(x, y) for xs, ys in loader for x, y in zip(xs, ys)])
    train = dataset.splits["train"]
    assert [int(y[0]) for y in labels] == train.labels.tolist()  # every image, in order: count and histogram
    refs = []
    for i in range(len(train)):
        ref = reference(train.path(i))
        h, w = ref.shape[:2]
        c = min(h, w)  # FFCV's center crop with ratio 1: the central square, then resized
        crop = ref[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
        refs.append(cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA))
    for i, img in enumerate(images):
        assert mad(img, refs[i]) < MAD_LIMIT < mad(img, refs[i - 5]), train.rel(i)  # and tells images apart

    from ffcv.reader import Reader
    val = Reader(str(out / "val.beton"))
    assert val.num_samples == 6 and val.metadata["f1"].tolist() == dataset.splits["val"].labels.tolist()


def test_ffcv_proportion_mode_is_the_same_on_every_run(messy, tmp_path):
    from ffcv.reader import Reader
    modes = []
    for run in range(2):
        to_ffcv.convert(messy, tmp_path / str(run), splits=("train",), max_res_px=MAX_RES,
                        write_mode="proportion", compress_probability=0.5, progress=False)
        modes.append(Reader(str(tmp_path / str(run) / "train.beton")).metadata["f0"]["mode"].tolist())
    assert modes[0] == modes[1] and set(modes[0]) == {0, 1}  # 0 = jpg, 1 = raw


def _dali_read(tars, idxs):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=[str(p) for p in tars], index_paths=[str(p) for p in idxs],
                                         ext=["jpg", "cls"], missing_component_behavior="error", name="r")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    n = p.reader_meta("r")["epoch_size"]
    images, labels = [], []
    while len(images) < n:
        imgs, clss = p.run()
        for k in range(len(imgs)):
            images.append(np.array(imgs.at(k)))
            labels.append(int(bytes(np.array(clss.at(k))).decode("ascii")))
    return images[:n], labels[:n]


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_dali_reads_every_shard_sample(messy, tmp_path):
    from wds2idx import IndexCreator
    out = tmp_path / "shards"
    summary = to_shards.convert(messy, out, shard_size=4, max_res_px=MAX_RES, workers=2, progress=False)
    assert summary["images"] == {"train": 15, "val": 6} and summary["ignored"] == {".txt": 2, ".DS_Store": 1}
    shards = {s: [f"{s}-{i:06d}" for i in range(n)] for s, n in (("train", 4), ("val", 2))}  # 15 = 4+4+4+3
    written = [f"{b}.{e}" for bs in shards.values() for b in bs for e in ("tar", "idx", "crc")]
    assert sorted(os.listdir(out)) == sorted(["classes.json", "manifest.json"] + written)
    assert sorted(read_manifest(out)) == sorted(written) and size_problems(out) == []
    dataset = scan(messy)
    for name, bases in shards.items():
        for base in bases:  # our index is byte for byte what DALI's own wds2idx tool writes
            with IndexCreator(str(out / f"{base}.tar"), str(tmp_path / "ref.idx"), verbose=False) as ic:
                ic.create_index()
            assert (out / f"{base}.idx").read_text() == (tmp_path / "ref.idx").read_text()
        images, labels = _dali_read([out / f"{b}.tar" for b in bases], [out / f"{b}.idx" for b in bases])
        split = dataset.splits[name]
        order = to_shards.shard_order(name, len(split))  # train shuffled once, val in scan order
        assert labels == split.labels[order].tolist()  # every sample, in the written order
        assert sorted(order.tolist()) == list(range(len(split)))
        for i, img in zip(order.tolist(), images):
            ref = reference(split.path(i))
            assert mad(img, ref) < MAD_LIMIT < mad(img, ref[::-1, ::-1]), split.rel(i)

    before = _digest(out)
    to_shards.convert(messy, out, shard_size=4, max_res_px=MAX_RES, workers=1, progress=False)
    assert _digest(out) == before  # a rerun over complete output succeeds and writes the same bytes
    to_shards.convert(messy, out, shard_size=8, max_res_px=MAX_RES, workers=1, progress=False)
    left = sorted(p.name for p in out.glob("*-0*"))  # fewer, larger shards: no stale shard, index or checksums
    assert left == sorted(f"{s}-{i:06d}.{e}" for s, n in (("train", 2), ("val", 1)) for i in range(n)
                          for e in ("tar", "idx", "crc"))
    assert sorted(read_manifest(out)) == left and size_problems(out) == []
    to_shards.convert(messy, out, shard_size=8, max_res_px=MAX_RES, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]


# --- bad files, atomic publishing ---------------------------------------------------------------

def _read_back(tool: str, out: Path) -> dict:
    """{split: labels} as stored, without decoding images."""
    if tool == "to_ffcv":
        from ffcv.reader import Reader
        return {s: Reader(str(out / f"{s}.beton")).metadata["f1"].tolist() for s in ("train", "val")}
    labels = {}
    for s in ("train", "val"):
        labels[s] = []
        for tar in sorted(out.glob(f"{s}-*.tar")):
            with tarfile.open(tar) as t:
                labels[s] += [int(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".cls")]
    return labels


@pytest.mark.parametrize("tool", TOOLS)
def test_bad_files_stop_the_run_before_anything_is_published(bad_data, tmp_path, tool):
    root, bad = bad_data
    out = tmp_path / "out"
    out.mkdir()
    (out / "classes.json").write_text("from an earlier run")
    with pytest.raises(DatasetError) as e:
        TOOLS[tool].convert(root, out, max_res_px=MAX_RES, progress=False)
    message = str(e.value)
    assert all(rel in message for rel in bad) and "--skip-bad" in message  # every bad file, not just the first
    assert os.listdir(out) == ["classes.json"] and (out / "classes.json").read_text() == "from an earlier run"


@pytest.mark.parametrize("tool", TOOLS)
def test_skip_bad_leaves_them_out_and_lists_them(bad_data, messy, tmp_path, tool):
    root, bad = bad_data
    out = tmp_path / "out"
    summary = TOOLS[tool].convert(root, out, max_res_px=MAX_RES, skip_bad=True, progress=False)
    assert summary["skipped"] == {"train": 2, "val": 1} and summary["images"] == {"train": 15, "val": 6}
    assert sorted(line.split("\t")[0] for line in (out / "skipped.txt").read_text().splitlines()) == bad
    full = scan(root)  # written: these files in the tool's order, minus the bad ones
    order = {s: to_shards.shard_order(s, len(full.splits[s])) if tool == "to_shards" else range(len(full.splits[s]))
             for s in ("train", "val")}
    expected = {s: [int(full.splits[s].labels[i]) for i in order[s] if full.splits[s].rel(i) not in bad]
                for s in ("train", "val")}
    assert _read_back(tool, out) == expected
    good = scan(messy)  # the same files minus the bad ones
    assert sorted(expected["train"]) == sorted(good.splits["train"].labels.tolist())
    assert not [p for p in os.listdir(out) if p.endswith(".partial")]
    TOOLS[tool].convert(messy, out, max_res_px=MAX_RES, progress=False)
    assert not (out / "skipped.txt").exists()  # a clean rerun does not keep a stale list


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> Path:
    """Big enough that one worker takes over a second, so a kill lands part-way."""
    return make_sample(tmp_path_factory.mktemp("kill"), num_classes=4, train_per_class=40, val_per_class=2,
                       quiet=True)


@pytest.mark.parametrize("tool", TOOLS)
def test_sigkill_part_way_leaves_no_output_and_rerun_succeeds(kill_data, tmp_path, tool):
    out = tmp_path / "out"
    partial = out / (".train.beton.partial" if tool == "to_ffcv" else ".train-000000.tar.partial")
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, f"convert/{tool}.py", str(kill_data), "--out", str(out),
                                 "--workers", "1"], cwd=REPO, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and psutil.Process(proc.pid).children()) and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.01)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert proc.poll() is None, "finished before the kill: make kill_data bigger"
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive  # workers die with the converter instead of running on as orphans
    assert not [p for p in os.listdir(out) if not p.startswith(".")]  # nothing at any final path
    summary = TOOLS[tool].convert(kill_data, out, max_res_px=MAX_RES, progress=False)
    assert summary["images"] == {"train": 160, "val": 8}
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # the killed run's partials are gone


@pytest.mark.parametrize("tool", TOOLS)
def test_a_preset_sets_the_storage_defaults_and_a_flag_still_wins(tool):
    from convert.cli import PRESETS, parse_with_preset
    parser = TOOLS[tool].build_parser
    fast = parse_with_preset(parser(), ["data", "--preset", "fast"])
    assert (fast.max_res_px, fast.jpeg_quality) == (400, 90)
    if tool == "to_ffcv":
        assert (fast.write_mode, fast.compress_probability) == ("proportion", 0.5)
    assert parse_with_preset(parser(), ["data", "--preset", "fast", "--max-resolution", "448"]).max_res_px == 448
    default = parse_with_preset(parser(), ["data"])
    assert default.max_res_px == PRESETS["accuracy"]["max_res_px"] == 512
