"""Faults survived, on the CPU: a restarted rank resumes, another run's checkpoint is kept, a killed
loader worker costs one step, damaged data is found and named, a failed checkpoint write keeps the
previous checkpoint. Every run here is a real train.py (under torchrun where it says so)."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from convert.to_ffcv import convert as to_ffcv
from convert.to_shards import convert as to_shards
from core.errors import CheckpointError, LoaderError
from core.shards import Shards
from engine.checkpoint import save_atomic
from loaders import build_loader
from test_train import REPO, TINY, ok, records, run_train

STRIPE_BYTES, STRIPE_EVERY = 64, 4096  # 64-byte stripes zeroed every 4 KB, as a failing disk leaves them


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def position(path: Path):
    """(epochs done, next batch) of a checkpoint, or None while there is none."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    return state["epoch"], state["next_batch"]


def launch(args, out: Path, torchrun_restarts=None) -> subprocess.Popen:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                 f"--max-restarts={torchrun_restarts}"] if torchrun_restarts is not None else [sys.executable])
    return subprocess.Popen([*launcher, str(REPO / "train.py"), *TINY, "--output-dir", str(out), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


# -- restarts ----------------------------------------------------------------------------------
def test_a_rank_killed_mid_epoch_under_torchrun_resumes_and_ends_with_the_same_weights(tiny_sample, tmp_path):
    # 24 train images in batches of 4: 6 steps an epoch, a checkpoint after every step
    args = ["--data", str(tiny_sample), "--loader", "torchvision", "--deterministic", "--workers", "1",
            "--batch_size", "4", "--epochs", "3", "--checkpoint-every", "1"]
    ok(run_train(args, tmp_path / "whole"))
    out = tmp_path / "restarted"
    proc = launch(args, out, torchrun_restarts=1)
    seen, killed, deadline = [], None, time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        now = position(out / "checkpoint.pth")
        if now is not None and (not seen or seen[-1] != now):
            seen.append(now)
        if killed is None and now is not None and now >= (1, 2):  # mid-way through epoch 2
            rank = [c for c in psutil.Process(proc.pid).children() if "train.py" in " ".join(c.cmdline())]
            rank[0].send_signal(signal.SIGKILL)
            killed = now
        time.sleep(0.01)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    assert killed is not None and "resumed from" in output
    assert seen == sorted(seen) and seen[-1] == (3, 0), seen  # no checkpoint went backwards
    assert_same_weights(tmp_path / "whole" / "checkpoint.pth", out / "checkpoint.pth")
    assert [r["epoch"] for r in records(out)] == [1, 2, 3]  # the log holds each epoch once


def test_another_runs_checkpoint_is_kept_and_overwrite_replaces_it(tiny_sample, one_epoch_run, tmp_path):
    base = ["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "1"]
    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)  # run_train(base), done once per session
    kept = {n: (tmp_path / n).read_bytes() for n in ("checkpoint.pth", "model_best.pth", "config.json",
                                                      "metrics.jsonl")}
    proc = run_train(base + ["--learning-rate", "0.01"], tmp_path)
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and "learning_rate: 0.05 there, 0.01 here" in message[0], proc.stderr
    assert "--overwrite" in message[0] and "--resume" in message[0]
    assert {n: (tmp_path / n).read_bytes() for n in kept} == kept
    ok(run_train(base + ["--learning-rate", "0.01", "--overwrite"], tmp_path))
    assert (tmp_path / "checkpoint.pth").read_bytes() != kept["checkpoint.pth"]
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.01
    assert len(records(tmp_path)) == 1  # the old run's log went with it


def test_a_run_in_another_train_order_does_not_continue_the_checkpoint_of_this_one(tmp_path):
    """--shuffle and --shuffle-window decide which samples the rest of an epoch holds: a restarted
    command with another order would train some samples twice and skip others."""
    from engine.checkpoint import resolve_resume
    config = {"arch": "mobilenetv3_small_100", "shuffle": "global", "shuffle_window": 8}
    save_atomic({"config": config, "classes": ["a", "b"]}, tmp_path / "checkpoint.pth")
    assert resolve_resume("auto", tmp_path, config, ["a", "b"])[0] == tmp_path / "checkpoint.pth"
    for changed, said in (({"shuffle": "shards"}, "shuffle: 'global' there, 'shards' here"),
                          ({"shuffle_window": 4}, "shuffle_window: 8 there, 4 here")):
        with pytest.raises(CheckpointError, match=re.escape(said)):
            resolve_resume("auto", tmp_path, {**config, **changed}, ["a", "b"])


def test_resuming_another_network_names_what_differs(tiny_sample, one_epoch_run, tmp_path):
    shutil.copytree(one_epoch_run, tmp_path / "a")  # a one-epoch run on tiny_sample, done once per session
    proc = run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "1",
                      "--arch", "mobilenetv3_small_050", "--resume", str(tmp_path / "a" / "checkpoint.pth")],
                     tmp_path / "b")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"--resume {tmp_path / 'a' / 'checkpoint.pth'}: it holds another network (arch: 'mobilenetv3_small_100' "
        f"there, 'mobilenetv3_small_050' here): resume with the same --arch and dataset, or start from its "
        f"weights with --pretrained"]
    assert not (tmp_path / "b").exists()


