"""After training, on a model trained a few steps on generated data: export.py (ONNX checked by
onnxruntime, TorchScript, fp16), predict.py (PyTorch and ONNX paths, broken images), the TensorBoard
scalars of a run, and the per-class report of --evaluate.

    python -m pytest -q tests/test_deploy.py
"""
import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_train import ok, records, run_train

from core.dataset import split_index
from core.errors import UserError
from deploy.images import read_images
from engine.metrics import per_class_report
from loaders import IMAGENET_MEAN, IMAGENET_STD, build_loader, normalize
from model import create_model

REPO = Path(__file__).resolve().parent.parent
ARCH, SIZE = "mobilenetv3_small_100", 32  # test_train.TINY's
# --bn-momentum 1.0: BatchNorm keeps the last batch's statistics, so after six steps the outputs still
# differ from image to image (at the default 0.01 they collapse to one vector, and parity would be
# trivially true). EMA decay 0.5 makes the EMA weights clearly differ from the trained ones.
TRAIN = ["--loader", "torchvision", "--epochs", "2", "--bn-momentum", "1.0", "--model-ema",
         "--model-ema-decay", "0.5", "--tensorboard"]


def command(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tiny_sample, tmp_path_factory):
    """(output dir, train.py's stdout) of a two-epoch run."""
    out = tmp_path_factory.mktemp("deploy") / "run"
    proc = ok(run_train(["--data", str(tiny_sample), *TRAIN], out))
    return out, proc.stdout


@pytest.fixture(scope="module")
def exported(run):
    """(ONNX path, TorchScript path, export.py's stdout) for model_best.pth, default settings."""
    out, _ = run
    proc = ok(command("export.py", out / "model_best.pth", "--onnx", out / "model.onnx",
                      "--torchscript", out / "model.pt"))
    return out / "model.onnx", out / "model.pt", proc.stdout


@pytest.fixture(scope="module")
def val(tiny_sample):
    """The torchvision loader's own val batch (uint8 crops, labels, classes) and its files, in order."""
    loader = build_loader("torchvision", split="val", data=tiny_sample, batch_size=64, workers=0, image_size=SIZE)
    (images, labels), = list(loader)
    return images, labels, loader.classes, split_index(tiny_sample, "val").paths


