"""Leaving a run cleanly: a stop request that every rank obeys at the same step, and a watchdog
that ends a rank on which no step completes.

Stop: SIGTERM (what Slurm, Kubernetes and torchrun send first) and SIGUSR1 (what Slurm's
`--signal` sends before the time limit) set a local flag. Under torchrun the ranks agree on it
without a host synchronisation in every step: every CHECK_EVERY_STEPS steps each rank starts an
asynchronous all-reduce (MAX) of its flag on a CPU (gloo) group and reads the result
CHECK_EVERY_STEPS steps later, long since arrived. Every rank reads the same value after the same
step, so all stop at one step boundary, within 2 x CHECK_EVERY_STEPS steps of the signal: well
inside torchrun's 30 s between its SIGTERM and its SIGKILL (--shutdown_timeout). One process
checks its own flag after every step.

Exit status: EXIT_INTERRUPTED (75, sysexits' EX_TEMPFAIL): stopped at a checkpoint, run the same
command again to continue. EXIT_STALLED (124, as timeout(1) reports a time limit): the watchdog
ended a stalled rank.
"""
import faulthandler
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

EXIT_INTERRUPTED = 75
EXIT_STALLED = 124
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CHECK_EVERY_STEPS = 4


class StopRequest:
    """Call after each step: True on every rank at the same step once any rank got a stop signal.
    `signal_name` then names the signal (the largest number any rank got, e.g. SIGTERM)."""

    def __init__(self, group=None, every_steps: int = CHECK_EVERY_STEPS):
        self.local, self.signal_name = 0, None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        self.distributed, self.group, self.every_steps = dist.is_initialized(), group, every_steps
        self.steps, self.pending, self.reduced = 0, None, None

    def _handle(self, signum, frame):
        self.local = max(self.local, int(signum))

    def __call__(self) -> bool:
        if not self.distributed:
            return self._stop(self.local)
        self.steps += 1
        if self.steps % self.every_steps:
            return False
        if self.pending is not None:
            self.pending.wait()  # started every_steps steps ago: done by now, unless a rank is stalled
            if self.reduced.item():  # a CPU tensor: no device sync
                return self._stop(int(self.reduced.item()))
        self.reduced = torch.tensor([self.local], dtype=torch.int32)
        self.pending = dist.all_reduce(self.reduced, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return False

    def _stop(self, signum: int) -> bool:
        if signum:
            self.signal_name = signal.Signals(signum).name
        return bool(signum)


class StepWatchdog:
    """A thread that ends this rank when no step has completed for `timeout_s` while armed: it
    writes every thread's Python stack to stderr (faulthandler), one line naming the rank and
    the last step done, and exits EXIT_STALLED without cleanup (a stalled collective would never
    return). The trainer arms it with `fed` after each step and `pause`s it around what may
    outlast a step by far: an epoch's first step (loader start-up, JIT), evaluation, the epoch
    end's checkpoint. None as timeout: no thread, every call a no-op."""

    def __init__(self, timeout_s: float | None, rank: int = 0):
        # A little under the process group's timeout (the same --dist-timeout): the collective a
        # stalled peer blocks would otherwise time out first, with a traceback that names no step.
        self.timeout_s, self.rank = timeout_s and 0.95 * timeout_s, rank
        self.last_s, self.where = None, None
        if timeout_s:
            threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def fed(self, epoch: int, step: int):
        """Step `step` of epoch `epoch` (1-based, as the log counts) has just completed."""
        self.where, self.last_s = (epoch, step), time.monotonic()

    def pause(self):
        self.last_s = None

    def _watch(self):
        while True:
            time.sleep(1.0)
            last_s = self.last_s
            if last_s is not None and time.monotonic() - last_s > self.timeout_s:
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                epoch, step = self.where
                print(f"train.py: rank {self.rank}: no step completed for {self.timeout_s:.0f} s after epoch "
                      f"{epoch} step {step} (--dist-timeout): a rank is stalled or a collective hangs; the stacks "
                      f"above are this rank's. Exiting {EXIT_STALLED}: torchrun --max-restarts restarts the group "
                      f"from the last checkpoint", file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)
