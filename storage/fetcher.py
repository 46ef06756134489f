"""The node's one fetcher: downloads a remote dataset into the node's cache, ahead of the ranks.

    python -m storage.fetcher CACHE_DIR/<key>      (started by storage/cache.py; one per node)

A fresh interpreter (obstore is not fork-safe), elected by a flock on fetcher.lock: a second one
started at the same time exits at once, and one that died is replaced by the next rank that waits.
First it fetches the small files (every manifest, classes.json, .idx and .crc), checked against
the manifest, and writes ready.json. Then, in a loop:

- what to fetch: first the files a reader is waiting for now (wants/), then, in the order the
  loaders will read them (their plans, from where each is now: users/), every file not yet here;
- space: the bound (cache.json's bound_bytes) counts every file here and the full size of each
  one being fetched, so the folder never holds more. To make room it evicts the file whose next
  use is furthest away (Belady's rule, with the real future), and for read-ahead only one used
  later than the file it makes room for; never a file a reader holds (flock) or waits for;
- each file is fetched in ranged parts (the manifest's chunks: 16 MB), each part checked against
  its CRC32C as it arrives and fetched again when it differs (up to PART_TRIES times), written
  into NAME.tmp and renamed into place when whole. A .tmp left by a killed fetcher is continued:
  its parts that already match their checksums are kept;
- a file that cannot be fetched gets errors/<name>.txt: one line naming the URL, the byte range
  and the fix; the readers waiting for it stop the run with that line.

It exits by itself when no process has used the cache for IDLE_EXIT_S.
"""
import fcntl
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core.errors import ExitStatus, run_command
from core.manifest import MANIFEST, crc32c
from storage.layout import Layout, held, read_json, read_plan, read_pos, write_atomic, write_json_atomic
from storage.remote import describe_error, open_store, read_all, read_range

SUBFOLDERS = ("shards", "ffcv")  # the converted folders a remote dataset may hold (core.dataset.CONVERTED_DIRS)
LARGE = (".tar", ".beton")  # fetched on demand through the cache; everything else at start
PART_TRIES = 3
FILES_IN_FLIGHT = 4
PARTS_IN_FLIGHT = 4
IDLE_EXIT_S = 5.0
HORIZON_X = 8  # plan rows looked at: this many times the files the cache can hold (at least 20,000)
INACTIVE = 1 << 40  # a plan whose loader is not iterating now: after every active one


class PartError(Exception):
    pass


