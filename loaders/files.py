"""Reading files with a bounded number of them open, whatever the batch size and thread count.

    read_file(path)                   # one file's bytes: opened, read and closed, one fd at a time
    files = OpenFiles(paths)          # a process's open shard files, at most MAX_OPEN_FILES at once
    with files.open(k) as fd:         # shared by its reader threads
        read_into(fd, view, offset)

Why a bound: a process may have 1,024 files open (`ulimit -n`, a common default), and reader
threads share one process (decode "device"). Opening a whole batch's files before reading them
held batch x threads descriptors (16 threads x 128 images = 2,048); keeping every shard open held
one per shard (1,282 for ImageNet's train split at 1,000 images a shard). Either fails with EMFILE.
"""
import collections
import contextlib
import os
import threading

import numpy as np

from core.errors import LoaderError

# Shard files one process keeps open: the hits pay on small datasets (all their shards stay open);
# on ImageNet a random order seldom meets the same shard twice in a row, so a hit is rare anyway.
MAX_OPEN_FILES = 32


def read_into(fd: int, view: memoryview, at: int, name: str = ""):
    """Fill `view` from file `fd` at offset `at` (os.preadv: one call, no seek, straight into the batch)."""
    got = os.preadv(fd, [view], at)
    while got < len(view):  # a short read (rare: signals, network file systems) continues
        more = os.preadv(fd, [view[got:]], at + got)
        if more == 0:
            raise LoaderError(f"{name or f'file descriptor {fd}'}: the file ended {len(view) - got} bytes early")
        got += more


def file_sizes(paths) -> np.ndarray:
    """int64 sizes of `paths` (stat: no file is opened)."""
    return np.fromiter((os.stat(p).st_size for p in paths), dtype=np.int64, count=len(paths))


def read_files(paths, sizes, view: memoryview):
    """The files `paths` back to back into `view`, each opened, read and closed before the next,
    so a reader holds one descriptor at a time. `sizes` from file_sizes: a file whose size changed
    since (rewritten under the run) is an error naming it, not a silently cut image."""
    at = 0
    for path, n in zip(paths, sizes.tolist()):
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != n:
                raise LoaderError(f"{path}: its size changed while the loader read it ({n} -> "
                                  f"{os.fstat(fd).st_size} bytes): is something rewriting the dataset?")
            read_into(fd, view[at:at + n], 0, path)
        finally:
            os.close(fd)
        at += n


class OpenFiles:
    """The process's open descriptors of `paths` (by position), at most `limit` at once, shared by
    its threads: a file in use is never closed; past the limit the least recently used idle one is
    closed first, and a thread that finds every slot in use waits for one (each reader holds one
    file at a time, so that happens only with more threads than `limit`). Opening happens outside
    the lock, so a slow open (network file systems) does not hold up the other threads' reads.
    A copy pickled into a worker process starts with no files open."""

    def __init__(self, paths, limit: int = MAX_OPEN_FILES):
        self.paths, self.limit = [str(p) for p in paths], limit
        self._init()

    def _init(self):
        self.fds = collections.OrderedDict()  # position -> fd, least recently used first
        self.users = collections.Counter()  # position -> threads reading it now
        self.opening = set()  # positions a thread is opening (each holds a slot)
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def open(self, k: int):
        fd = self._acquire(k)
        try:
            yield fd
        finally:
            with self.changed:
                self.users[k] -= 1
                if not self.users[k]:
                    del self.users[k]
                    self.changed.notify_all()  # an idle file: a waiting thread may close it for its own

    def _acquire(self, k: int) -> int:
        with self.changed:
            while True:
                if k in self.fds:
                    self.fds.move_to_end(k)
                    self.users[k] += 1
                    return self.fds[k]
                if k not in self.opening and (len(self.fds) + len(self.opening) < self.limit or self._close_idle()):
                    self.opening.add(k)
                    break
                self.changed.wait()
        try:
            fd = os.open(self.paths[k], os.O_RDONLY)
        except BaseException:
            with self.changed:
                self.opening.discard(k)
                self.changed.notify_all()
            raise
        with self.changed:
            self.opening.discard(k)
            self.fds[k] = fd
            self.users[k] += 1
            self.changed.notify_all()
        return fd

    def _close_idle(self) -> bool:
        """Close the least recently used file no thread is reading (the caller holds the lock)."""
        for k, fd in self.fds.items():
            if not self.users[k]:
                del self.fds[k]
                os.close(fd)
                return True
        return False

    def open_count(self) -> int:
        return len(self.fds)

    def close(self):
        with self.changed:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()

    def __del__(self):
        self.close()

    def __getstate__(self):  # a worker process opens its own
        return {"paths": self.paths, "limit": self.limit}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init()
