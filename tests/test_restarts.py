"""Restarts and stops that a real cluster produces, on the CPU: real torchrun, gloo, 2 processes.
A rank that dies before it joins the group does not keep the restarted group apart; the launch
scripts pass SIGTERM and SIGUSR1 on to every rank and exit 75 at the checkpoint, leaving no rank
behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from test_cluster import ARGS, checkpoint, data, launch  # noqa: F401  (data: a fixture)
from test_train import REPO, TINY


def finish(proc: subprocess.Popen, timeout_s: float) -> str:
    """The output of a torchrun that must end within timeout_s; one that does not is ended with
    its ranks (in sessions of their own, they would outlive it) and the test fails."""
    try:
        return proc.communicate(timeout=timeout_s)[0] or ""
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise AssertionError(f"still running after {timeout_s} s:\n" + (proc.communicate()[0] or "")[-4000:]) from None


def kill_tree(pid: int):
    try:
        tree = psutil.Process(pid)
        for p in [*tree.children(recursive=True), tree]:
            p.kill()
    except psutil.NoSuchProcess:
        pass


def wait_for(condition, what: str, timeout_s: float = 120.0, every_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every_s)
    raise AssertionError(f"no {what} within {timeout_s} s")


def started_ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """torchrun's ranks, by rank, once exec'd (a child just forked still has torchrun's environment)."""
    found = rank_processes(psutil.Process(proc.pid).children())
    return [found[r] for r in sorted(found, key=int)]


def rank_processes(processes: list[psutil.Process]) -> dict[str, psutil.Process]:
    """{RANK: process} of torchrun's ranks among `processes` (not their loader workers, which
    inherit RANK from them)."""
    found = {}
    for p in processes:
        try:
            env = p.environ()
            if "RANK" in env and "RANK" not in p.parent().environ():
                found[env["RANK"]] = p
        except psutil.Error:  # a loader worker that has just ended
            pass
    return found


def alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def at_group_setup(rank: psutil.Process) -> bool:
    """Whether the rank has reached the process group's set-up, as seen from outside: it holds a
    connection to torchrun's store (MASTER_PORT) or listens on a port (a store or gloo of its own)."""
    try:
        port = int(rank.environ()["MASTER_PORT"])
        return any(c.status == psutil.CONN_LISTEN or (c.raddr and c.raddr.port == port)
                   for c in rank.net_connections(kind="tcp"))
    except psutil.Error:
        return False


def test_a_rank_killed_before_it_joins_the_group_does_not_break_the_restarts(data, tmp_path):
    """Rank 1 is held (SIGSTOP) as soon as torchrun starts it, long before it imports torch, and
    killed once rank 0 has been at the group's set-up for 3 s: one rank of the attempt reached it,
    the other never did, as with a CUDA-init failure, an import error or an OOM. The restarted
    group must form and finish; on b2d57d1 its ranks counted themselves into two attempts and
    waited --dist-timeout on every restart until --max-restarts ran out."""
    args = ["--data", str(data), *ARGS, "--dist-timeout", "0.5"]
    proc = launch(args, tmp_path, nproc=2, restarts=2)
    try:
        first = wait_for(lambda: len(started_ranks(proc)) == 2 and started_ranks(proc), "2 ranks")
        first[1].suspend()
        wait_for(lambda: at_group_setup(first[0]), "rank 0 at the group's set-up", every_s=0.05)
        time.sleep(3)  # rank 0 past its first use of the store (b2d57d1: its attempt count)
        first[1].kill()
        killed_s = time.monotonic()
    except BaseException:
        kill_tree(proc.pid)
        raise
    output = finish(proc, 240)
    print(f"killed rank 1 before it joined -> run finished: {time.monotonic() - killed_s:.1f} s")
    assert proc.returncode == 0, output[-4000:]
    assert checkpoint(tmp_path)["epoch"] == 2 and checkpoint(tmp_path)["world_size"] == 2


# -- the launch scripts -------------------------------------------------------------------------
SCRIPT_FLAGS = ["--arch", "mobilenetv3_small_100", "--image-size", "32", "--batch_size", "4", "--workers", "1",
                "--device", "cpu", "--print-freq", "1", "--loader", "torchvision", "--epochs", "4"]


@pytest.mark.parametrize("target, signum", [("script", signal.SIGTERM), ("script", signal.SIGUSR1),
                                           ("rank 1", signal.SIGUSR1)])
def test_a_stop_signal_to_the_launch_script_reaches_every_rank_and_exits_75(data, tmp_path, target, signum):
    """SIGTERM (Slurm's and Kubernetes' first) or SIGUSR1 (sbatch --signal=B:USR1@120) to
    scripts/train_performance_8p.sh, or SIGUSR1 to one rank (Slurm's --signal without B:): every
    rank stops at the checkpoint, the script exits 75 with no traceback, and no rank is left
    training. b2d57d1: the shell died of the signal (143, 138) and torchrun and its ranks trained
    on; a rank's 75 ended in torchrun's failure report and status 1."""
    log = tmp_path / "script.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / "train_performance_8p.sh"), f"--data_path={data}",
                                 *SCRIPT_FLAGS], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2", "PYTHON": sys.executable,
                                     "OUTPUT_DIR": str(tmp_path / "run")})
    script = psutil.Process(proc.pid)
    started = []
    try:
        wait_for(lambda: "epoch 1 step 3/12" in log.read_text(), "third step", timeout_s=240, every_s=0.2)
        started = script.children(recursive=True)  # torchrun's agent, the ranks, their loader workers
        ranks = rank_processes(started)
        assert set(ranks) == {"0", "1"}
        (proc if target == "script" else ranks["1"]).send_signal(signum)
        proc.wait(timeout=120)
        left = [p for p in started if alive(p)]
    finally:
        kill_tree(proc.pid)
        for p in started:  # what outlived the script (b2d57d1), reparented elsewhere
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    output = log.read_text()
    assert proc.returncode == 75, output[-4000:]
    assert "Traceback" not in output and left == [], output[-4000:]
    assert f"{signum.name}: saved" in output and "stopped at a checkpoint" in output
    state = checkpoint(tmp_path / "run")
    assert state["world_size"] == 2 and (state["epoch"], state["next_batch"]) < (4, 0)


