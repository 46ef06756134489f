"""train.py end to end on the CPU: real loaders, real MobileNetV3, real torchrun + gloo DDP."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from engine.config import parse_config, schedule_config
from engine.optim import lr_at, param_groups
from model import create_model

REPO = Path(__file__).resolve().parent.parent
TINY = ["--arch", "mobilenetv3_small_100", "--image-size", "32", "--batch_size", "8", "--workers", "1",
        "--learning-rate", "0.05", "--opt", "sgd", "--print-freq", "1", "--device", "cpu",
        "--warmup-steps-timing", "1"]


def run_train(args, out: Path, timeout=300, env=None, torchrun_nproc=None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_nproc}"]
                if torchrun_nproc else [sys.executable])
    cmd = launcher + [str(REPO / "train.py"), *TINY, "--output-dir", str(out), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- the command line --------------------------------------------------------------------------
REFERENCE = {  # the reference's flags, in its spelling, with the value each should carry
    "--arch": ("mobilenet_v3_large", "arch", "mobilenet_v3_large"),
    "--data": ("/x", "data", "/x"),
    "--batch_size": ("1024", "batch_size", 1024),
    "--learning-rate": ("0.064", "learning_rate", 0.064),
    "--print-freq": ("7", "print_freq", 7),
    "--epochs": ("3", "epochs", 3),
    "--apex-opt-level": ("O2", "apex_opt_level", "O2"),
    "--lr-step-size": ("4", "lr_step_size", 4),
    "--lr-gamma": ("0.5", "lr_gamma", 0.5),
    "--wd": ("0.001", "wd", 0.001),
    "--device_id": ("3", "device_id", 3),
    "--workers": ("5", "workers", 5),
    "--max_steps": ("11", "max_steps", 11),
}


@pytest.mark.parametrize("twin", [False, True], ids=["reference-spelling", "hyphen-underscore-twin"])
def test_every_reference_flag_parses(twin):
    argv = ["--apex"]
    for flag, (value, _, _) in REFERENCE.items():
        if twin:
            flag = "--" + (flag[2:].replace("_", "-") if "_" in flag else flag[2:].replace("-", "_"))
        argv += [flag, value]
    args = parse_config(argv)
    assert args.apex is True
    for flag, (_, dest, expected) in REFERENCE.items():
        assert getattr(args, dest) == expected, flag


def test_a_recipe_sets_defaults_and_flags_override_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_size: 256\nlearning-rate: 0.5\nauto_augment: imagenet\n")
    args = parse_config(["--config", str(recipe), "--learning-rate", "0.1"])
    assert (args.batch_size, args.learning_rate, args.auto_augment) == (256, 0.1, "imagenet")
    recipe.write_text("batch_sise: 256\n")
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'"):
        parse_config(["--config", str(recipe)])


def test_the_reference_recipes_match_the_published_settings():
    eight = parse_config(["--config", str(REPO / "configs/mobilenetv3_large_8p.yaml")])
    one = parse_config(["--config", str(REPO / "configs/mobilenetv3_large_1p.yaml")])
    assert (eight.batch_size, eight.learning_rate, one.batch_size, one.learning_rate) == (1024, 0.064, 128, 0.008)
    for a in (eight, one):
        assert (a.arch, a.epochs, a.opt, a.wd, a.lr_step_size, a.lr_gamma) == (
            "mobilenetv3_large_100", 600, "rmsprop", 1e-5, 2, 0.973)
        assert (a.auto_augment, a.random_erase, a.rmsprop_alpha, a.rmsprop_eps) == ("imagenet", 0.2, 0.9, 0.0316)


# -- pure parts --------------------------------------------------------------------------------
def test_lr_schedule_values_at_known_steps():
    step = dict(base_lr=0.064, steps_per_epoch=100, epochs=600, schedule="step", step_size=2, gamma=0.973)
    assert lr_at(0, **step) == 0.064
    assert lr_at(199, **step) == 0.064                      # epoch 1.99: no decay yet
    assert lr_at(200, **step) == pytest.approx(0.064 * 0.973)
    assert lr_at(100 * 599, **step) == pytest.approx(0.064 * 0.973 ** 299)
    warm = dict(step, warmup_epochs=5)
    assert lr_at(0, **warm) == pytest.approx(0.064 * 0.01)
    assert lr_at(250, **warm) == pytest.approx(0.064 * (0.01 + 0.99 * 0.5))
    assert lr_at(500, **warm) == 0.064 and lr_at(700, **warm) == pytest.approx(0.064 * 0.973)
    cos = dict(base_lr=1.0, steps_per_epoch=10, epochs=10, schedule="cosine")
    assert lr_at(0, **cos) == 1.0 and lr_at(50, **cos) == pytest.approx(0.5) and lr_at(100, **cos) == 0.0
    assert lr_at(25, **cos) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_lr_fractional_step_size_and_warmup_from_a_given_lr():
    timm = dict(base_lr=0.064, steps_per_epoch=10, epochs=600, step_size=2.4, warmup_epochs=3, warmup_lr=1e-6)
    assert lr_at(0, **timm) == 1e-6
    assert lr_at(15, **timm) == pytest.approx(1e-6 + (0.064 - 1e-6) * 0.5)
    # Whole epochs after warm-up: floor(epoch / 2.4) decays, so decays start epochs 3, 5, 8, 10, 12.
    decays = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5]
    assert [lr_at(30 + 10 * e + 9, **timm) for e in range(13)] == pytest.approx([0.064 * 0.973 ** d for d in decays])
    with pytest.raises(ConfigError, match="--lr-step-size 0"):
        schedule_config(parse_config(["--lr-step-size", "0"]))


def test_the_timm_recipe_matches_timms_published_settings():
    a = parse_config(["--config", str(REPO / "configs/mobilenetv3_large_timm.yaml")])
    assert (a.arch, a.epochs, a.batch_size, a.learning_rate, a.opt, a.rmsprop_eps, a.wd) == (
        "mobilenetv3_large_100", 600, 1024, 0.064, "rmsprop", 0.0316, 1e-5)
    assert (a.lr_scheduler, a.lr_step_size, a.lr_gamma, a.warmup_epochs, a.warmup_lr) == ("step", 2.4, 0.973, 3, 1e-6)
    assert (a.dropout, a.drop_path, a.bn_eps, a.model_ema, a.model_ema_decay, a.label_smoothing) == (
        0.2, 0.2, 1e-5, True, 0.9999, 0.1)
    assert (a.auto_augment, a.ra_magnitude, a.ra_magnitude_std, a.random_erase, a.random_erase_mode) == (
        "randaugment", 27, 1.5, 0.2, "pixel")
    assert schedule_config(a).lr_at(3 * 100, 0.064, 100) == 0.064  # warm-up over, no decay yet
    # The trainer hands the recipe's model and augmentation settings on.
    from engine.build import build_augment, build_model
    net = build_model(a, 10, torch.device("cpu"), log=lambda msg: None)
    drops = [m.p for m in net.modules() if type(m).__name__ == "DropPath"]
    assert max(drops) == pytest.approx(0.2 * 14 / 16) and len(drops) == 9  # residual bnecks after the first
    assert all(m.eps == 1e-5 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    aug = build_augment(a, 10)
    assert (aug.randaugment["magnitude_std"], aug.erase_mode) == (1.5, "pixel")


def test_weight_decay_skips_norm_layers_and_biases():
    net = create_model("mobilenetv3_small_100", num_classes=10)
    decay, no_decay = param_groups(net, 1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    norm_and_bias = {id(p) for m in net.modules() for name, p in m.named_parameters(recurse=False)
                     if isinstance(m, torch.nn.BatchNorm2d) or name == "bias"}
    assert {id(p) for p in no_decay["params"]} == norm_and_bias
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_each_ranks_generator_state_round_trips_and_a_rank_the_checkpoint_lacks_gets_its_own(tmp_path):
    import random

    from engine import checkpoint as ckpt
    from engine.distributed import Runtime
    cpu = torch.device("cpu")
    ckpt.seed_rank(7, 0)
    torch.save(ckpt.gather_rng_state(Runtime(cpu)), tmp_path / "rng.pth")
    want = torch.rand(3), random.random()
    saved = torch.load(tmp_path / "rng.pth", weights_only=True)  # as a checkpoint is read back
    ckpt.seed_rank(8, 0)
    lines = []
    assert ckpt.restore_rng_state(saved, Runtime(cpu, rank=0, world_size=2), 7, 10, lines.append) == [1]
    got = torch.rand(3), random.random()
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
    assert "holds the generator states of 1 of 2 ranks; rank(s) 1 start theirs from (--seed, rank, step 10)" \
        in lines[0]
    ckpt.restore_rng_state(saved, Runtime(cpu, rank=1, world_size=2), 7, 10, lines.append)
    rank1 = torch.rand(3)
    ckpt.seed_rank(7, 1)
    assert not torch.equal(rank1, want[0]) and not torch.equal(rank1, torch.rand(3))  # its own, not the start's
    legacy = {"torch": saved["ranks"][0]["torch"], "python": saved["ranks"][0]["python"]}  # rank 0's only, as before
    ckpt.restore_rng_state(legacy, Runtime(cpu), 7, 10, lines.append)
    assert torch.equal(torch.rand(3), want[0])


RNG_ROUND_TRIP = """
import sys, torch
from engine import checkpoint as ckpt
from engine.distributed import Runtime
runtime = Runtime(torch.device("cuda", 0))
if sys.argv[1] == "save":
    ckpt.seed_rank(7, 0)
    torch.save(ckpt.gather_rng_state(runtime), sys.argv[2])
