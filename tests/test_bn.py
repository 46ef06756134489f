"""BatchNorm's running statistics at any run length: --bn-momentum auto, the chance warning, and
--evaluate taking the network from its checkpoint.

    python -m pytest -q tests/test_bn.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convert.make_sample import make_sample
from core.errors import ConfigError
from engine.config import parse_config
from model.mobilenetv3 import BN_MOMENTUM, auto_bn_momentum

REPO = Path(__file__).resolve().parent.parent
IMAGENET_TRAIN_IMAGES = 1_281_167
# A short run as a user's own would be: SGD 0.1 with momentum, cosine, label smoothing, 10 epochs of
# 10 steps (5 classes x 32 train images, batch 16) at 48 px. Measured at the model's 0.01: 20.0 (chance)
# at every epoch; at 0.1: 98.0.
SHORT_RUN = ["--image-size", "48", "--batch_size", "16", "--workers", "1", "--learning-rate", "0.1", "--opt", "sgd",
             "--momentum", "0.9", "--lr-scheduler", "cosine", "--label-smoothing", "0.1", "--wd", "5e-5",
             "--epochs", "10", "--print-freq", "100", "--device", "cpu", "--loader", "torchvision",
             "--checkpoint-every", "0", "--warmup-steps-timing", "1"]
CLASSES = 5


def train(args, out: Path) -> subprocess.CompletedProcess:
    """train.py with no --arch of its own (TINY in test_train.py has one): the caller's or the default."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--output-dir", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- the momentum a run gets -------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["mobilenetv3_large_1p", "mobilenetv3_large_8p", "mobilenetv3_large_fast"])
