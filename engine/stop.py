"""Leaving a run cleanly: a stop request that every rank obeys at the same point, and a watchdog
that ends a rank on which the phase it is in makes no progress before its deadline.

Stop: SIGTERM (what Slurm, Kubernetes and torchrun send first) and SIGUSR1 (what Slurm's
`--signal` sends before the time limit) set a local flag. Under torchrun the ranks agree on it
three ways, by where they are:
- training steps: every CHECK_EVERY_STEPS steps each rank starts an asynchronous all-reduce (MAX)
  of its flag on a CPU (gloo) group and reads the result CHECK_EVERY_STEPS steps later, long
  since arrived: no host synchronisation in the hot loop, and every rank reads the same value
  after the same step, so all stop at one step boundary, within 2 x CHECK_EVERY_STEPS steps;
- between phases (an epoch's first step, its checkpoint, before the next loader starts):
  `now()`, one blocking all-reduce that every rank enters at the same point, a few an epoch;
- evaluation, where ranks may run different numbers of batches and a per-batch collective would
  hang: `poll()`, this rank's own flag, or a key that a signalled rank sets in the process
  group's store, read at most every POLL_S. Each rank leaves at its own batch and the ranks meet
  once, in evaluation's closing all-reduce, which carries who left (engine/loop.evaluate).
So a stop leaves within 8 steps, one evaluation batch or one checkpoint write, well inside
torchrun's 30 s between its SIGTERM and its SIGKILL. The same all-reduce that carries the flag
carries a `--checkpoint-every 10min` clock, so every rank saves at the same step.

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
POLL_S = 0.25  # a store read (one round trip to the store's host) at most this often per rank
STOP_KEY = "train.py/stop"  # in the group's store: under this attempt's prefix, so a restart starts clean


class StopRequest:
    """Call after each step: True on every rank at the same step once any rank got a stop signal.
    `signal_name` then names the signal (the largest number any rank got, e.g. SIGTERM).
    `save_due` says, after each step, that `interval` (a checkpoint.Interval) wants a checkpoint
    there: on every rank at the same step, its clock included."""

    def __init__(self, group=None, every_steps: int = CHECK_EVERY_STEPS, interval=None, store=None):
        self.local, self.signal_name = 0, None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        self.distributed, self.group, self.every_steps = dist.is_initialized(), group, every_steps
        self.interval, self.save_due = interval, False
        self.steps, self.pending, self.reduced = 0, None, None
        if store is None and self.distributed:
            store = dist.distributed_c10d._get_default_store()
        self.store, self.posted, self.polled_s = store, False, 0.0

    def _handle(self, signum, frame):
        self.local = max(self.local, int(signum))

    def __call__(self, blocking: bool = False) -> bool:
        """After each training step, on every rank. blocking: agree now (an epoch's first step,
        after the loader's start-up, which a signal may have arrived during)."""
        save = self.interval is not None and self.interval.step()  # a step count: the same on every rank
        signum = 0
        if not self.distributed:
            save, signum = save or (self.interval is not None and self.interval.time_up()), self.local
        elif blocking:
            signum = self._agree()
        else:
            self.steps += 1
            if self.steps % self.every_steps == 0:
                if self.pending is not None:
                    self.pending.wait()  # started every_steps steps ago: done by now, unless a rank is stalled
                    signum, clock = self.reduced.tolist()  # a CPU tensor: no device sync
                    save = save or bool(clock)
                if save:  # before the next proposal, so that no rank proposes a clock it is about to restart
                    self.interval.restart()
                clock = self.interval is not None and self.interval.time_up()
                self.reduced = torch.tensor([self.local, int(clock)], dtype=torch.int32)
                self.pending = dist.all_reduce(self.reduced, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        if save:
            self.interval.restart()
        self.save_due = save
        return self._stop(signum)

    def now(self) -> bool:
        """At a point every rank reaches together: the agreed answer, by one blocking all-reduce
        (after the one in flight, whose signal counts and whose clock the caller's checkpoint
        makes moot)."""
        return self._stop(self._agree() if self.distributed else self.local)

    def _agree(self) -> int:
        signum = self.local
        if self.pending is not None:
            self.pending.wait()
            signum, self.pending = max(signum, int(self.reduced[0])), None
        flag = torch.tensor([signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def poll(self) -> bool:
        """Inside a phase where the ranks do not step together (evaluation): True once this rank
        got a signal (it then sets the store's key for the others) or another rank set the key.
        This rank's own answer: the caller agrees on it in the phase's closing collective."""
        if self.local:
            if self.store is not None and not self.posted:
                self.store.set(STOP_KEY, str(self.local))
                self.posted = True
            return True
        if self.store is None or time.monotonic() - self.polled_s < POLL_S:
            return False
        self.polled_s = time.monotonic()
        return self.store.check([STOP_KEY])

    def _stop(self, signum: int) -> bool:
        if signum:
            self.signal_name = signal.Signals(signum).name
        return bool(signum)


LONG_PHASE = 2.0  # deadline of a phase that does long work of its own, in --dist-timeout's


class StepWatchdog:
    """A thread that ends this rank when the phase it is in makes no progress before the phase's
    deadline: it writes every thread's Python stack to stderr (faulthandler), one line naming the
    rank and the phase, and exits EXIT_STALLED without cleanup (a stalled collective would never
    return). Every phase has a deadline, counted from its start or its last progress:
    - `fed` after each training step: a little under the process group's timeout (the same
      --dist-timeout): the collective a stalled peer blocks would otherwise time out first, with
      a traceback that names no step;
    - `phase(name)`, waiting on the other ranks (a checkpoint's gather, an agreement, the closing
      all-reduce of evaluation, the stop's barrier): the same deadline;
    - `phase(name, long=True)`, work of this rank's own that may outlast a step by far (an epoch's
      first step with the loader's start-up and JIT, evaluation with `progress` after each batch,
      a checkpoint write): LONG_PHASE times --dist-timeout.
    None as timeout: no thread, every call a no-op. `close` ends the watch (the run is over)."""

    def __init__(self, timeout_s: float | None, rank: int = 0):
        self.timeout_s, self.rank = timeout_s and 0.9 * timeout_s, rank
        self.long_s = timeout_s and LONG_PHASE * timeout_s
        self.state = None  # (phase, deadline_s, last progress): one tuple, so the thread reads one phase's
        self.closed = threading.Event()
        if timeout_s:
            threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def fed(self, epoch: int, step: int):
        """Step `step` of epoch `epoch` (1-based, as the log counts) has just completed."""
        self.state = (f"training, after epoch {epoch} step {step}", self.timeout_s, time.monotonic())

    def phase(self, name: str, long: bool = False):
        self.state = (name, self.long_s if long else self.timeout_s, time.monotonic())

    def progress(self):
        if self.state is not None:
            self.state = (*self.state[:2], time.monotonic())

    def close(self):
        self.closed.set()

    def _watch(self):
        while not self.closed.wait(min(1.0, self.timeout_s / 50)):
            state = self.state
            if state is not None and time.monotonic() - state[2] > state[1]:
                where, deadline_s = state[:2]
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                print(f"train.py: rank {self.rank}: no progress for {deadline_s:.0f} s in {where} (--dist-timeout): "
                      f"a rank is stalled or a collective hangs; the stacks above are this rank's. Exiting "
                      f"{EXIT_STALLED}: torchrun --max-restarts restarts the group from the last checkpoint",
                      file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)