# -- a failing loader ---------------------------------------------------------------------------
# (decode device reads in threads of the training process: it has no worker process to lose)
@pytest.mark.parametrize("decode", ["cpu"])
def test_a_loader_worker_killed_mid_epoch_costs_at_most_one_step(tiny_sample, tmp_path, decode):
    args = ["--data", str(tiny_sample), "--loader", "torchvision", "--deterministic", "--workers", "2",
            "--batch_size", "2", "--epochs", "2", "--checkpoint-every", "0", "--decode", decode]
    ok(run_train(args, tmp_path / "whole"))
    out = tmp_path / "killed"
    proc = launch(args, out)
    for line in proc.stdout:
        if "epoch 1 step 3/" in line:
            break
    psutil.Process(proc.pid).children()[0].send_signal(signal.SIGKILL)  # a DataLoader worker
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, rest
    # one line: the loader, where it failed, and PyTorch's reason (the dead worker, usually; a worker
    # killed halfway through sending a batch can also surface as a broken pipe or pickle)
    (line,) = [line for line in rest.splitlines() if line.startswith("--loader ")]
    assert re.match(r"--loader torchvision: the loader failed at epoch 1, batch \d+: \w+.*\. Saved ", line), rest
    epoch, next_batch = position(out / "checkpoint.pth")
    assert epoch == 0 and next_batch >= 3  # every step trained before the failure is kept
    resumed = ok(run_train(args, out))  # the same command continues
    assert f"epoch 1, batch {next_batch}" in resumed.stdout
    assert_same_weights(tmp_path / "whole" / "checkpoint.pth", out / "checkpoint.pth")


