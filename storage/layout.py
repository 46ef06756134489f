"""Where a remote dataset lives in a node's cache folder, shared by the ranks (storage/cache.py)
and the node's one fetcher (storage/fetcher.py). They talk through these files only, so neither
shares memory, sockets or a client library with the other, and any of them can die and restart.

    CACHE_DIR/<key>/                 key: the URL made readable, plus a hash of it
        cache.json                   {"url", "bound_bytes"}: what the fetcher serves
        data/                        the dataset as a local folder: what the loaders are given
            shards/manifest.json     fetched first, with classes.json and every .idx and .crc
            shards/train-000000.tar  a shard, once fetched whole and checked (renamed from .tmp)
            ffcv/train.beton         a staged FFCV file, the same way
        ready.json                   written when data/ holds the small files: ranks may start
        fetcher.lock                 held by the live fetcher (flock): at most one per node
        fetcher.log                  its output
        stats.json                   bytes fetched, files fetched and evicted, the most ever held
        users/<pid>.lock             held by each process that reads from the cache (flock): alive
        users/<pid>-<split>.plan     int32 rows (step, shard) of what that loader reads, in order
        users/<pid>-<split>.pos      int64 generation, step reached, active: how far it is
        wants/<pid>-<thread>         "<name>": a reader waiting for that file now
        errors/<name>.txt            one line: why that file cannot be fetched (the run stops on it)
        counters/<pid>               int64 hits, misses of that process's reads (benchmarks read them)

A reader holds a shared flock on a file while it reads it; the fetcher evicts a file only under
an exclusive one it got without waiting, so it never deletes what someone is reading.
"""
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

POS_FIELDS = 3  # generation, step, active


def cache_key(url: str) -> str:
    url = url.rstrip("/")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1])[-60:]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


class Layout:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "data"
        self.config = self.root / "cache.json"
        self.ready = self.root / "ready.json"
        self.fetcher_lock = self.root / "fetcher.lock"
        self.log = self.root / "fetcher.log"
        self.stats = self.root / "stats.json"
        self.users = self.root / "users"
        self.wants = self.root / "wants"
        self.errors = self.root / "errors"
        self.counters = self.root / "counters"

    def make(self):
        for d in (self.data, self.users, self.wants, self.errors):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """The local path of a dataset file, e.g. "shards/train-000003.tar"."""
        return self.data / name

    def tmp(self, name: str) -> Path:
        return self.data / f"{name}.tmp"

    def error(self, name: str) -> Path:
        return self.errors / (name.replace("/", "__") + ".txt")

    def plan(self, pid: int, split: str) -> Path:
        return self.users / f"{pid}-{split}.plan"

    def pos(self, pid: int, split: str) -> Path:
        return self.users / f"{pid}-{split}.pos"

    def user_lock(self, pid: int) -> Path:
        return self.users / f"{pid}.lock"


def write_json_atomic(obj, path: Path):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def write_atomic(data: bytes, path: Path):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def held(path: Path) -> bool:
    """Whether some process holds a flock on `path` (a live fetcher, a live reader process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def write_plan(path: Path, generation: int, rows: np.ndarray):
    """rows: int32 (step, shard index in the split's sorted shard list), sorted by step."""
    header = np.array([generation, len(rows)], dtype=np.int64).tobytes()
    write_atomic(header + np.ascontiguousarray(rows, dtype=np.int32).tobytes(), path)


def read_plan(path: Path):
    """(generation, rows) or None."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    generation, n = np.frombuffer(raw[:16], dtype=np.int64)
    return int(generation), np.frombuffer(raw[16:], dtype=np.int32).reshape(int(n), 2)


def read_pos(path: Path):
    """(generation, step, active) or None."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) != 8 * POS_FIELDS:
        return None
    return tuple(int(v) for v in np.frombuffer(raw, dtype=np.int64))