def test_the_reference_recipes_keep_the_models_own_momentum_on_imagenet(recipe):
    args = parse_config(["--config", str(REPO / "configs" / f"{recipe}.yaml")])
    assert args.bn_momentum == "auto"
    steps = args.epochs * (IMAGENET_TRAIN_IMAGES // args.batch_size)  # 600 x 1251 for the 8p recipe
    assert auto_bn_momentum(steps) == BN_MOMENTUM == 0.01


def test_auto_momentum_settles_the_statistics_early_in_the_run_and_explicit_values_win():
    assert auto_bn_momentum(0) == auto_bn_momentum(100) == auto_bn_momentum(800) == 0.1  # PyTorch's default
    for steps in (1000, 2000, 5000, 9000):  # between the clamps: initial statistics under ~1% after 5%
        momentum = auto_bn_momentum(steps)
        assert 0.01 < momentum < 0.1 and (1 - momentum) ** (0.05 * steps) < 0.0105, steps
    momenta = [auto_bn_momentum(s) for s in range(0, 20_000, 50)]
    assert momenta == sorted(momenta, reverse=True) and momenta[-1] == 0.01
    assert parse_config(["--bn-momentum", "0.3"]).bn_momentum == 0.3
    assert parse_config(["--config", str(REPO / "configs/mobilenetv3_large_timm.yaml")]).bn_momentum == 0.1
    assert parse_config(["--config", str(REPO / "configs/sample_cpu.yaml")]).bn_momentum == "auto"
    with pytest.raises(ConfigError, match=r"--bn-momentum 0: give auto or a number in \(0, 1\], e.g. 0.1"):
        parse_config(["--bn-momentum", "0"])
    from engine.config import bn_momentum
    with pytest.raises(ConfigError, match="--bn-momentum 1.5: give auto"):
        bn_momentum(1.5)  # as a recipe gives it


def test_a_resumed_run_keeps_the_momentum_it_was_trained_with():
    from train import bn_momentum_for
    lines = []
    auto, explicit = parse_config([]), parse_config(["--bn-momentum", "0.2"])
    assert bn_momentum_for(auto, 100, None, lines.append) == 0.1
    assert lines == ["train.py: BatchNorm momentum 0.1 (--bn-momentum auto, for this run's 100 steps; the model's "
                     "own 0.01 is for long runs)"]
    # a checkpoint's own, whatever this run's length: its continuation is the run it began
    assert bn_momentum_for(auto, 10**6, {"config": {"bn_momentum": 0.05}}, lines.append) == 0.05
    assert bn_momentum_for(auto, 100, {"config": {"bn_momentum": None}}, lines.append) == BN_MOMENTUM  # before auto
    assert len(lines) == 2  # the model's own is not announced
    assert bn_momentum_for(explicit, 100, {"config": {"bn_momentum": 0.05}}, lines.append) == 0.2


def test_the_chance_note_needs_chance_accuracy_and_a_falling_loss():
    from engine.records import chance_note
    first = {"acc1": 20.0, "train_loss": 1.56}
    fallen = {"acc1": 28.0, "train_loss": 1.05}
    note = chance_note([first, fallen], 5, 0.01, 100)
    assert note.startswith("train.py: val accuracy 28.0% is near chance (20.0% for 5 classes)")
    assert "Acc@1 " not in note  # the lines that start with it are the results
    assert note.endswith("(momentum 0.01 for this run's 100 steps): raise --bn-momentum (e.g. 0.1)")
    assert chance_note([first], 5, 0.01, 100) is None  # nothing to compare yet
    assert chance_note([first, {**fallen, "acc1": 31.0}], 5, 0.01, 100) is None  # above 1.5 x chance
    assert chance_note([first, {**fallen, "train_loss": 1.4}], 5, 0.01, 100) is None  # the loss barely fell


# -- a short run at the defaults ----------------------------------------------------------------
@pytest.fixture(scope="module")
def short_runs(tmp_path_factory) -> dict:
    """The same short run at the defaults and at --bn-momentum 0.1: (stdout, output folder) each."""
    root = tmp_path_factory.mktemp("bn")
    data = make_sample(root / "data", num_classes=CLASSES, train_per_class=32, val_per_class=10, quiet=True,
                       workers=2)
    runs = {}
    for name, extra in (("defaults", []), ("0.1", ["--bn-momentum", "0.1"])):
        out = root / name
        proc = ok(train(["--data", str(data), "--arch", "mobilenetv3_small_100", *SHORT_RUN, *extra], out))
        runs[name] = (proc.stdout, out)
    return {"data": data, **runs}


def test_a_short_run_at_the_defaults_evaluates_as_well_as_with_momentum_0_1(short_runs):
    (stdout, out), (_, reference) = short_runs["defaults"], short_runs["0.1"]
    acc1, reference_acc1 = records(out)[-1]["acc1"], records(reference)[-1]["acc1"]
    assert acc1 >= reference_acc1 - 5 and acc1 > 1.5 * 100 / CLASSES, (acc1, reference_acc1)
    assert json.loads((out / "config.json").read_text())["bn_momentum"] == 0.1
    assert "train.py: BatchNorm momentum 0.1 (--bn-momentum auto, for this run's 100 steps" in stdout
    assert "near chance" not in stdout


def test_a_run_at_chance_with_a_falling_loss_names_the_momentum_and_the_flag(short_runs, tmp_path):
    # today's defaults, the model's own 0.01, for the first 4 epochs of the short run: at chance
    args = ["--data", str(short_runs["data"]), "--arch", "mobilenetv3_small_100", *SHORT_RUN, "--epochs", "4",
            "--bn-momentum", "0.01"]
    proc = ok(train(args, tmp_path))
    notes = [line for line in proc.stdout.splitlines() if "near chance" in line]
    assert len(notes) == 1, proc.stdout
    assert "momentum 0.01 for this run's 40 steps): raise --bn-momentum" in notes[0]
    assert "BatchNorm momentum" not in proc.stdout.split(notes[0])[0]  # an explicit value is not announced


def test_evaluate_takes_the_network_from_the_checkpoint(short_runs, tmp_path):
    _, out = short_runs["defaults"]
    checkpoint = out / "checkpoint.pth"
    evaluate = ["--data", str(short_runs["data"]), "--loader", "torchvision", "--device", "cpu", "--workers", "1",
                "--image-size", "48", "--evaluate", "--resume", str(checkpoint)]
    proc = ok(train(evaluate, tmp_path / "eval"))  # no --arch: the default is mobilenetv3_large_100
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["acc1"] == pytest.approx(records(out)[-1]["acc1"]) and result["val_images"] == CLASSES * 10
    assert json.loads((tmp_path / "eval" / "config.json").read_text())["arch"] == "mobilenetv3_small_100"
    assert "Acc@1 " in proc.stdout
    wrong = train(evaluate + ["--arch", "mobilenetv3_large_100"], tmp_path / "wrong")
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines() == [
        f"--arch mobilenetv3_large_100: {checkpoint} holds a mobilenetv3_small_100; drop --arch to evaluate it"]