else:
    ckpt.seed_rank(9, 0)
    ckpt.restore_rng_state(torch.load(sys.argv[2], weights_only=True), runtime, 7, 0, print)
print(torch.rand(4, device="cuda").tolist())
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_checkpoint_resumes_in_a_process_that_sees_fewer_devices(tmp_path):
    """Saved by a process that sees every GPU, restored by one that sees one: each rank keeps its
    own device's state only, so nothing is indexed past the devices there are."""
    def python(mode: str, env: dict) -> str:
        proc = subprocess.run([sys.executable, "-c", RNG_ROUND_TRIP, mode, str(tmp_path / "rng.pth")], cwd=REPO,
                              capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()[-1]
    assert python("save", {}) == python("restore", {"CUDA_VISIBLE_DEVICES": "0"})


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", ["torchvision", "ffcv", "dali"])
def test_a_short_run_trains_and_evaluates_with_each_loader(tiny_converted, tmp_path, loader):
    out = tmp_path / loader
    ema = ["--model-ema", "--model-ema-decay", "0.5"] if loader == "torchvision" else []
    proc = ok(run_train(["--data", str(tiny_converted), "--loader", loader, "--epochs", "1", *ema], out))
    (rec,) = records(out)
    assert ("ema_acc1" in rec) == bool(ema)
    assert rec["val_images"] == 12 and rec["steps"] == 3 and math.isfinite(rec["train_loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loader"] == loader and summary["world_size"] == 1 and summary["imgs_per_s"] > 0
    assert (out / "history.png").stat().st_size > 1000 and (out / "model_best.pth").exists()
    assert proc.stdout.strip().splitlines()[-1].startswith("Acc@1 ")
    assert "FPS" in proc.stdout.strip().splitlines()[-1]
    assert json.loads((out / "config.json").read_text())["loader"] == loader


def test_two_processes_under_torchrun_count_every_val_image_once(tiny_sample, tmp_path):
    # 12 val images, 2 ranks, 4 per device: 6 per rank, the last batch partial on each.
    out = tmp_path / "ddp"
    proc = ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "1"], out,
                        torchrun_nproc=2))
    (rec,) = records(out)
    assert rec["val_images"] == 12
    assert rec["steps"] == 24 // 2 // 4
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert proc.stdout.count("Acc@1 ") == 2  # the epoch line and the final line, from rank 0 only