def reference(checkpoint: Path, ema: bool) -> torch.nn.Module:
    """The network as the checkpoint holds it, built here without the deploy package."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = ({k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"} if ema
               else state["model"])
    net = create_model(ARCH, num_classes=len(state["classes"]))
    net.load_state_dict(weights)
    return net.eval()


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    return session.run(None, {"images": x.numpy().astype(dtype)})[0].astype(np.float32)


# -- export ------------------------------------------------------------------------------------
def test_predict_preprocessing_is_the_loaders_val_pipeline_pixel_for_pixel(val):
    images, _, _, files = val
    crops, good, bad = read_images(files, SIZE)
    assert bad == [] and good == [Path(f) for f in files]
    assert torch.equal(crops, images)


def test_onnx_matches_pytorch_on_the_val_images_and_its_metadata_round_trips(run, exported, val):
    out, _ = run
    onnx_path, _, stdout = exported
    images, _, classes, _ = val
    x = normalize(images)
    with torch.no_grad():
        ema_logits = reference(out / "model_best.pth", ema=True)(x).numpy()
        raw_logits = reference(out / "model_best.pth", ema=False)(x).numpy()
    got = run_onnx(onnx_path, x)
    diff = float(np.abs(got - ema_logits).max())
    print(f"onnxruntime vs PyTorch (EMA weights) on {len(x)} val images: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    assert (got.argmax(1) == ema_logits.argmax(1)).all()
    assert len(set(ema_logits.argmax(1).tolist())) > 1  # the check could have told the images apart
    assert np.abs(got - raw_logits).max() > 1e-2  # the EMA weights, not the trained ones
    assert run_onnx(onnx_path, x[:1]).shape == (1, len(classes))  # the batch axis is dynamic

    # export.py's own check, and the latency it promises
    reported = float(re.search(r"onnxruntime vs PyTorch on 12 images: max abs logit diff (\S+)", stdout)[1])
    assert reported <= 1e-4 and "top-1 equal on 12/12" in stdout
    assert re.search(r"CPU latency at 32 px .*: batch 1 [\d.]+ ms .*, batch 32 [\d.]+ ms", stdout)

    model = onnx.load(onnx_path)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == classes
    assert (meta["arch"], meta["weights"], int(meta["image_size"]), int(meta["resize_size"])) == (ARCH, "ema", 32, 36)
    assert float(meta["crop_ratio"]) == 0.875
    assert tuple(json.loads(meta["mean"])) == IMAGENET_MEAN and tuple(json.loads(meta["std"])) == IMAGENET_STD
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]  # folded
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch


def test_torchscript_matches_pytorch(run, exported, val):
    out, _ = run
    _, torchscript_path, stdout = exported
    x = normalize(val[0])
    with torch.no_grad():
        want = reference(out / "model_best.pth", ema=True)(x)
        got = torch.jit.load(str(torchscript_path))(x)
    assert (got - want).abs().max() <= 1e-4
    assert "TorchScript vs PyTorch on 12 images" in stdout


def test_no_ema_and_fp16_export_the_trained_weights_in_float16(run, val, tmp_path):
    out, _ = run
    path = tmp_path / "fp16.onnx"
    ok(command("export.py", out / "checkpoint.pth", "--onnx", path, "--no-ema", "--fp16", "--no-latency"))
    x = normalize(val[0])
    with torch.no_grad():
        want = reference(out / "checkpoint.pth", ema=False)(x).numpy()
        ema = reference(out / "checkpoint.pth", ema=True)(x).numpy()
    got = run_onnx(path, x)
    assert {p.key: p.value for p in onnx.load(path).metadata_props}["weights"] == "model"
    assert onnx.load(path).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()  # export.py's float16 tolerance
    assert np.abs(got - ema).max() > 1e-1


def test_a_torchvision_weights_file_exports_with_numbered_classes(tiny_sample, tmp_path):
    import torchvision
    weights = tmp_path / "mobilenet_v3_small-tv.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights)
    proc = ok(command("export.py", weights, "--arch", "mobilenet_v3_small", "--image-size", "32", "--images",
                      tiny_sample / "val", "--onnx", tmp_path / "tv.onnx", "--no-latency"))
    assert "no class names in" in proc.stdout and "pass --classes FILE" in proc.stdout
    meta = {p.key: p.value for p in onnx.load(tmp_path / "tv.onnx").metadata_props}
    assert json.loads(meta["classes"]) == [str(i) for i in range(1000)] and meta["weights"] == "state_dict"


def test_export_errors_name_the_flag_and_write_nothing(run, tmp_path, monkeypatch):
    out, _ = run
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    torch.save({**state, "ema": None}, tmp_path / "no_ema.pth")
    torch.save(state["model"], tmp_path / "bare.pth")
    # a checkpoint from before checkpoints carried their BatchNorm eps, trained from weights no longer there
    old = {k: v for k, v in state.items() if k != "bn_eps"}
    torch.save({**old, "config": {**state["config"], "pretrained": "gone.pth"}}, tmp_path / "from_gone.pth")
    (tmp_path / "names.json").write_text(json.dumps(["a", "b"]))
    monkeypatch.chdir(tmp_path)
    export_main = runpy.run_path(str(REPO / "export.py"))["main"]  # in this process: no torch start-up each
    cases = [
        (["no_ema.pth", "--onnx", "m.onnx", "--ema"], "has no EMA weights (trained without --model-ema): drop --ema"),
        (["bare.pth", "--onnx", "m.onnx"], "is a bare state_dict with no training config: pass --arch"),
        (["bare.pth", "--arch", ARCH, "--classes", "names.json", "--onnx", "m.onnx"],
         "names.json: 2 class names for a model with 4 classes"),
        (["no_ema.pth"], "nothing to write: pass --onnx FILE and/or --torchscript FILE"),
        (["from_gone.pth", "--onnx", "m.onnx"], "trained from --pretrained gone.pth, which is not here, and "
                                                "BatchNorm's eps depends on its format: pass --bn-eps"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            export_main(args)
    proc = command("export.py", "nowhere.pth", "--onnx", "m.onnx", cwd=tmp_path)  # the command's exit
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "nowhere.pth: no such file (a checkpoint such as OUTPUT_DIR/model_best.pth, or a --pretrained weights file)"]
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*tmp*"))


def test_an_export_that_does_not_match_pytorch_is_not_written(run, tmp_path, monkeypatch):
    from deploy.onnx_model import OnnxModel
    out, _ = run
    real_call = OnnxModel.__call__
    monkeypatch.setattr(OnnxModel, "__call__", lambda self, x: real_call(self, x) + 1e-3)  # a subtly wrong file
    with pytest.raises(UserError, match=r"onnxruntime does not match PyTorch \(max abs logit diff 1.0\de-03"):
        runpy.run_path(str(REPO / "export.py"))["main"]([str(out / "model_best.pth"), "--onnx",
                                                          str(tmp_path / "m.onnx")])
    assert list(tmp_path.iterdir()) == []


# -- predict -----------------------------------------------------------------------------------
ANSWER = re.compile(r"^(.+): (\S+ [01]\.\d{4}(?:, \S+ [01]\.\d{4})*)$")


def answers(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """predict.py's lines 'PATH: name p, name p, ...' -> {file name: [(name, p), ...]}."""
    out = {}
    for m in filter(None, map(ANSWER.match, stdout.splitlines())):
        out[Path(m[1]).name] = [(n, float(p)) for n, p in (item.rsplit(" ", 1) for item in m[2].split(", "))]
    return out


