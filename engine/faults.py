"""Loader failures, caught at a step boundary so the trainer can checkpoint before it stops.

A DataLoader worker killed (the OOM killer, kill -9) reaches the main process two ways: the next
`next(loader)` raises, or PyTorch's SIGCHLD handler raises in the main thread wherever it is,
possibly halfway through an optimizer step, when the weights are no longer a state worth saving.
`next_batch` defers that handler to the step boundary, so a failed loader costs one step at most.
"""
import signal
import threading


class LoaderFailed(RuntimeError):
    """The loader raised before batch `next_batch` of `epoch`: every step before it is trained."""

    def __init__(self, epoch: int, next_batch: int, error: BaseException):
        self.epoch, self.next_batch, self.error = epoch, next_batch, error
        super().__init__(f"the loader failed at epoch {epoch}, batch {next_batch}: {reason(error)}")


def reason(error: BaseException) -> str:
    """One line. A DataLoader worker's exception arrives carrying its whole traceback, whose last
    line names the error (and the sample, where the loader knows it)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if "Traceback" in str(error):
        return lines[-1]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class StepBoundaryLoader:
    """Iterates a loader for one epoch; any failure of the loader, a dead worker included,
    surfaces as LoaderFailed from next_batch(i), never in the middle of a step."""

    def __init__(self, loader, epoch: int):
        self.iterator, self.epoch = iter(loader), epoch
        self.deferred, self.pending = None, False
        self.can_defer = hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread()

    def next_batch(self, i: int):
        """Batch i, or None at the end of the epoch."""
        try:
            if self.pending:  # a child died during the last step: let PyTorch's handler judge it now
                self.pending = False
                self.deferred(signal.SIGCHLD, None)
            batch = next(self.iterator)
        except StopIteration:
            return None
        except Exception as e:
            raise LoaderFailed(self.epoch, i, e) from e
        self._defer_child_signals()
        return batch

    def _defer_child_signals(self):
        # A DataLoader installs its handler when its first iterator starts, so check after each batch.
        if not self.can_defer:
            return
        handler = signal.getsignal(signal.SIGCHLD)
        if callable(handler) and handler != self._note:
            self.deferred = handler
            signal.signal(signal.SIGCHLD, self._note)

    def _note(self, signum, frame):
        self.pending = True

    def close(self, next_batch: int):
        """End the epoch's iterator, give the handler back (the next epoch defers it again); a
        child that died during the last step still fails the loader, at `next_batch`.

        The trainer asks for exactly the epoch's steps, never for the iterator's end, so the
        iterator is still suspended at its last batch: closing it now, not whenever it is
        collected, lets a loader release that epoch's threads and buffers before the next epoch
        starts (a loader that keeps state across epochs must not wait for the end either: DALI)."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()
        if self.deferred is not None and signal.getsignal(signal.SIGCHLD) == self._note:
            signal.signal(signal.SIGCHLD, self.deferred)
        if self.pending:
            self.pending = False
            try:
                self.deferred(signal.SIGCHLD, None)
            except Exception as e:
                raise LoaderFailed(self.epoch, next_batch, e) from e