def test_a_global_batch_that_does_not_divide_by_the_world_size_is_an_error(tiny_sample, tmp_path):
    proc = run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--batch_size", "7"],
                     tmp_path, torchrun_nproc=2)
    assert proc.returncode != 0 and "must divide by the 2 processes" in proc.stdout + proc.stderr


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_a_run_killed_after_epoch_one_and_resumed_ends_with_the_same_weights(tiny_sample, tmp_path):
    common = ["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "2", "--deterministic",
              "--workers", "2", "--auto-augment", "imagenet"]
    ok(run_train(common, tmp_path / "whole"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, "--output-dir", str(killed), *common],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "checkpoint.pth", weights_only=True)["epoch"] == 1
    resumed = ok(run_train(common + ["--resume", "auto"], killed))
    assert "resumed from" in resumed.stdout
    whole, again = _weights(tmp_path / "whole" / "checkpoint.pth"), _weights(killed / "checkpoint.pth")
    assert whole.keys() == again.keys()
    for k in whole:
        assert torch.equal(whole[k], again[k]), k


def test_pretrained_torchvision_weights_start_a_run_with_a_new_classifier(tiny_sample, tmp_path):
    import torchvision
    weights = tmp_path / "mobilenet_v3_small-tv.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights)  # 1000 classes
    proc = ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "1",
                         "--arch", "mobilenet_v3_small", "--pretrained", str(weights)], tmp_path / "run"))
    assert "classifier re-initialised for 4 classes (file has 1000)" in proc.stdout