def test_predict_answers_every_good_image_names_every_bad_one_and_onnx_agrees(run, exported, val, tmp_path):
    out, _ = run
    images, _, classes, files = val
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder)
    (folder / "notes.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.JPEG").write_bytes(Path(files[0]).read_bytes()[:300])
    (folder / "readme.txt").write_text("not an image file name: skipped")
    bad = {"notes.jpg", "empty.png", "cut.JPEG", "missing.jpg"}

    by_weights = command("predict.py", folder, tmp_path / "missing.jpg", "--weights", out / "model_best.pth")
    by_onnx = command("predict.py", folder, tmp_path / "missing.jpg", "--onnx", exported[0])
    for proc in (by_weights, by_onnx):
        assert proc.returncode == 1, proc.stderr
        named = [Path(line.split(": ", 1)[0]).name for line in proc.stderr.strip().splitlines()[:-1]]
        assert sorted(named) == sorted(bad)
        assert proc.stderr.strip().splitlines()[-1] == ("4 of 16 inputs could not be read (named above); "
                                                        "the other 12 are answered")
    pytorch, onnx_answers = answers(by_weights.stdout), answers(by_onnx.stdout)
    assert sorted(pytorch) == sorted(Path(f).name for f in files)
    with torch.no_grad():
        probs = reference(out / "model_best.pth", ema=True)(normalize(images)).softmax(1)
    for f, p in zip(files, probs):
        name = Path(f).name
        assert [c for c, _ in pytorch[name]] == [c for c, _ in onnx_answers[name]]  # top-5 (all 4 classes)
        top = p.topk(len(classes))
        assert [c for c, _ in pytorch[name]] == [classes[i] for i in top.indices]
        assert [q for _, q in pytorch[name]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [q for _, q in onnx_answers[name]] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_predict_topk_and_a_folder_without_images(run, exported, val, tmp_path):
    proc = ok(command("predict.py", val[3][0], "--onnx", exported[0], "--topk", "2"))
    (line,) = proc.stdout.strip().splitlines()
    assert len(line.split(": ", 1)[1].split(", ")) == 2
    proc = command("predict.py", tmp_path, "--onnx", exported[0])
    assert proc.returncode == 1 and proc.stderr.strip() == f"no image files in {tmp_path}"


# -- TensorBoard, history.png, --evaluate ---------------------------------------------------------
def test_tensorboard_scalars_read_back_with_tensorboards_reader(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, stdout = run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    logged = [float(m) for m in re.findall(r"step \d+/3  loss (\S+)", stdout)]
    assert [e.step for e in scalars["window/loss"]] == list(range(6))  # 2 epochs x 3 steps, --print-freq 1
    assert [e.value for e in scalars["window/loss"]] == pytest.approx(logged, abs=1e-4)
    assert [e.value for e in scalars["window/lr"]] == pytest.approx([0.05] * 6)
    assert len(scalars["window/imgs_per_s"]) == len(scalars["window/data_wait_pct"]) == 6
    recs = records(out)
    for key, tag, scale in [("acc1", "epoch/acc1", 1), ("acc5", "epoch/acc5", 1), ("ema_acc1", "epoch/ema_acc1", 1),
                            ("train_loss", "epoch/train_loss", 1), ("imgs_per_s", "epoch/imgs_per_s", 1),
                            ("data_wait_frac", "epoch/data_wait_pct", 100), ("val_loss", "epoch/val_loss", 1)]:
        assert [e.step for e in scalars[tag]] == [1, 2]
        assert [e.value for e in scalars[tag]] == pytest.approx([scale * r[key] for r in recs], rel=1e-5), tag


def test_history_png_has_the_throughput_panel(run):
    out, _ = run
    header = (out / "history.png").read_bytes()[:24]
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (1500, 400)  # three 5 x 4 in panels at 100 dpi: loss, accuracy, img/s + data-wait


def test_evaluate_writes_per_class_accuracy_and_the_most_confused_pairs(run, val, tiny_sample, tmp_path):
    out, _ = run
    images, labels, classes, _ = val
    ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--evaluate",
                  "--resume", str(out / "checkpoint.pth")], tmp_path))
    result = json.loads((tmp_path / "eval.json").read_text())
    with torch.no_grad():  # --evaluate loads the trained weights, not the EMA
        predicted = reference(out / "checkpoint.pth", ema=False)(normalize(images)).argmax(1)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.int64)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    assert result["per_class"] == per_class_report(confusion.tolist(), classes)["per_class"]
    assert result["confused_pairs"] == per_class_report(confusion.tolist(), classes)["confused_pairs"]
    assert sum(c["images"] for c in result["per_class"]) == 12
    assert sum(c["acc1"] * c["images"] for c in result["per_class"]) / 12 == pytest.approx(result["acc1"])