class Fetcher:
    def __init__(self, root: Path):
        self.layout = Layout(root)
        config = read_json(self.layout.config)
        self.url, self.bound = config["url"].rstrip("/"), int(config["bound_bytes"])
        self.store = None
        self.sizes = {}  # name -> size, from the manifests
        self.manifests = {}  # name -> its manifest description
        self.present = {}  # large files here, name -> size
        self.partial = {}  # .tmp files a killed fetcher left, name -> bytes on disk (continued when fetched)
        self.inflight = {}  # name -> future
        self.failed = set()
        self.meta_bytes = 0
        self.stats = dict(bytes_fetched=0, files_fetched=0, files_evicted=0, parts_refetched=0,
                          peak_used_bytes=0, bound_bytes=self.bound)
        self.lock = threading.Lock()
        self.plans = {}  # plan path -> (mtime_ns, generation, rows)

    # -- start ---------------------------------------------------------------------------
    def fetch_small_files(self):
        """Every manifest and the small files it lists, checked; then ready.json."""
        self.store = open_store(self.url)
        found = False
        for sub in SUBFOLDERS:
            raw = read_all(self.store, f"{sub}/{MANIFEST}")
            if raw is None:
                continue
            found = True
            files = __import__("json").loads(raw)["files"]
            local_manifest = self.layout.path(f"{sub}/{MANIFEST}")
            if local_manifest.exists() and local_manifest.read_bytes() != raw:  # republished: start afresh
                for stale in self.layout.path(sub).iterdir():
                    stale.unlink()
            self.layout.path(sub).mkdir(parents=True, exist_ok=True)
            for name, d in files.items():
                self.sizes[f"{sub}/{name}"], self.manifests[f"{sub}/{name}"] = d["size"], d
            small = [f"{sub}/{n}" for n in files if not n.endswith(LARGE)]
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(self.fetch_whole_small, small))
            classes = read_all(self.store, f"{sub}/classes.json")  # written beside, not in the manifest
            if classes is not None:
                write_atomic(classes, self.layout.path(f"{sub}/classes.json"))
            write_atomic(raw, local_manifest)  # last: its presence means the folder is complete
        if not found:
            raise PartError(f"{self.url}: no {'/'.join(('shards', MANIFEST))} or ffcv/{MANIFEST} there: publish "
                            f"the converted dataset with `python convert/publish_remote.py DATA {self.url}`")
        for name in self.sizes:
            path = self.layout.path(name)
            if name.endswith(LARGE):
                if path.exists() and path.stat().st_size == self.sizes[name]:
                    self.present[name] = self.sizes[name]
                elif path.exists():
                    path.unlink()
                if self.layout.tmp(name).exists():
                    self.partial[name] = self.layout.tmp(name).stat().st_size
            elif path.exists():
                self.meta_bytes += path.stat().st_size
        if self.meta_bytes > self.bound:
            raise PartError(f"--cache-size {self.bound} bytes cannot even hold the dataset's index files "
                            f"({self.meta_bytes} bytes): give it more")
        write_json_atomic({"url": self.url, "sizes": self.sizes, "pid": os.getpid()}, self.layout.ready)

    def fetch_whole_small(self, name: str):
        path = self.layout.path(name)
        d = self.manifests[name]
        if path.exists() and path.stat().st_size == d["size"] and _matches(path.read_bytes(), d):
            return
        for _ in range(PART_TRIES):
            raw = read_all(self.store, name)
            if raw is not None and _matches(raw, d):
                write_atomic(raw, path)
                return
        raise PartError(_bad_part_line(self.url, name, 0, d["size"] - 1))

    # -- the loop ------------------------------------------------------------------------
    def used(self) -> int:
        return (self.meta_bytes + sum(self.present.values()) + sum(self.partial.values())
                + sum(self.sizes[n] for n in self.inflight))

    def run(self):
        self.make_room(0, {}, set(), None)  # an earlier run's cache may hold more than this run's bound
        idle_since = time.monotonic()
        with ThreadPoolExecutor(FILES_IN_FLIGHT, thread_name_prefix="fetch") as pool:
            while True:
                users = self.live_users()
                wants = self.live_wants()
                if users or wants:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > IDLE_EXIT_S:
                    return
                self.reap()
                distance = self.next_use(users)
                started = self.schedule(pool, wants, distance)
                # a reader waits: look again soon; otherwise the loop costs a trainer's cores little
                time.sleep(0.005 if wants else 0.02 if started or self.inflight else 0.1)

    def reap(self):
        for name, future in list(self.inflight.items()):
            if not future.done():
                continue
            del self.inflight[name]
            error = future.exception()
            if error is None:
                self.present[name] = self.sizes[name]
                self.stats["files_fetched"] += 1
                print(f"fetched {name}", flush=True)
            else:
                self.failed.add(name)
                line = str(error) if isinstance(error, PartError) else (
                    f"{self.url}/{name}: cannot be fetched ({describe_error(error)}): check the URL, the credentials "
                    f"and the endpoint (AWS_ENDPOINT_URL for MinIO/Ceph)")
                write_atomic((line + "\n").encode(), self.layout.error(name))
                print(line, flush=True)
            self.write_stats()

    def schedule(self, pool, wants: dict, distance: dict) -> bool:
        """Start fetches: wanted files first (soonest first), then read-ahead in order of next use.
        Whether it started any."""
        started = False
        far = float("inf")
        wanted = sorted((n for n in set(wants.values()) if n in self.sizes),
                        key=lambda n: distance.get(n, far))
        ahead = sorted((d, n) for n, d in distance.items())
        for name, is_wanted in [(n, True) for n in wanted] + [(n, False) for _, n in ahead]:
            if len(self.inflight) >= FILES_IN_FLIGHT:
                return started
            if name in self.present or name in self.inflight or name in self.failed:
                continue
            size = self.sizes[name]
            if size + self.meta_bytes > self.bound:
                self.failed.add(name)
                write_atomic((f"{self.url}/{name}: {size} bytes do not fit in --cache-size {self.bound} bytes: give "
                              f"the cache at least {size + self.meta_bytes} bytes\n").encode(), self.layout.error(name))
                continue
            if self.used() + size > self.bound:
                self.make_room(size, distance, set(wants.values()), None if is_wanted else distance[name])
            if self.used() + size > self.bound:
                if is_wanted:
                    continue  # another wanted file may fit; readers release what they hold
                return started  # read-ahead goes in order: nothing later may jump ahead
            self.partial.pop(name, None)  # counted in full as in flight from now on
            self.inflight[name] = pool.submit(self.download, name)
            self.stats["peak_used_bytes"] = max(self.stats["peak_used_bytes"], self.used())
            started = True
        return started

    def make_room(self, size: int, distance: dict, wanted: set, for_distance):
        """Evict files (furthest next use first) until `size` more bytes fit, sparing what readers
        hold or wait for; for read-ahead (for_distance set) only files used later than that."""
        for name in list(self.partial):  # a killed fetcher's leftovers go first
            if self.used() + size <= self.bound:
                return
            self.layout.tmp(name).unlink(missing_ok=True)
            del self.partial[name]
        far = float("inf")
        victims = sorted((n for n in self.present if n not in wanted), key=lambda n: -distance.get(n, far))
        for name in victims:
            if self.used() + size <= self.bound:
                return
            if for_distance is not None and distance.get(name, far) <= for_distance:
                return
            if self.evict(name):
                del self.present[name]
                self.stats["files_evicted"] += 1
                print(f"evicted {name}", flush=True)

    def evict(self, name: str) -> bool:
        path = self.layout.path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # a reader holds it
        try:
            path.unlink()
        finally:
            os.close(fd)
        return True

    def live_users(self) -> list[int]:
        alive = []
        for lock in self.layout.users.glob("*.lock"):
            pid = int(lock.stem)
            if held(lock):
                alive.append(pid)
            else:  # a process that ended: its plans go with it
                for stale in self.layout.users.glob(f"{pid}*"):
                    stale.unlink(missing_ok=True)
        return alive

    def live_wants(self) -> dict:
        wants = {}
        for path in self.layout.wants.iterdir():
            pid = int(path.name.split("-")[0])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
                continue
            except PermissionError:
                pass
            try:
                wants[path.name] = path.read_text().strip()
            except FileNotFoundError:
                pass
        return wants

    def next_use(self, users: list[int]) -> dict:
        """{large file name: steps until a loader of the node next reads it} over the live plans,
        looked at as far ahead as the cache could matter (HORIZON_X its capacity in files)."""
        distance = {}
        for pid in users:
            for plan_path in self.layout.users.glob(f"{pid}-*.plan"):
                split = plan_path.name[len(f"{pid}-"):-len(".plan")]
                pos = read_pos(self.layout.pos(pid, split))
                plan = self._plan(plan_path)
                if plan is None or pos is None or pos[0] != plan[0]:
                    continue
                for name, d in self._first_uses(plan_path, plan, split, pos).items():
                    distance[name] = min(distance.get(name, d), d)
        return distance

    def _first_uses(self, path: Path, plan, split: str, pos) -> dict:
        key = ("uses", path)
        cached = self.plans.get(key)
        if cached is not None and cached[0] == (plan[0], pos):
            return cached[1]
        rows = plan[1]
        start = int(np.searchsorted(rows[:, 0], pos[1]))
        capacity = max(1, self.bound // max(1, int(np.mean(list(self.sizes.values()) or [1]))))
        ahead = rows[start:start + max(20_000, HORIZON_X * capacity)]
        shards, first = np.unique(ahead[:, 1], return_index=True)  # rows are sorted by step
        names = self.shard_names(split)
        offset = 0 if pos[2] else INACTIVE
        uses = {names[s]: int(ahead[i, 0]) - pos[1] + offset for s, i in zip(shards.tolist(), first.tolist())}
        self.plans[key] = ((plan[0], pos), uses)
        return uses

    def _plan(self, path: Path):
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        cached = self.plans.get(path)
        if cached is None or cached[0] != mtime:
            plan = read_plan(path)
            if plan is None:
                return None
            self.plans[path] = cached = (mtime, *plan)
        return cached[1:]

    def shard_names(self, split: str) -> list[str]:
        key = ("names", split)
        if key not in self.plans:
            self.plans[key] = sorted(n for n in self.sizes if n.startswith(f"shards/{split}-") and n.endswith(".tar"))
        return self.plans[key]

    # -- one file ------------------------------------------------------------------------
    def download(self, name: str):
        """Fetch `name` in its manifest's chunks into NAME.tmp, each checked as it arrives; keep the
        chunks a killed fetcher already wrote correctly; rename into place when whole."""
        d = self.manifests[name]
        size, step = d["size"], d["chunk_bytes"]
        tmp = self.layout.tmp(name)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            have = os.fstat(fd).st_size
            todo = [i for i in range(len(d["crc32c"]))
                    if not (have >= min(size, (i + 1) * step)
                            and crc32c(os.pread(fd, _end(i, step, size) - i * step, i * step)) == d["crc32c"][i])]
            if len(todo) > 1:
                with ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="part") as parts:
                    list(parts.map(lambda i: self.fetch_part(fd, name, i, d), todo))
            else:
                for i in todo:
                    self.fetch_part(fd, name, i, d)
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.layout.path(name))

    def fetch_part(self, fd: int, name: str, i: int, d: dict):
        size, step = d["size"], d["chunk_bytes"]
        start, end = i * step, _end(i, step, size)
        for attempt in range(PART_TRIES):
            data = read_range(self.store, name, start, end)
            with self.lock:
                self.stats["bytes_fetched"] += len(data)
                if attempt:
                    self.stats["parts_refetched"] += 1
            if len(data) == end - start and crc32c(data) == d["crc32c"][i]:
                os.pwrite(fd, data, start)
                return
            print(f"{self.url}/{name} bytes {start}-{end - 1}: checksum differs from the manifest's "
                  f"(try {attempt + 1} of {PART_TRIES})", flush=True)
        raise PartError(_bad_part_line(self.url, name, start, end - 1))

    def write_stats(self):
        with self.lock:
            write_json_atomic({**self.stats, "used_bytes": self.used()}, self.layout.stats)