def test_evaluate_reproduces_the_checkpoints_recorded_accuracy(tiny_sample, one_epoch_run, tmp_path):
    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)  # a one-epoch run, done once per session
    recorded = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    proc = ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--evaluate",
                         "--resume", str(tmp_path / "checkpoint.pth")], tmp_path / "eval"))
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["acc1"] == pytest.approx(recorded["acc1"]) and result["val_images"] == 12
    assert f"Acc@1 {recorded['acc1']:.3f}" in proc.stdout


def test_sigterm_saves_a_checkpoint_at_the_next_step_and_the_run_resumes(tiny_sample, tmp_path):
    args = ["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "50", "--batch_size", "2"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, "--output-dir", str(tmp_path), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # wait until it is training
        if "step 3/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, rest  # engine.stop.EXIT_INTERRUPTED: interrupted, resumable
    assert "SIGTERM: saved" in rest and "Traceback" not in rest
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert state["next_batch"] > 0  # mid-epoch
    resumed = ok(run_train(args[:-4] + ["--epochs", "1", "--batch_size", "2", "--resume", "auto"], tmp_path))
    assert f"batch {state['next_batch']}" in resumed.stdout


def test_a_loss_that_stays_non_finite_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_sample, one_epoch_run,
                                                                                      tmp_path):
    base = ["--data", str(tiny_sample), "--loader", "torchvision"]
    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)  # base + ["--epochs", "1"], done once per session
    good = (tmp_path / "checkpoint.pth").read_bytes()
    proc = run_train(base + ["--epochs", "3", "--resume", str(tmp_path / "checkpoint.pth"), "--learning-rate", "1e30"],
                     tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "not finite" in proc.stdout + proc.stderr or "no longer finite" in proc.stdout + proc.stderr
    assert (tmp_path / "checkpoint.pth").read_bytes() == good


# -- the launch scripts ------------------------------------------------------------------------
SCRIPT_FLAGS = ["--arch", "mobilenetv3_small_100", "--image-size", "32", "--workers", "1",
                "--loader", "torchvision", "--print-freq", "1", "--device", "cpu", "--apex-opt-level", "O0",
                "--auto-augment", "none", "--random-erase", "0", "--warmup-steps-timing", "1"]


@pytest.mark.parametrize("script,nproc,batch,extra", [
    ("train_full_1p.sh", None, "8", ["--epochs", "1"]),
    ("train_performance_1p.sh", None, "8", ["--max_steps", "2"]),
    ("train_full_8p.sh", "2", "8", ["--epochs", "1"]),
    ("train_performance_8p.sh", "2", "8", ["--max_steps", "2"]),
])
def test_launch_scripts_run_on_the_sample_dataset(tiny_sample, tmp_path, script, nproc, batch, extra):
    env = {**os.environ, "OUTPUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    if nproc:
        env["NPROC"] = nproc  # 8 processes on 2 cores would only test the machine's patience
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), f"--data_path={tiny_sample}", *SCRIPT_FLAGS,
                           "--batch_size", batch, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("Acc@1 ") and "FPS" in last
    assert (tmp_path / "train.log").read_text().count("Acc@1 ") >= 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["opt"] == "rmsprop" and config["lr_gamma"] == 0.973  # the reference recipe underneath


def test_a_launch_script_without_data_path_says_so(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts/train_full_1p.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--data_path=DIR is required" in proc.stderr


def test_fp16_steps_the_loss_scaler_skips_are_counted_and_logged(tiny_sample, tmp_path):
    # At an initial scale of 1e30 every float16 gradient overflows: the scaler skips each of the
    # 3 steps of each epoch (halving the scale), the loss itself stays finite, and the run goes on.
    proc = ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "2",
                         "--apex", "--amp-dtype", "float16", "--loss-scale", "1e30"], tmp_path))
    for rec in records(tmp_path):  # counted per epoch
        assert rec["skipped_steps"] == rec["steps"] == 3 and rec["nonfinite_steps"] == 0
    assert "skipped-steps" in proc.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["precision"] == "fp16"