def test_per_class_report_counts_and_orders_pairs():
    confusion = [[5, 3, 0],   # a: 5 right, 3 taken for b
                 [1, 2, 1],   # b
                 [0, 3, 0]]   # c: all 3 taken for b
    report = per_class_report(confusion, ["a", "b", "c"], top_pairs=3)
    assert report["per_class"] == [{"class": "a", "images": 8, "acc1": 62.5},
                                   {"class": "b", "images": 4, "acc1": 50.0},
                                   {"class": "c", "images": 3, "acc1": 0.0}]
    assert report["confused_pairs"] == [  # most images first; ties in class order
        {"true": "a", "predicted": "b", "images": 3, "share_pct": 37.5},
        {"true": "c", "predicted": "b", "images": 3, "share_pct": 100.0},
        {"true": "b", "predicted": "a", "images": 1, "share_pct": 25.0}]
    assert per_class_report([[0, 0], [0, 1]], ["x", "y"])["per_class"][0]["acc1"] is None


def test_export_takes_the_runs_val_resolution_and_crop_ratio(run, tmp_path, tiny_sample):
    from deploy.onnx_model import Preprocess, metadata
    from deploy.weights import load_trained
    out, _ = run
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    config = {**state["config"], "val_res": [48, 64], "val_crop_ratio": 0.6}
    torch.save({**state, "config": config}, tmp_path / "wide.pth")
    trained = load_trained(tmp_path / "wide.pth")
    assert (trained.image_size, trained.crop_ratio) == (48, 0.6)
    meta = metadata(trained)
    assert (meta["image_size"], meta["resize_size"], meta["crop_ratio"]) == ("48", "80", "0.6")  # int(48 / 0.6)
    # predict's crops are the loader's val crops at that ratio
    loader = build_loader("torchvision", split="val", data=tiny_sample, batch_size=64, workers=0, image_size=48,
                          val_crop_ratio=0.6)
    images, labels = next(iter(loader))
    from deploy.images import read_images
    from core.dataset import split_index
    crops, _, _ = read_images(split_index(tiny_sample, "val").paths, 48, 0.6)
    assert torch.equal(crops, images.contiguous())
    assert Preprocess.of_loaders(48, 0.6).resize_size == 80
