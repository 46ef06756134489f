"""A rank's side of the node's cache: attach to a remote dataset, wait for a file with a deadline,
read it under a shared lock, and tell the node's fetcher what this process will read next.

Ranks never download and never import the storage client: the node's one fetcher (a fresh
interpreter, storage/fetcher.py) does, so DataLoader workers may fork freely. They meet through
the files of storage/layout.py. `attach` starts the fetcher when none is alive (whichever rank
gets there first; a flock elects one), so a node needs nothing but the same command on every rank.
"""
import fcntl
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from core.manifest import MANIFEST
from core.shards import Shards
from storage.errors import StorageError
from storage.layout import (POS_FIELDS, Layout, cache_key, held, read_json, write_json_atomic, write_plan)

WAIT_S = float(os.environ.get("STORAGE_WAIT_S", 600))  # the default deadline for one file
_ATTACHED = {}  # data folder -> NodeCache, per process (inherited by forked workers)


class NodeCache:
    """One process's handle on a cache folder (see storage/layout.py)."""

    def __init__(self, root: Path, wait_s: float = WAIT_S):
        self.layout = Layout(root)
        config = read_json(self.layout.config)
        self.url, self.bound = config["url"], int(config["bound_bytes"])
        self.wait_s = wait_s
        self._lock_fd, self._lock_pid = None, None
        self._pos = {}  # split -> (fd, generation)
        self.hits = self.misses = 0  # files found in the cache / waited for, by this process
        self._staged = []  # fds held for staged whole files (FFCV), for the loader's life

    # -- liveness ------------------------------------------------------------------------
    def register(self):
        """Hold users/<pid>.lock for this process's life: the fetcher serves live processes only."""
        if self._lock_pid == os.getpid():
            return
        path = self.layout.user_lock(os.getpid())
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd, self._lock_pid, self._pos = fd, os.getpid(), {}

    def ensure_fetcher(self):
        """Start the node's fetcher when none holds fetcher.lock (two racing starts: one exits)."""
        if held(self.layout.fetcher_lock):
            return
        log = open(self.layout.log, "ab")
        here = str(Path(__file__).resolve().parent.parent)  # the fetcher runs this same code
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
        subprocess.Popen([sys.executable, "-m", "storage.fetcher", str(self.layout.root)], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True)
        log.close()

    def check_error(self, name: str):
        """Raise the fetcher's line about `name`, unless an earlier fetcher wrote it (the live one
        clears those when it starts; this skips any read before it did)."""
        path = self.layout.error(name)
        try:
            if path.stat().st_mtime_ns >= self.layout.fetcher_lock.stat().st_mtime_ns:
                raise StorageError(path.read_text().strip())
        except FileNotFoundError:
            pass

    # -- files ---------------------------------------------------------------------------
    def size(self, name: str) -> int:
        return int(self.ready_info()["sizes"][name])

    def ready_info(self) -> dict:
        info = getattr(self, "_ready", None)
        if info is None:
            info = self._ready = read_json(self.layout.ready)
        return info

    @contextmanager
    def open(self, name: str):
        """An fd of the cached file `name` (e.g. "shards/train-000003.tar"), under a shared lock the
        fetcher respects, for as long as the block runs; waits for it to be fetched first."""
        fd = self._acquire(name)
        try:
            yield fd
        finally:
            os.close(fd)

    def read(self, name: str, spans) -> list[bytes]:
        """The bytes of each (offset, size) of file `name`."""
        with self.open(name) as fd:
            return [os.pread(fd, size, offset) for offset, size in spans]

    def stage(self, name: str) -> Path:
        """Wait for whole file `name` and keep it in the cache until this process ends (FFCV maps it)."""
        self._staged.append(self._acquire(name))
        return self.layout.path(name)

    def _acquire(self, name: str) -> int:
        fd = self._try_open(name)
        if fd is not None:
            self._count(hit=True)
            return fd
        self._count(hit=False)
        self.register()
        want = self.layout.wants / f"{os.getpid()}-{threading.get_ident()}"
        want.write_text(name)
        start = last_check = time.monotonic()
        pause = 0.001
        try:
            while True:
                fd = self._try_open(name)
                if fd is not None:
                    return fd
                self.check_error(name)
                now = time.monotonic()
                if now - last_check > 1.0:  # the fetcher died (a node's process killed): elect another
                    self.ensure_fetcher()
                    last_check = now
                if now - start > self.wait_s:
                    raise StorageError(
                        f"{self.url}/{name}: not in the node's cache {self.layout.data} after {self.wait_s:.0f} s: "
                        f"the fetcher made no progress (its log: {self.layout.log}); check the network and the "
                        f"store, or raise STORAGE_WAIT_S")
                time.sleep(pause)
                pause = min(0.02, pause * 2)
        finally:
            want.unlink(missing_ok=True)

    def _count(self, hit: bool):
        """This process's hits and misses, also in counters/<pid> (one pwrite: workers are processes too)."""
        if getattr(self, "_counter_pid", None) != os.getpid():  # a forked worker counts its own
            self.layout.counters.mkdir(exist_ok=True)
            self._counter_fd = os.open(self.layout.counters / str(os.getpid()), os.O_RDWR | os.O_CREAT, 0o644)
            self._counter_pid, self.hits, self.misses = os.getpid(), 0, 0
        self.hits += hit
        self.misses += not hit
        os.pwrite(self._counter_fd, np.array([self.hits, self.misses], dtype=np.int64).tobytes(), 0)

    def _try_open(self, name: str) -> int | None:
        """An fd under a shared lock, or None when the file is not (or no longer) here."""
        path = self.layout.path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:  # evicted between the open and the lock: the name no longer leads to this file
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        return None

    # -- what this process reads next ----------------------------------------------------
    def plan(self, split: str, rows: np.ndarray):
        """rows: (step, shard index) of what this loader reads from its next batch on, sorted by
        step. The fetcher reads ahead in this order and evicts by it."""
        self.register()
        fd, generation = self._pos.get(split, (None, 0))
        if fd is None:
            fd = os.open(self.layout.pos(os.getpid(), split), os.O_RDWR | os.O_CREAT, 0o644)
        generation += 1
        self._pos[split] = (fd, generation)
        self._write_pos(split, 0, active=True)
        write_plan(self.layout.plan(os.getpid(), split), generation, rows)

    def progress(self, split: str, step: int, active: bool = True):
        """This loader has everything of its plan's steps before `step`."""
        if split in self._pos:
            self._write_pos(split, step, active)

    def follow(self, split: str, batches, indices: np.ndarray, batch_size: int, file_of: np.ndarray):
        """Yield `batches` (batch_size each of `indices`, read from shard file_of[index]), telling
        the fetcher the plan first and the step reached after each batch is handed on."""
        self.plan(split, plan_rows(indices, batch_size, file_of))
        step = 0
        try:
            for batch in batches:
                yield batch
                step += 1
                self.progress(split, step)
        finally:
            self.progress(split, step, active=False)

    def _write_pos(self, split: str, step: int, active: bool):
        fd, generation = self._pos[split]
        os.pwrite(fd, np.array([generation, step, int(active)], dtype=np.int64).tobytes(), 0)

    # -- the dataset as the loaders see it ------------------------------------------------
    def shards(self, split: str) -> Shards | None:
        """The record shards of `split` as listed by the manifest (the tars appear as fetched)."""
        folder = self.layout.data / "shards"
        names = sorted(n for n in self.ready_info()["sizes"] if n.startswith(f"shards/{split}-") and n.endswith(".tar"))
        if not names:
            return None
        import json
        classes = json.loads((folder / "classes.json").read_text())
        return Shards(folder, [self.layout.path(n) for n in names], classes)

    def __getstate__(self):  # a spawned worker opens its own files; locks stay with this process
        return {**self.__dict__, "_lock_fd": None, "_lock_pid": None, "_pos": {}, "_staged": [], "_counter_pid": None}