# -- resolution per epoch and evaluation resolution --------------------------------------------
def test_the_resolution_schedule_is_ffcvs_ramp_rounded_down_to_multiples_of_32():
    from core.errors import ConfigError
    from engine.resolution import ResolutionSchedule
    ramp = ResolutionSchedule(160, 256, start_ramp=10, end_ramp=20)
    assert [ramp.at(e) for e in (0, 10, 11, 15, 17, 19, 20, 30)] == [160, 160, 160, 192, 224, 224, 256, 256]
    assert ResolutionSchedule(100, 164, 0, 2).at(1) == 128 and ResolutionSchedule(100, 164, 0, 4).at(1) == 100
    assert {ResolutionSchedule.fixed(224).at(e) for e in range(5)} == {224}
    with pytest.raises(ConfigError, match="--min-res"):
        ResolutionSchedule(192, 160, 0, 1)
    args = parse_config(["--min-res", "96", "--max-res", "160", "--epochs", "8"])
    from engine.config import resolution_schedule
    assert resolution_schedule(args) == ResolutionSchedule(96, 160, 6, 7)


def test_the_fast_recipe_schedules_resolution_and_evaluates_at_256_with_flips():
    args = parse_config(["--config", str(REPO / "configs/mobilenetv3_large_fast.yaml")])
    from engine.config import resolution_schedule
    schedule = resolution_schedule(args)
    assert (schedule.at(0), schedule.at(args.epochs - 1)) == (160, 192)
    assert args.val_res == [256] and args.eval_flip and args.val_crop_ratio == 0.875


@pytest.mark.parametrize("loader", ["torchvision", "ffcv", "dali"])
def test_a_scheduled_run_trains_each_epoch_at_its_resolution_and_resumes_onto_it(tiny_converted, tmp_path, loader):
    args = ["--data", str(tiny_converted), "--loader", loader, "--min-res", "32", "--max-res", "96",
            "--start-ramp", "0", "--end-ramp", "2", "--val-res", "64"]
    proc = ok(run_train(args + ["--epochs", "2"], tmp_path))
    assert "32 px" in proc.stdout and "64 px" in proc.stdout
    resumed = ok(run_train(args + ["--epochs", "3"], tmp_path))  # the same run, one epoch longer
    assert "resumed from" in resumed.stdout
    assert [(r["res_px"], r["val_res_px"]) for r in records(tmp_path)] == [(32, 64), (64, 64), (96, 64)]


def test_evaluate_sweeps_val_resolutions_with_flips(tiny_sample, tmp_path):
    ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "1", "--bn-momentum", "1.0"],
                 tmp_path))
    weights = ["--data", str(tiny_sample), "--loader", "torchvision", "--evaluate", "--resume",
               str(tmp_path / "checkpoint.pth")]
    proc = ok(run_train(weights + ["--val-res", "32,48", "--eval-flip"], tmp_path / "flip"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("Acc@1 ")]
    assert len(lines) == 2 and "at 32 px, with flips" in lines[0] and "at 48 px, with flips" in lines[1]
    flipped = json.loads((tmp_path / "flip" / "eval.json").read_text())
    assert [r["val_res"] for r in flipped["by_resolution"]] == [32, 48] and flipped["val_images"] == 12
    ok(run_train(weights + ["--val-res", "32"], tmp_path / "plain"))
    plain = json.loads((tmp_path / "plain" / "eval.json").read_text())
    assert plain["val_loss"] != flipped["val_loss"]  # the mirrored images were really averaged in