# -- damaged data -------------------------------------------------------------------------------
def stripe(path: Path, start: int, length: int):
    data = bytearray(path.read_bytes())
    for at in range(start, min(start + length, len(data)), STRIPE_EVERY):
        data[at:at + STRIPE_BYTES] = bytes(len(data[at:at + STRIPE_BYTES]))
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, tiny_sample) -> tuple[Path, set]:
    """A converted copy of tiny_sample with one train shard and train.beton striped, and the
    names of the shard samples whose bytes the stripes changed (found by comparing bytes)."""
    root = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(tiny_sample, root)
    to_shards(root, shard_size=8, workers=2, progress=False)
    to_ffcv(root, workers=2, progress=False)
    tar = root / "shards" / "train-000001.tar"
    before = tar.read_bytes()
    stripe(tar, 0, 200_000)
    stripe(root / "ffcv" / "train.beton", (root / "ffcv" / "train.beton").stat().st_size // 3, 300_000)
    after, shards = tar.read_bytes(), Shards(tar.parent, [tar], classes=[])
    changed = {name for name, (_, jpg_at, jpg_size, cls_at, cls_size) in zip(shards.sample_names(), shards.samples())
               if before[jpg_at:jpg_at + jpg_size] != after[jpg_at:jpg_at + jpg_size]
               or before[cls_at:cls_at + cls_size] != after[cls_at:cls_at + cls_size]}
    assert changed
    return root, changed


def test_verify_names_every_damaged_sample_and_byte_range(damaged, tiny_converted):
    root, changed = damaged
    proc = subprocess.run([sys.executable, str(REPO / "convert/verify.py"), str(root)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    named = {line.strip().rsplit(" (", 1)[0] for line in proc.stderr.splitlines() if "damaged)" in line}
    assert named == changed
    assert f"{root / 'ffcv' / 'train.beton'}: bytes" in proc.stderr
    assert f"{root / 'shards' / 'train-000001.tar'}: bytes" in proc.stderr
    assert "val" not in proc.stderr and "train-000000" not in proc.stderr
    clean = subprocess.run([sys.executable, str(REPO / "convert/verify.py"), str(tiny_converted)], capture_output=True,
                           text=True, timeout=120)
    assert clean.returncode == 0 and "match their checksums" in clean.stdout


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_the_shard_loader_skips_damaged_samples_when_allowed_and_stops_at_one_otherwise(damaged, decode):
    root, changed = damaged
    common = dict(split="train", data=root, batch_size=4, workers=0, image_size=32)
    lenient = build_loader("torchvision", options={"max_bad_samples": 100, "decode": decode}, **common)
    for epoch in range(2):  # the second epoch meets the same damaged samples: each counts once
        lenient.set_epoch(epoch)
        sizes = [len(labels) for _, labels in lenient]
        assert sorted(lenient.bad_samples) == sorted(changed) and sizes == [4] * 6  # full: their slots filled
    strict = build_loader("torchvision", options={"decode": decode}, **common)
    strict.set_epoch(0)
    with pytest.raises(LoaderError, match="differ from the converter's checksum") as e:
        list(strict)
    assert str(e.value).split(": the sample")[0] in changed


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_every_rank_runs_every_step_when_a_ranks_whole_batch_is_damaged(damaged, decode):
    """Batch 1 on 2 ranks: a damaged sample is a whole per-rank batch. Dropping it left that rank
    one step short of the other, and DDP (and the agreed stop step) waited on it for ever."""
    root, changed = damaged
    counts, met = [], set()
    for rank in (0, 1):
        loader = build_loader("torchvision", split="train", data=root, batch_size=1, workers=1, image_size=32,
                              rank=rank, world_size=2, options={"max_bad_samples": 100, "decode": decode})
        for epoch in range(2):
            loader.set_epoch(epoch)
            sizes = [len(labels) for _, labels in loader]
            counts.append(len(sizes))
            assert sizes == [1] * len(loader), (rank, epoch, sizes)
        met |= set(loader.bad_samples)
    assert counts == [12] * 4 and met == changed  # each rank met its damaged samples and still ran 12 steps


def test_a_damaged_slot_gets_the_next_good_sample_with_the_slots_crop(damaged):
    """Not garbage, not a hole: the next good sample in the shards' order, its label, and the crop
    box of the damaged slot's own (seed, epoch, index), whichever batch or worker reads it."""
    from loaders.crops import crop_flip_boxes
    from loaders.device_decode import decode_image
    root, changed = damaged
    loader = build_loader("torchvision", split="train", data=root, batch_size=4, workers=0, image_size=32,
                          seed=5, options={"max_bad_samples": 100})
    data = loader.dataset
    names = [data.name(i) for i in range(len(data))]
    bad = sorted(names.index(name) for name in changed)
    slot = bad[0]
    sub = next(i for i in range(slot + 1, len(data)) if names[i] not in changed)
    images, labels, damaged_met = data.__getitems__([(slot, 3, 32), (sub, 3, 32)])
    assert names[slot] in map(data.name, damaged_met)
    blob, _, sub_labels, good = data.read_batch(np.array([sub]))
    assert good.all() and labels.tolist() == [sub_labels[0]] * 2
    image = decode_image(blob)
    box = crop_flip_boxes(5, 3, np.array([slot]), [image.shape[1]], [image.shape[2]])[0]
    assert torch.equal(images[0], data.transform(image, 32, box))  # the sub's pixels, the slot's crop
    assert not torch.equal(images[0], images[1])  # the sub in its own slot: its own crop
    alone = data.__getitems__([(slot, 3, 32)])[0]
    assert torch.equal(alone[0], images[0])


def test_training_on_damaged_shards_stops_naming_the_sample_and_keeps_a_checkpoint(damaged, tmp_path):
    root, changed = damaged
    args = ["--data", str(root), "--loader", "torchvision", "--epochs", "1", "--batch_size", "4",
            "--checkpoint-every", "0"]
    proc = run_train(args, tmp_path / "strict")
    assert proc.returncode == 1
    assert any(name in proc.stderr for name in changed) and "--max-bad-samples" in proc.stderr
    assert position(tmp_path / "strict" / "checkpoint.pth")[0] == 0  # saved at the failing step
    lenient = ok(run_train(args + ["--max-bad-samples", "10"], tmp_path / "lenient"))
    (record,) = records(tmp_path / "lenient")
    assert record["bad_samples"] == len(changed), lenient.stdout


@pytest.mark.parametrize("loader", ["ffcv", "torchvision"])
def test_verify_data_stops_a_run_before_it_trains_on_damaged_files(damaged, tmp_path, loader):
    root, _ = damaged
    proc = run_train(["--data", str(root), "--loader", loader, "--epochs", "1", "--verify-data"], tmp_path)
    assert proc.returncode == 1 and "damaged in" in proc.stderr and "convert/verify.py" in proc.stderr
    assert not (tmp_path / "checkpoint.pth").exists()


def test_a_file_of_the_wrong_size_is_caught_at_start(tiny_converted, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_converted, root)
    beton = root / "ffcv" / "val.beton"
    beton.write_bytes(beton.read_bytes()[:-1])
    proc = run_train(["--data", str(root), "--loader", "ffcv", "--epochs", "1"], tmp_path / "out")
    assert proc.returncode == 1 and str(beton) in proc.stderr and "the converter wrote" in proc.stderr


# -- a checkpoint that cannot be written ---------------------------------------------------------
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    code = f"""
import resource, signal, torch
from core.errors import run_command
from engine.checkpoint import save_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # larger writes fail: a full disk
run_command(lambda argv: save_atomic({{"w": torch.zeros(1_000_000)}}, {str(path)!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"cannot write {path} (") and "the previous checkpoint.pth is intact" in proc.stderr
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_a_checkpoint_carries_its_batchnorm_eps_into_evaluation(tiny_sample, tmp_path):
    # eps is not in a state_dict: a run trained at timm's 1e-5 must not be evaluated at 1e-3
    # running statistics of the last batch alone (momentum 1): small variances, where eps shows
    ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "1", "--bn-eps", "1e-5",
                  "--bn-momentum", "1.0"], tmp_path))
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["bn_eps"] == 1e-5
    (record,) = records(tmp_path)
    ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--evaluate", "--resume",
                  str(tmp_path / "checkpoint.pth")], tmp_path / "eval"))
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["val_loss"] == pytest.approx(record["val_loss"], rel=1e-9, abs=0)