def hit_counts(root: Path) -> tuple[int, int]:
    """(hits, misses) of every process that has read through the cache folder `root`: reads that
    found their file in the cache, and reads that waited for the fetcher."""
    total = np.zeros(2, dtype=np.int64)
    folder = Layout(root).counters
    for path in folder.iterdir() if folder.exists() else []:
        raw = path.read_bytes()
        if len(raw) == 16:
            total += np.frombuffer(raw, dtype=np.int64)
    return int(total[0]), int(total[1])


def by_file(files: np.ndarray):
    """(file, positions in `files` that hold it) for each distinct file, in first-use order: a
    batch reads each tar once, holding it only for its own samples (no reader holds one file while
    it waits for another, so a cache of one shard still moves on)."""
    order = np.argsort(files, kind="stable")
    ordered = files[order]
    cuts = np.flatnonzero(np.diff(ordered)) + 1
    groups = np.split(order, cuts)
    groups.sort(key=lambda g: g[0])
    return [(int(files[g[0]]), g.tolist()) for g in groups]


def plan_rows(indices: np.ndarray, batch_size: int, file_of: np.ndarray) -> np.ndarray:
    """(step, file) for each file each step of `batch_size` of `indices` reads, sorted by step."""
    steps = np.arange(len(indices), dtype=np.int64) // batch_size
    files = np.asarray(file_of)[indices].astype(np.int64)
    keys = np.unique(steps * (int(files.max(initial=0)) + 1) + files)
    width = int(files.max(initial=0)) + 1
    return np.stack([keys // width, keys % width], axis=1).astype(np.int32)


def is_remote(data) -> bool:
    return isinstance(data, str) and "://" in data


def attach(url: str, cache_dir, cache_bytes: int, wait_s: float = WAIT_S) -> Path:
    """The local folder that mirrors `url` in the node's cache (what the loaders are given), once
    the node's fetcher has put the small files there. Starts that fetcher when none runs."""
    from storage.remote import SCHEMES  # names only: obstore itself is imported by the fetcher alone
    url = url.rstrip("/")
    if not url.startswith(SCHEMES):
        raise StorageError(f"--data {url}: a remote dataset is s3://BUCKET/PREFIX, gs://..., az://... or https://...")
    if cache_dir is None:
        raise StorageError(f"--data {url} needs --cache-dir DIR: a folder on this node's local disk for the cache")
    if cache_bytes <= 0:
        raise StorageError(f"--cache-size {cache_bytes}: give the cache's bound, e.g. 200G")
    layout = Layout(Path(cache_dir) / cache_key(url))
    layout.make()
    if not held(layout.fetcher_lock):  # the fetcher this starts serves this run's bound
        write_json_atomic({"url": url, "bound_bytes": int(cache_bytes)}, layout.config)
    else:
        held_bound = int(read_json(layout.config)["bound_bytes"])
        if held_bound != int(cache_bytes):
            raise StorageError(f"--cache-size {cache_bytes}: the node's fetcher for {url} already runs with "
                               f"{held_bound} bytes (another run on this node): give the same size")
    cache = NodeCache(layout.root, wait_s)
    cache.register()
    cache.ensure_fetcher()
    start, last_check = time.monotonic(), time.monotonic()
    while not _ready(layout):
        cache.check_error("_metadata")
        if time.monotonic() - last_check > 1.0:
            cache.ensure_fetcher()
            last_check = time.monotonic()
        if time.monotonic() - start > wait_s:
            raise StorageError(f"--data {url}: the node's fetcher did not list the dataset within {wait_s:.0f} s "
                               f"(its log: {layout.log})")
        time.sleep(0.02)
    _ATTACHED[str(layout.data)] = cache
    return layout.data


def _ready(layout: Layout) -> bool:
    """ready.json from the fetcher that holds the lock now (not one an earlier, dead one left)."""
    ready = read_json(layout.ready)
    try:
        holder = layout.fetcher_lock.read_text().strip()
    except FileNotFoundError:
        return False
    return ready is not None and str(ready.get("pid")) == holder and held(layout.fetcher_lock)


def node_cache(data) -> NodeCache | None:
    """The cache behind a data folder that `attach` returned (in this process or its parent), else None."""
    data = Path(data)
    cache = _ATTACHED.get(str(data))
    if cache is None and (data.parent / "cache.json").exists() and data.name == "data" and (data.parent / "ready.json").exists():
        cache = _ATTACHED[str(data)] = NodeCache(data.parent)  # e.g. a loader built by a spawned process
    return cache


def parse_size(text) -> int:
    """'200G', '512M', '1.5T', '1000000' -> bytes (powers of 1024)."""
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if text and text[-1] in scale:
            return int(float(text[:-1]) * scale[text[-1]])
        return int(text)
    except ValueError:
        raise StorageError(f"--cache-size {text}: give bytes or a size like 500M, 200G, 1.5T") from None