def _end(i: int, step: int, size: int) -> int:
    return min(size, (i + 1) * step)


def _matches(data: bytes, d: dict) -> bool:
    step = d["chunk_bytes"]
    return len(data) == d["size"] and all(crc32c(data[i * step:(i + 1) * step]) == c for i, c in enumerate(d["crc32c"]))


def _bad_part_line(url: str, name: str, first: int, last: int) -> str:
    return (f"{url}/{name} bytes {first}-{last}: the checksum differs from the manifest's after {PART_TRIES} "
            f"tries: the object in the bucket is damaged or was replaced; re-publish the dataset "
            f"(`python convert/publish_remote.py DATA {url}`)")


def main(argv=None) -> ExitStatus:
    return ExitStatus(serve((argv or sys.argv[1:])[0]))


def serve(root: str) -> int:
    layout = Layout(Path(root))
    layout.make()
    lock_fd = os.open(layout.fetcher_lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another fetcher serves this node
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, str(os.getpid()).encode())  # who holds it, for a person (or a test) looking
    layout.ready.unlink(missing_ok=True)  # an earlier fetcher's word no longer holds
    for old in layout.errors.iterdir():
        old.unlink(missing_ok=True)
    fetcher = Fetcher(Path(root))
    try:
        fetcher.fetch_small_files()
    except Exception as e:  # a one-line reason for the ranks waiting on ready.json
        line = str(e) if isinstance(e, PartError) else (
            f"{fetcher.url}: cannot read the dataset's manifest ({describe_error(e)}): check the URL, the "
            f"credentials and the endpoint (AWS_ENDPOINT_URL for MinIO/Ceph)")
        write_atomic((line + "\n").encode(), layout.error("_metadata"))
        print(line, flush=True)
        if not isinstance(e, PartError):
            traceback.print_exc()
        return 1
    fetcher.write_stats()
    fetcher.run()
    fetcher.write_stats()
    return 0


if __name__ == "__main__":
    run_command(main)
