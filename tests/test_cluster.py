"""A run on a cluster, on the CPU: real torchrun, gloo, 2 processes. Every rank stops at the same
step on a signal, one checkpoint there; a run resumes exactly on another number of processes; a
stalled rank is caught and the group restarted; a mid-epoch resume starts each loader at its step."""
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from convert.make_sample import make_sample
from core.dataset import split_index
from core.errors import CheckpointError
from engine.checkpoint import check_position
from loaders import build_loader
from loaders.common import LoaderSpec, epoch_indices
from test_faults import assert_same_weights
from test_train import REPO, TINY, ok, run_train

# 48 train images, global batch 4 (2 per rank on 2 processes): 12 steps an epoch; the only
# mid-epoch checkpoint is the stop's.
ARGS = ["--loader", "torchvision", "--deterministic", "--batch_size", "4", "--epochs", "2",
        "--checkpoint-every", "0"]
TORCHRUN_ERRORS = ("torch.distributed.elastic.multiprocessing.api.SignalException",
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError")


def launch(args, out: Path, nproc: int, restarts: int = 0, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", str(REPO / "train.py"), *TINY, "--output-dir", str(out), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def read_until(proc: subprocess.Popen, pattern: str) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    raise AssertionError(f"never printed {pattern!r}:\n" + "".join(seen)[-3000:])


def ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The train.py processes torchrun started, by rank."""
    found = [c for c in psutil.Process(proc.pid).children() if "train.py" in " ".join(c.cmdline())]
    return sorted(found, key=lambda c: int(c.environ()["RANK"]))


def rank_tracebacks(output: str) -> int:
    """Tracebacks in the output that are not torchrun's own report of its signal or of a worker's
    non-zero exit (torchrun 2.14 prints those whatever its workers do)."""
    return output.count("Traceback (most recent call last)") - sum(output.count(e + ":") for e in TORCHRUN_ERRORS)


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.02)


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)


def trained_images(folder: Path) -> dict:
    """{(epoch, step): Counter of image digests} over every rank file a run (and its resumes) wrote."""
    steps = collections.defaultdict(collections.Counter)
    for path in folder.glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps[row["epoch"], row["step"]].update(row["images"])
    return dict(steps)


def generator_states(folder: Path) -> dict:
    """{(rank file, epoch, step): digest of that rank's CPU generator as the step started}."""
    return {(path.name, row["epoch"], row["step"]): row["rng"] for path in folder.glob("rank*.jsonl")
            for row in map(json.loads, path.read_text().splitlines())}


def same_lines(a: Path, b: Path):
    """metrics.jsonl of two runs, but for the timings."""
    keep = ("epoch", "train_loss", "steps", "acc1", "acc5", "val_loss", "val_images", "lr", "res_px")
    lines = [[{k: r[k] for k in keep} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
             for run in (a, b)]
    assert lines[0] == lines[1] and len(lines[0]) == 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 classes, 12 train + 50 val images each: an evaluation of 50 batches per rank, seconds on the
    CPU, long enough to be signalled or stalled in."""
    return make_sample(tmp_path_factory.mktemp("cluster_sample"), num_classes=4, train_per_class=12,
                       val_per_class=50, oddities=False, quiet=True)


@pytest.fixture(scope="module")
def unbroken(data, tmp_path_factory) -> Path:
    """The reference: 2 epochs on 2 processes, every image each rank trained on recorded."""
    out = tmp_path_factory.mktemp("unbroken")
    ok(run_train(["--data", str(data), *ARGS], out, torchrun_nproc=2,
                 env={"TRAIN_RECORD_BATCHES": str(out / "batches")}))
    return out


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_the_run_continues_bitwise(data, unbroken, tmp_path):
    # checkpoints by the clock every 0.3 s: each rank's clock, agreed, so all enter the save together
    args = ["--data", str(data), *ARGS[:-2], "--checkpoint-every", "0.005min"]
    record = {"TRAIN_RECORD_BATCHES": str(tmp_path / "batches")}
    proc = launch(args, tmp_path, nproc=2, env=record)
    head = read_until(proc, r"epoch 1 step 3/12")
    proc.send_signal(signal.SIGTERM)  # what Slurm and Kubernetes send first; torchrun forwards it to both ranks
    output = head + proc.communicate(timeout=120)[0]
    assert rank_tracebacks(output) == 0 and "Connection closed" not in output, output[-3000:]
    saved = re.findall(r"SIGTERM: saved \S+ at epoch 1 batch (\d+); .* \(exit status 75", output)
    assert len(saved) == 1, output[-3000:]  # one line, from rank 0
    state = checkpoint(tmp_path)
    assert state["epoch"] == 0 and 0 < state["next_batch"] < 12 and state["next_batch"] == int(saved[0])
    assert (state["global_step"], state["samples_seen"], state["world_size"]) == (
        state["next_batch"], 4 * state["next_batch"], 2)
    assert [r is not None for r in state["rng"]["ranks"]] == [True, True]  # each rank's own generator states
    resumed = ok(run_train(args, tmp_path, torchrun_nproc=2, env=record))  # the same command
    assert f"resumed from {tmp_path / 'checkpoint.pth'}: epoch 1, batch {state['next_batch']}" in resumed.stdout
    assert_same_weights(unbroken / "checkpoint.pth", tmp_path / "checkpoint.pth")
    # each rank's generator, step by step, before the stop and after the resume: the unbroken run's
    got, want = generator_states(tmp_path / "batches"), generator_states(unbroken / "batches")
    assert got == want and len(want) == 48
    assert want["rank0.jsonl", 1, 0] != want["rank1.jsonl", 1, 0]  # dropout masks differ between ranks


def test_a_run_stopped_on_two_processes_continues_on_one_with_the_same_images(data, unbroken, tmp_path):
    """SIGUSR1 (Slurm's --signal) to rank 1 alone: rank 0 learns of it through the all-reduced flag
    and writes the checkpoint; one process continues with exactly the images of each step."""
    args = ["--data", str(data), *ARGS]
    record = {"TRAIN_RECORD_BATCHES": str(tmp_path / "batches")}
    proc = launch(args, tmp_path, nproc=2, env=record)
    head = read_until(proc, r"epoch 1 step 2/12")
    ranks(proc)[1].send_signal(signal.SIGUSR1)
    output = head + proc.communicate(timeout=120)[0]
    assert "SIGUSR1: saved" in output and rank_tracebacks(output) == 0, output[-3000:]
    state = checkpoint(tmp_path)
    assert state["epoch"] == 0 and 0 < state["next_batch"] < 12
    ok(run_train(args, tmp_path, env=record))  # one process, the same global batch
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 1
    got, want = trained_images(tmp_path / "batches"), trained_images(unbroken / "batches")
    assert got == want  # each global step of each epoch: the same images, each once
    assert len(want) == 24 and all(sum(c.values()) == 4 for c in want.values())
    # the one process continues from rank 0's saved generator state, not from a fresh seed
    first = ("rank0.jsonl", 1, state["next_batch"])
    assert generator_states(tmp_path / "batches")[first] == generator_states(unbroken / "batches")[first]


def test_a_stalled_rank_is_caught_named_and_the_group_restarts_from_the_checkpoint(data, tmp_path):
    args = ["--data", str(data), *ARGS[:-2], "--checkpoint-every", "1", "--dist-timeout", "1"]
    proc = launch(args, tmp_path, nproc=2, restarts=1)
    head = read_until(proc, r"epoch 1 step 4/12")
    stalled = ranks(proc)[1]
    stalled.send_signal(signal.SIGSTOP)  # as a hung file system or a wedged worker leaves it
    output = head + proc.communicate(timeout=400)[0]
    print(output)  # pytest shows it when an assertion fails
    assert proc.returncode == 0, output[-3000:]
    # a checkpoint every step: rank 0 waits for the stalled rank in a step, the checkpoint's gather of
    # generator states or the stop agreement, whichever rank 1 was stopped before; each is named
    phases = (r"training, after epoch 1 step \d+", r"the checkpoint at epoch 1 batch \d+ \(gathering generator states\)",
              r"the stop agreement \(waiting for every rank\)")
    assert re.search(rf"rank 0: no progress for \d+ s in ({'|'.join(phases)}) \(--dist-timeout\)", output), output[-3000:]
    assert "(most recent call first)" in output  # faulthandler's dump of every thread of rank 0
    assert "resumed from" in output and checkpoint(tmp_path)["epoch"] == 2


def test_sigterm_during_evaluation_leaves_at_the_epochs_checkpoint_and_the_run_continues_bitwise(
        data, unbroken, tmp_path):
    """The epoch's checkpoint is written before its evaluation. SIGTERM to every rank (as Slurm
    sends it) once it is there: each rank leaves evaluation at its own batch, exit status 75 within
    seconds, no metrics line for the epoch; the same command evaluates that epoch first, then
    continues to the unbroken run's weights, metrics lines and generator states."""
    args = ["--data", str(data), *ARGS]  # --checkpoint-every 0: the first checkpoint is epoch 1's end
    record = {"TRAIN_RECORD_BATCHES": str(tmp_path / "batches")}
    proc = launch(args, tmp_path, nproc=2, env=record)
    wait_for(tmp_path / "checkpoint.pth", proc)
    workers = ranks(proc)
    signalled_s = time.monotonic()
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    psutil.wait_procs(workers, timeout=120)
    print(f"stop latency: {time.monotonic() - signalled_s:.1f} s from SIGTERM to both ranks' exit")  # pytest -s
    output = proc.communicate(timeout=120)[0]
    codes = re.findall(r"exitcode +: (\d+) \(pid", output)  # torchrun's report: the ranks it saw exit, by then
    assert codes and set(codes) == {"75"}, output[-3000:]
    assert "SIGTERM: saved" in output and "at epoch 2 batch 0 (epoch 1 evaluates when it continues)" in output
    assert rank_tracebacks(output) == 0, output[-3000:]
    state = checkpoint(tmp_path)
    assert (state["epoch"], state["next_batch"], state["pending"]["epoch"]) == (1, 0, 1)
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()
    resumed = ok(run_train(args, tmp_path, torchrun_nproc=2, env=record))
    assert "epoch 2, batch 0; epoch 1's evaluation first" in resumed.stdout
    assert_same_weights(unbroken / "checkpoint.pth", tmp_path / "checkpoint.pth")
    same_lines(unbroken, tmp_path)
    assert generator_states(tmp_path / "batches") == generator_states(unbroken / "batches")


def test_a_rank_stalled_after_the_epochs_checkpoint_is_caught_and_named(data, tmp_path):
    """SIGSTOP to rank 1 once the epoch's checkpoint is written (it is then agreeing on a stop or
    evaluating): rank 0 waits in a phase with a deadline, dumps its stacks, names itself and the
    phase and exits 124, instead of waiting on the stalled peer."""
    args = ["--data", str(data), *ARGS, "--dist-timeout", "0.25"]  # 15 s: deadlines of 13.5 s
    proc = launch(args, tmp_path, nproc=2)
    wait_for(tmp_path / "checkpoint.pth", proc)
    everyone = [psutil.Process(proc.pid), *ranks(proc)]
    stalled = everyone[2]
    stalled.send_signal(signal.SIGSTOP)
    guard = threading.Timer(240, lambda: [p.kill() for p in everyone if p.is_running()])  # a hang fails, not waits
    guard.start()
    try:
        head = read_until(proc, r"rank 0: no progress for \d+ s in ")
    finally:
        stalled.kill()  # SIGKILL ends a stopped process; torchrun then ends the group
        guard.cancel()
    output = head + proc.communicate(timeout=120)[0]
    assert re.search(r"rank 0: no progress for \d+ s in (epoch 1's evaluation|the stop agreement)", output), \
        output[-3000:]
    assert "(most recent call first)" in output and re.search(r"exitcode +: 124 \(pid", output), output[-3000:]


def test_a_stop_one_rank_gets_during_evaluation_reaches_the_others_through_the_store():
    """StopRequest.poll, as evaluation asks it before each batch: the signalled rank sets a key in
    the group's store (a real TCPStore on 127.0.0.1), the other reads it within POLL_S; no
    collective, so ranks at different val batches both leave."""
    import torch.distributed as dist

    from engine.stop import POLL_S, STOP_SIGNALS, StopRequest
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    server = dist.TCPStore("127.0.0.1", 0, world_size=2, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, world_size=2, is_master=False)
    try:
        other = StopRequest(store=client)
        signalled = StopRequest(store=server)  # the handler now installed is this one's
        assert not other.poll() and not signalled.poll()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signalled.poll() and not other.local
        time.sleep(POLL_S)
        assert other.poll()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_mid_epoch_checkpoint_with_another_global_batch_is_refused_naming_both():
    state = {"epoch": 0, "next_batch": 5, "global_batch": 8, "samples_seen": 40}
    with pytest.raises(CheckpointError, match=r"global batch 8, and --batch_size is 16 here: resume with "
                                              r"--batch_size 8"):
        check_position(state, "ckpt.pth", 16)
    assert check_position({**state, "next_batch": 0}, "ckpt.pth", 16) == 0  # an epoch's end: any batch


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_images_of_each_global_step_do_not_depend_on_the_world_size(world):
    def step_images(world_size: int, start_step: int) -> list[set]:
        per = 8 // world_size
        parts = [epoch_indices(100, LoaderSpec(split="train", data=".", batch_size=per, seed=1, rank=r,
                                               world_size=world_size), 3, start_step).reshape(-1, per)
                 for r in range(world_size)]
        return [set(np.concatenate(step).tolist()) for step in zip(*parts)]
    whole = step_images(1, 0)
    assert len(whole) == 12 and step_images(world, 0) == whole and step_images(world, 9) == whole[9:]


@pytest.mark.parametrize("name, options", [("torchvision", {"source": "shards"}), ("torchvision", {"source": "folder"}),
                                           ("ffcv", {}), ("dali", {"source": "shards"}),
                                           ("dali", {"source": "folder"})])
def test_each_loader_starts_an_epoch_at_a_step_in_the_world_size_free_order(tiny_converted, name, options):
    """Labels of every batch, 2 ranks started at step 1, against the order common.epoch_indices
    gives, read from the same samples in the dataset's order (shards: theirs)."""
    from core.shards import find_shards
    on_shards = options.get("source") == "shards"
    shards = find_shards(tiny_converted / "shards", "train", tiny_converted) if on_shards else None
    labels = (np.array([int(r) for r in _shard_labels(shards)]) if shards is not None
              else np.asarray(split_index(tiny_converted, "train").labels))
    for rank in (0, 1):
        loader = build_loader(name, split="train", data=tiny_converted, batch_size=4, workers=1, image_size=32,
                              seed=3, rank=rank, world_size=2, options=options)
        loader.set_epoch(1, 1)
        got = [labels_.tolist() for _, labels_ in loader]
        spec = LoaderSpec(split="train", data=tiny_converted, batch_size=4, seed=3, rank=rank, world_size=2)
        assert len(loader) == 3 and got == labels[epoch_indices(24, spec, 1, 1)].reshape(2, 4).tolist()


def _shard_labels(shards) -> list[int]:
    rows = shards.samples()
    out = []
    for tar, _, _, cls_at, cls_size in rows:
        with open(shards.tars[tar], "rb") as f:
            f.seek(cls_at)
            out.append(int(f.read(cls_size)))
    return out


def test_two_nodes_resume_and_finish_after_one_nodes_worker_is_killed(data, unbroken, tmp_path):
    """Two torchrun agents on localhost (c10d rendezvous, 1 process each), as two nodes would
    run; one node's worker is killed mid-epoch: both agents restart their workers, which resume
    from the last checkpoint and finish with the unbroken run's weights."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--data", str(data), *ARGS[:-2], "--checkpoint-every", "1"]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={n}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=cluster-test", "--max-restarts=1",
         str(REPO / "train.py"), *TINY, "--output-dir", str(tmp_path), *args],
        cwd=REPO, stdout=subprocess.PIPE if n == 0 else open(tmp_path / "node1.log", "w"), stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for n in (0, 1)]
    head = read_until(agents[0], r"epoch 1 step 6/12")
    ranks(agents[1])[0].send_signal(signal.SIGKILL)  # node 1's only worker
    outputs = [head + agents[0].communicate(timeout=400)[0]]
    agents[1].wait(timeout=60)
    outputs.append((tmp_path / "node1.log").read_text())
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "resumed from" in outputs[0] and checkpoint(tmp_path)["epoch"] == 2
    assert_same_weights(unbroken / "checkpoint.pth", tmp_path / "checkpoint.pth")