def test_an_elastic_group_that_loses_a_node_forms_again_smaller_and_finishes(data, tmp_path):
    """Three torchrun agents (c10d, --nnodes=2:3, 1 process each) as three nodes; one node, neither
    the rendezvous' host nor rank 0's, is killed with its worker mid-epoch: the two left form a
    group of 2 (the attempt's store announced afresh, the 3-rank attempt's announcement refused)
    and resume on 2 processes from the checkpoint written on 3."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--data", str(data), *ARGS[:2], "--deterministic", "--batch_size", "6", "--epochs", "2",
            "--checkpoint-every", "1"]
    logs = [tmp_path / f"node{n}.log" for n in range(3)]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2:3", "--nproc_per_node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic-test", "--rdzv-conf=last_call_timeout=2",
         "--max-restarts=1", str(REPO / "train.py"), *TINY, "--output-dir", str(tmp_path / "run"), *args],
        cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for log in logs]
    try:
        wait_for(lambda: any("epoch 1 step 3/8" in log.read_text() for log in logs), "third step", 300, 0.2)

        def leaf(agent) -> bool:  # its worker is not rank 0 and it does not host the rendezvous
            listens = any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                          for c in psutil.Process(agent.pid).net_connections("tcp"))
            return started_ranks(agent) and started_ranks(agent)[0].environ()["RANK"] != "0" and not listens
        victim = next(a for a in agents if leaf(a))
        kill_tree(victim.pid)
        survivors = [a for a in agents if a is not victim]
        for agent in survivors:
            finish(agent, 400)
    finally:
        for agent in agents:
            kill_tree(agent.pid)
    outputs = "".join(log.read_text() for log in logs)
    assert [a.returncode for a in survivors] == [0, 0], outputs[-6000:]
    assert "saved on 3 process(es), continued on 2" in outputs
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2


def test_a_stop_signal_while_the_launcher_starts_exits_75_before_any_rank(tmp_path):
    # The launcher takes seconds to import torch; a SIGTERM or SIGUSR1 then used to end it by the
    # default action (143 / 138), which a requeue script reads as a crash.
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        proc = subprocess.Popen([sys.executable, "-m", "engine.launch", "--standalone", "--nproc_per_node=2",
                                 str(REPO / "train.py"), *TINY, "--output-dir", str(tmp_path / "out")],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: _loading_torch(proc.pid), "the launcher importing torch", timeout_s=60)
        proc.send_signal(signum)
        out = finish(proc, 120)
        assert proc.returncode == 75, out
        assert "Traceback" not in out and "before the ranks started" in out
        assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_a_rank_ended_by_torchruns_closing_sigterm_after_another_exited_75_is_a_stop(tmp_path):
    """A stop signalled to one rank: the ranks agree, pass the checkpoint's barrier and exit 75;
    torchrun sees the first one leave and sends SIGTERM to the other, still exiting, so its report
    holds 75 and -15. That used to end the launch with torchrun's failure report and status 1 (the
    SIGUSR1-to-rank-1 test, now and then). Here rank 1 exits 75 at once and rank 0 is still there
    for torchrun's SIGTERM; a rank that fails otherwise is still a failure."""
    script = tmp_path / "rank.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    sys.exit(int(sys.argv[1]))\n"
                      "time.sleep(120)\n")
    for rank1_exit, want in ((75, 75), (3, 1)):
        proc = subprocess.Popen([sys.executable, "-m", "engine.launch", "--standalone", "--nproc_per_node=2",
                                 str(script), str(rank1_exit)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        out = finish(proc, 120)
        assert proc.returncode == want, out
        assert "closing signal SIGTERM" in out, out  # rank 0, ended by torchrun
        assert ("stopped at the checkpoint" in out) == (want == 75) and ("Traceback" in out) == (want == 1), out


def _loading_torch(pid: int) -> bool:
    """The process has reached its imports of torch (one of torch's shared libraries is mapped)."""
    try:
        return any("libtorch" in m.path for m in psutil.Process(pid).memory_maps())
    except psutil.Error:
        return False
