"""torchrun whose exit status tells a stop from a crash: SIGTERM and SIGUSR1 reach every rank, and
the command exits 75 (engine.stop.EXIT_INTERRUPTED) when the ranks stopped at a checkpoint.

    python -m engine.launch --standalone --nproc_per_node=8 train.py --data ImageNet/ ...

The arguments are torchrun's (scripts/launch_common.sh runs this). torchrun on its own, when
signalled, sends the signal on, waits for the ranks and raises its SignalException: a traceback
and exit status 1 whatever the ranks did, so a requeue script cannot tell "stopped at a
checkpoint" from a crash. SIGUSR1 (Slurm's --signal) it handles only when listed in
--signals-to-handle; otherwise the signal ends the agent alone and the ranks, each in a session of
its own, train on without it.

Here the two stop signals are handled in the agent's process instead (torchrun keeps SIGINT,
SIGHUP and SIGQUIT): sent to every rank, the ranks waited for (torchrun's --shutdown-timeout, then
SIGKILL, as torchrun does), and the exit status is theirs. The agent is held while they stop, so it
cannot take a rank's 75 for a failure and restart the group. A stop that reaches the ranks another
way (a signal sent to one rank) ends torchrun with its failure report: when the failed ranks
exited 75, that is a stop too and is reported as one (see stopped_at_checkpoint). With
--max-restarts > 0 torchrun restarts the group on such a rank's 75 instead, while restarts remain:
the run continues from the checkpoint rather than stopping.
"""
import os
import signal
import sys

# Before the heavy imports below (seconds for torch): a stop signal that comes while they load
# would otherwise end this process by its default action (143, 138), which a requeue script takes
# for a crash. Noted here, it ends the launch before any rank starts, with 75: nothing to lose.
_EARLY: list[int] = []
for _signum in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_signum, lambda signum, frame: _EARLY.append(signum))

import psutil  # noqa: E402
from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import parse_args, run  # noqa: E402

from core.errors import ExitStatus, run_command  # noqa: E402
from engine.stop import EXIT_INTERRUPTED, STOP_SIGNALS  # noqa: E402

# torchrun's own default list less the stop signals, which are handled here
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


class _PassOn:
    """The stop signals' handler: send the signal to every rank, wait for them all, then end the
    agent with torchrun's own SignalException (its clean-up path for a signal)."""

    def __init__(self, shutdown_s: float):
        self.shutdown_s, self.signum, self.exit_codes = shutdown_s, None, []
        self.agent_running = False  # outside torchrun's run there are no ranks and nothing to end

    def __call__(self, signum, frame):
        # Once: Slurm signals every process, and the launch script passes the signal on as well.
        if self.signum is not None or not self.agent_running:
            return
        self.signum = signum
        ranks = _ranks()
        for rank in ranks:
            _send(rank, signum)
        gone, alive = psutil.wait_procs(ranks, timeout=self.shutdown_s)
        for rank in alive:  # torchrun's way: the rank's whole process group (its loader workers too)
            print(f"engine.launch: rank process {rank.pid} did not stop within {self.shutdown_s:.0f} s "
                  f"(--shutdown-timeout): SIGKILL", file=sys.stderr, flush=True)
            _send(rank, signal.SIGKILL, group=True)
        gone += psutil.wait_procs(alive, timeout=self.shutdown_s)[0]
        self.exit_codes = sorted(p.returncode for p in gone)
        raise SignalException(f"engine.launch: {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    def exit_status(self) -> int:
        """0 when the ranks had finished; 75 when every rank stopped at the checkpoint or was ended
        by the signal before it installed its handler (in start-up: nothing trained is lost);
        otherwise 128 + the signal's number, as a shell reports a command the signal ended."""
        codes = self.exit_codes
        if codes and all(c == 0 for c in codes):
            return 0
        if all(c in (EXIT_INTERRUPTED, -self.signum) for c in codes):
            return EXIT_INTERRUPTED
        print(f"engine.launch: {signal.Signals(self.signum).name}: the ranks exited {codes}, not all at a "
              f"checkpoint ({EXIT_INTERRUPTED})", file=sys.stderr, flush=True)
        return 128 + self.signum


def stopped_at_checkpoint(exit_codes) -> bool:
    """Whether torchrun's failed ranks are a stop at the checkpoint: one exited 75, and each other
    one did too or was ended by torchrun's closing SIGTERM. A rank exits 75 only after the stop's
    barrier (train.py leave), so every rank had passed the checkpoint by then: torchrun, seeing the
    first rank exit 75, sends SIGTERM to the rest while they leave too."""
    codes = list(exit_codes)
    return EXIT_INTERRUPTED in codes and all(c in (EXIT_INTERRUPTED, -signal.SIGTERM) for c in codes)


def _ranks() -> list[psutil.Process]:
    """The processes the agent started: children that carry the environment it gives its workers
    (not, say, a `tee` that a shell's process substitution made a child of this process)."""
    ranks = []
    for child in psutil.Process().children():
        try:
            if "TORCHELASTIC_RESTART_COUNT" in child.environ():
                ranks.append(child)
        except psutil.Error:  # gone meanwhile
            pass
    return ranks


def _send(process: psutil.Process, signum: int, group: bool = False):
    try:
        if group:
            os.killpg(process.pid, signum)  # each rank leads its own session (torchrun's start_new_session)
        else:
            process.send_signal(signum)
    except (psutil.Error, ProcessLookupError, PermissionError):
        pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args([f"--signals-to-handle={TORCHRUN_SIGNALS}", *argv])  # a later one of the user's wins
    shutdown_s = (args.shutdown_timeout if args.shutdown_timeout is not None
                  else int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")))  # torchrun's default
    pass_on = _PassOn(shutdown_s)
    for signum in STOP_SIGNALS:
        signal.signal(signum, pass_on)
    if _EARLY:  # a stop before any rank started
        print(f"engine.launch: {signal.Signals(_EARLY[0]).name} before the ranks started: nothing to stop "
              f"(exit status {EXIT_INTERRUPTED}: run the same command again)", file=sys.stderr, flush=True)
        return ExitStatus(EXIT_INTERRUPTED)
    try:
        pass_on.agent_running = True
        run(args)
    except SignalException:
        if pass_on.signum is None:  # SIGINT, SIGHUP, SIGQUIT: torchrun's, reported as torchrun does
            raise
        return ExitStatus(pass_on.exit_status())
    except ChildFailedError as e:
        if not stopped_at_checkpoint(f.exitcode for f in e.failures.values()):
            raise
        print(f"engine.launch: the ranks stopped at the checkpoint (torchrun's lines above report it as a "
              f"failure): exit status {EXIT_INTERRUPTED}, run the same command again to continue",
              file=sys.stderr, flush=True)
        return ExitStatus(EXIT_INTERRUPTED)
    finally:
        pass_on.agent_running = False
    return None


if __name__ == "__main__":
    run_command(main)
