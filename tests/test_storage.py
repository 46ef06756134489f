"""Training from object storage (storage/): a real S3 endpoint (moto's server) and a Range-capable
HTTP server, both started here on 127.0.0.1; dummy credentials; nothing reaches further.

Batches from s3:// equal local shards' bit for bit; a fetcher killed mid-download ends in a
correct shard; a part corrupted on the server is found and fetched again, a permanently bad one
named; a tiny cache is never exceeded and never deadlocks; a resume on 1 and on 2 processes reads
the same samples; FFCV is staged and trained from a bucket."""
import email.utils
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from convert.make_sample import make_sample
from core.manifest import MANIFEST, describe, manifest_text, read_manifest
from loaders import build_loader
from loaders.common import LoaderSpec, epoch_indices
from storage.cache import attach, node_cache, parse_size
from storage.errors import StorageError
from storage.layout import Layout, cache_key, read_json

CHUNK = 16 << 10  # the manifest's part size for these tests: several parts per shard
SIZE_PX = 32
BUCKET = "bkt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rechunk(folder: Path, chunk_bytes: int = CHUNK):
    """Describe every file of the folder's manifest in smaller parts (the fetcher's unit)."""
    described = {name: describe(folder / name, chunk_bytes) for name in read_manifest(folder)}
    (folder / MANIFEST).write_text(manifest_text(folder, described, keep=lambda n: True))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 classes x 8 train, 3 val, in shards of 4 (8 train shards, 3 val), and FFCV files."""
    from convert.to_ffcv import convert as to_ffcv
    from convert.to_shards import convert as to_shards
    root = make_sample(tmp_path_factory.mktemp("storage") / "data", num_classes=4, train_per_class=8,
                       val_per_class=3, oddities=False, quiet=True)
    to_shards(root, workers=2, progress=False, shard_size=4)
    to_ffcv(root, workers=2, progress=False)
    rechunk(root / "shards")
    rechunk(root / "ffcv", 256 << 10)
    return root


@pytest.fixture(scope="module")
def s3(dataset, tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with the dataset published to s3://bkt/ds; the environment
    points every S3 client (obstore in the fetcher, boto3 here) at it with dummy credentials."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1",
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", STORAGE_RETRY_TIMEOUT_S="5")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        for _ in range(200):
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # the server is still starting
                time.sleep(0.05)
        from convert.publish_remote import publish_remote
        publish_remote(dataset, f"s3://{BUCKET}/ds")
        yield client
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves `root` with Range requests (206), logging each (path, start) served; `corrupt`
    {(path, start): times} flips a byte of that many answers; `delay_s` slows every answer."""
    daemon_threads = True

    def __init__(self, root: Path):
        self.root, self.log, self.corrupt, self.delay_s = Path(root), [], {}, 0.0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _RangeHandler)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        server = self.server
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end, status = 0, len(data), 200
        if rng := self.headers.get("Range"):
            first, last = rng.split("=")[1].split("-")
            start, end, status = int(first), min(len(data), int(last) + 1 if last else len(data)), 206
        part = bytearray(data[start:end])
        key = (self.path.lstrip("/"), start)
        with server.lock:
            if body:
                server.log.append(key)
            if body and server.corrupt.get(key, 0) > 0:
                server.corrupt[key] -= 1
                part[len(part) // 2] ^= 0xFF
        time.sleep(server.delay_s)
        self.send_response(status)
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Last-Modified", email.utils.formatdate(path.stat().st_mtime, usegmt=True))
        self.send_header("ETag", f'"{path.stat().st_mtime_ns}-{len(data)}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(bytes(part))


@pytest.fixture
def web(dataset, tmp_path):
    """The dataset on a Range-capable HTTP server: http://127.0.0.1:PORT/ds."""
    (tmp_path / "www").mkdir()
    os.symlink(dataset, tmp_path / "www" / "ds")
    server = RangeServer(tmp_path / "www")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/ds"
    server.shutdown()
    server.server_close()


def _stop_fetcher(cache_dir: Path, url: str):
    """End the node's fetcher of `url` (the tests' caches are separate folders; its lock names it)."""
    layout = Layout(Path(cache_dir) / cache_key(url))
    pid = layout.fetcher_lock.read_text().strip() if layout.fetcher_lock.exists() else ""
    if pid:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _loader(data, split="train", workers=2, rank=0, world_size=1, batch_size=4, **spec):
    return build_loader("torchvision", split=split, data=data, batch_size=batch_size, workers=workers,
                        image_size=SIZE_PX, seed=0, rank=rank, world_size=world_size,
                        options={"source": "shards", "decode": "cpu"}, **spec)


def _epoch(loader, epoch=0, start_step=0):
    loader.set_epoch(epoch, start_step)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def _same(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (ia, la), (ib, lb) in zip(a, b):
        assert torch.equal(la, lb)
        assert torch.equal(ia, ib)


def _settled_stats(root: Path, files: int) -> dict:
    """stats.json once the fetcher has written it after `files` files (it writes after each)."""
    deadline = time.monotonic() + 30
    while (stats := read_json(Layout(root).stats) or {}).get("files_fetched", 0) < files:
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)
    return stats


def _shard_bytes(dataset: Path, split: str) -> int:
    return sum(p.stat().st_size for p in (dataset / "shards").glob(f"{split}-*.tar"))


def test_s3_batches_equal_local_shards_bit_for_bit(dataset, s3, tmp_path):
    data = attach(f"s3://{BUCKET}/ds", tmp_path / "cache", parse_size("1G"))
    for shuffle in ("global", "shards"):
        for split in ("train", "val"):
            remote = _epoch(_loader(data, split, shuffle=shuffle, shuffle_window=2), epoch=1)
            local = _epoch(_loader(dataset, split, shuffle=shuffle, shuffle_window=2), epoch=1)
            _same(remote, local)
    stats = _settled_stats(data.parent, len(list((dataset / "shards").glob("*.tar"))))
    # every shard once: both splits, whatever the order
    assert stats["bytes_fetched"] == _shard_bytes(dataset, "train") + _shard_bytes(dataset, "val")
    for tar in (dataset / "shards").glob("*.tar"):
        assert (data / "shards" / tar.name).read_bytes() == tar.read_bytes()
    _stop_fetcher(tmp_path / "cache", f"s3://{BUCKET}/ds")


def test_https_dataset_reads_the_same(dataset, web, tmp_path):
    server, url = web
    data = attach(url, tmp_path / "cache", parse_size("1G"))
    _same(_epoch(_loader(data, workers=0)), _epoch(_loader(dataset, workers=0)))
    _stop_fetcher(tmp_path / "cache", url)


def test_a_fetcher_killed_mid_download_ends_in_a_correct_shard(dataset, web, tmp_path):
    server, url = web
    data = attach(url, tmp_path / "cache", parse_size("1G"))
    cache = node_cache(data)
    name = "shards/train-000003.tar"
    parts = -(-(dataset / name).stat().st_size // CHUNK)
    assert parts >= 6
    server.delay_s = 0.15  # slow enough to stop it half way
    got = {}
    reader = threading.Thread(target=lambda: got.update(data=cache.read(name, [(0, 1 << 30)])[0]))
    reader.start()
    tmp = cache.layout.tmp(name)
    deadline = time.monotonic() + 30
    while not (tmp.exists() and tmp.stat().st_size >= 2 * CHUNK):
        assert time.monotonic() < deadline, "the fetcher never wrote two parts"
        time.sleep(0.01)
    _stop_fetcher(tmp_path / "cache", url)  # SIGKILL: mid-download, the .tmp half written
    time.sleep(0.1)  # (a reader starts another fetcher after a second: the .tmp stays as it is till then)
    with server.lock:
        before = [start for path, start in server.log if path == f"ds/{name}"]
    original, partial = (dataset / name).read_bytes(), tmp.read_bytes()
    kept = [i * CHUNK for i in range(parts)  # parts are fetched 4 at a time: any of them may be whole
            if partial[i * CHUNK:(i + 1) * CHUNK] == original[i * CHUNK:(i + 1) * CHUNK]]
    server.delay_s = 0.0
    reader.join(60)  # the waiting reader finds no fetcher and starts another, which continues
    assert not reader.is_alive()
    assert got["data"] == (dataset / name).read_bytes()
    with server.lock:
        after = [start for path, start in server.log if path == f"ds/{name}"][len(before):]
    assert kept and not set(kept) & set(after), "a part the killed fetcher had finished was fetched again"
    assert set(after) == {i * CHUNK for i in range(parts)} - set(kept)
    assert len(after) < parts
    _stop_fetcher(tmp_path / "cache", url)


def test_a_corrupted_part_is_fetched_again(dataset, web, tmp_path):
    server, url = web
    name = "shards/train-000001.tar"
    server.corrupt[(f"ds/{name}", 2 * CHUNK)] = 1  # the server sends that part damaged once
    data = attach(url, tmp_path / "cache", parse_size("1G"))
    cache = node_cache(data)
    assert cache.read(name, [(0, 1 << 30)])[0] == (dataset / name).read_bytes()
    with server.lock:
        assert server.log.count((f"ds/{name}", 2 * CHUNK)) == 2
        assert server.log.count((f"ds/{name}", 0)) == 1  # only the bad part again
    assert _settled_stats(data.parent, 1)["parts_refetched"] == 1
    _stop_fetcher(tmp_path / "cache", url)


def test_a_permanently_bad_part_is_named_with_its_range_and_the_fix(dataset, s3, tmp_path):
    name = "shards/train-000002.tar"
    raw = bytearray((dataset / name).read_bytes())
    raw[CHUNK + 100] ^= 0xFF  # damaged in the bucket, same size
    s3.put_object(Bucket=BUCKET, Key=f"bad/{name}", Body=bytes(raw))
    for other in (dataset / "shards").iterdir():
        if other.name != Path(name).name:
            s3.put_object(Bucket=BUCKET, Key=f"bad/shards/{other.name}", Body=other.read_bytes())
    data = attach(f"s3://{BUCKET}/bad", tmp_path / "cache", parse_size("1G"))
    with pytest.raises(StorageError) as e:
        node_cache(data).read(name, [(0, 10)])
    message = str(e.value)
    assert f"s3://{BUCKET}/bad/{name} bytes {CHUNK}-{2 * CHUNK - 1}" in message
    assert "publish_remote.py" in message and "\n" not in message
    assert not (data / name).exists()
    _stop_fetcher(tmp_path / "cache", f"s3://{BUCKET}/bad")


def test_a_tiny_cache_is_never_exceeded_and_never_deadlocks(dataset, s3, tmp_path):
    """A bound of the index files plus the largest shard: each batch reads shard by shard, each
    held only while read, so the readers (two worker processes) always move on."""
    small = sum(p.stat().st_size for p in (dataset / "shards").iterdir() if p.suffix != ".tar")
    largest = max(p.stat().st_size for p in (dataset / "shards").glob("*.tar"))
    bound = small + largest + 1000
    url = f"s3://{BUCKET}/ds"
    data = attach(url, tmp_path / "cache", bound)
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(sum(p.stat().st_size for p in data.rglob("*") if p.is_file() and p.exists()))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for split in ("train", "val"):
            _same(_epoch(_loader(data, split)), _epoch(_loader(dataset, split)))
    finally:
        stop.set()
        watcher.join()
    stats = _settled_stats(data.parent, 11)
    assert stats["peak_used_bytes"] <= bound and max(seen) <= bound + 4096  # classes.json is outside the manifest
    assert stats["files_evicted"] > 0
    _stop_fetcher(tmp_path / "cache", url)


def test_a_cache_smaller_than_one_shard_is_refused_naming_the_size(dataset, s3, tmp_path):
    small = sum(p.stat().st_size for p in (dataset / "shards").iterdir() if p.suffix != ".tar")
    data = attach(f"s3://{BUCKET}/ds", tmp_path / "cache", small + 1000)
    with pytest.raises(StorageError, match=r"do not fit in --cache-size .*give the cache at least"):
        _epoch(_loader(data, workers=0))
    _stop_fetcher(tmp_path / "cache", f"s3://{BUCKET}/ds")


def test_shard_order_is_every_sample_once_world_size_free_and_windowed():
    sizes = np.array([4, 4, 3, 4, 4, 2, 4, 4, 4, 4])
    n = int(sizes.sum())
    spec = lambda rank, world, batch: LoaderSpec("train", Path("."), batch, rank=rank, world_size=world,  # noqa: E731
                                                 shuffle="shards", shuffle_window=2)
    one = epoch_indices(n, spec(0, 1, 4), epoch=3, shard_sizes=sizes)
    two = [epoch_indices(n, spec(r, 2, 2), epoch=3, shard_sizes=sizes) for r in range(2)]
    assert np.array_equal(np.stack([t.reshape(-1, 2) for t in two], 1).reshape(-1), one)
    assert np.array_equal(epoch_indices(n, spec(1, 2, 2), epoch=3, start_step=5, shard_sizes=sizes), two[1][10:])
    full = epoch_indices(n, LoaderSpec("train", Path("."), n, shuffle="shards", shuffle_window=2), 3,
                         shard_sizes=sizes)
    assert sorted(full.tolist()) == list(range(n))
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    # a window's samples are contiguous in the order: 2 shards per window
    windows = [set(shard_of[full[i:i + 8]]) for i in range(0, n - 8, 8)]
    assert all(len(w) <= 4 for w in windows)
    assert not np.array_equal(full, epoch_indices(n, LoaderSpec("train", Path("."), n, shuffle="shards",
                                                                 shuffle_window=2), 4, shard_sizes=sizes))


def test_a_resume_on_one_and_on_two_processes_reads_the_same_samples_from_s3(dataset, s3, tmp_path):
    data = attach(f"s3://{BUCKET}/ds", tmp_path / "cache", parse_size("1G"))
    common = dict(shuffle="shards", shuffle_window=2, workers=0)
    unbroken = _epoch(_loader(data, batch_size=4, **common), epoch=2)
    k = 3
    resumed_one = _epoch(_loader(data, batch_size=4, **common), epoch=2, start_step=k)
    halves = [_epoch(_loader(data, batch_size=2, rank=r, world_size=2, **common), epoch=2, start_step=k)
              for r in range(2)]
    resumed_two = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*halves)]
    _same(resumed_one, unbroken[k:])
    _same(resumed_two, unbroken[k:])
    _stop_fetcher(tmp_path / "cache", f"s3://{BUCKET}/ds")


def test_remote_data_without_a_cache_dir_names_the_flag(tmp_path):
    with pytest.raises(StorageError, match="--cache-dir"):
        attach("s3://bkt/ds", None, 10)
    with pytest.raises(StorageError, match="500M"):
        parse_size("lots")
    assert parse_size("1.5G") == int(1.5 * (1 << 30))


def test_a_bucket_without_a_published_dataset_names_the_publish_command(s3, tmp_path):
    with pytest.raises(StorageError, match=r"publish_remote.py DATA s3://bkt/nothing"):
        attach(f"s3://{BUCKET}/nothing", tmp_path / "cache", parse_size("1G"), wait_s=30)


def _dali(data, split="train", **spec):
    return build_loader("dali", split=split, data=data, batch_size=4, workers=1, image_size=SIZE_PX, seed=0,
                        options={"source": "shards", "decode": "cpu"}, **spec)


def test_dali_reads_the_same_batches_from_s3_as_from_local_shards(dataset, s3, tmp_path):
    pytest.importorskip("nvidia.dali")
    data = attach(f"s3://{BUCKET}/ds", tmp_path / "cache", parse_size("1G"))
    for split in ("train", "val"):
        _same(_epoch(_dali(data, split, shuffle="shards", shuffle_window=2)),
              _epoch(_dali(dataset, split, shuffle="shards", shuffle_window=2)))
    _stop_fetcher(tmp_path / "cache", f"s3://{BUCKET}/ds")


def test_ffcv_is_staged_from_the_bucket_checked_and_trained_on(dataset, s3, tmp_path):
    pytest.importorskip("ffcv")
    from test_train import ok, records, run_train
    url = f"s3://{BUCKET}/ds"
    proc = ok(run_train(["--loader", "ffcv", "--data", url, "--cache-dir", str(tmp_path / "cache"),
                         "--cache-size", "1G", "--epochs", "1"], tmp_path / "run"))
    assert records(tmp_path / "run")[0]["epoch"] == 1 and "Acc@1" in proc.stdout
    staged = tmp_path / "cache" / cache_key(url) / "data" / "ffcv"
    for split in ("train", "val"):
        assert (staged / f"{split}.beton").read_bytes() == (dataset / "ffcv" / f"{split}.beton").read_bytes()
    stats = read_json(tmp_path / "cache" / cache_key(url) / "stats.json")
    assert stats["bytes_fetched"] == sum((dataset / "ffcv" / f"{s}.beton").stat().st_size for s in ("train", "val"))


def test_torchrun_from_s3_with_a_small_cache_stopped_and_continued_on_one_process_trains_on_the_same_images(
        dataset, s3, tmp_path):
    """2 processes from s3:// with a cache of a third of the train split, SIGTERM to torchrun mid-epoch,
    then 1 process (another node's cache): every global step of both epochs trains on the images an
    unbroken 2-process run trains on (TRAIN_RECORD_BATCHES digests)."""
    from test_cluster import launch, read_until, trained_images
    from test_train import ok, run_train
    url = f"s3://{BUCKET}/ds"
    split_bytes = _shard_bytes(dataset, "train")
    small = sum(p.stat().st_size for p in (dataset / "shards").iterdir() if p.suffix != ".tar")
    bound = str(small + split_bytes // 3)
    args = ["--data", url, "--loader", "torchvision", "--deterministic", "--batch_size", "4", "--epochs", "2",
            "--checkpoint-every", "0", "--shuffle", "shards", "--shuffle-window", "2", "--cache-size", bound]
    unbroken = tmp_path / "unbroken"
    ok(run_train([*args, "--cache-dir", str(tmp_path / "cache-a")], unbroken, torchrun_nproc=2,
                 env={"TRAIN_RECORD_BATCHES": str(unbroken / "batches")}))
    record = {"TRAIN_RECORD_BATCHES": str(tmp_path / "run" / "batches")}
    proc = launch([*args, "--cache-dir", str(tmp_path / "cache-b")], tmp_path / "run", nproc=2, env=record)
    head = read_until(proc, r"epoch 1 step 3/8")
    proc.send_signal(signal.SIGTERM)
    output = head + proc.communicate(timeout=120)[0]
    assert "SIGTERM: saved" in output, output[-3000:]
    ok(run_train([*args, "--cache-dir", str(tmp_path / "cache-c")], tmp_path / "run", env=record))
    got, want = trained_images(tmp_path / "run" / "batches"), trained_images(unbroken / "batches")
    assert got == want and len(want) == 16 and all(sum(c.values()) == 4 for c in want.values())
    for cache in ("cache-a", "cache-b", "cache-c"):
        stats = read_json(tmp_path / cache / cache_key(url) / "stats.json")
        assert stats["peak_used_bytes"] <= int(bound)


def test_the_fetcher_reads_ahead_in_the_order_of_use_from_the_resume_position(dataset, s3, tmp_path):
    """A resume at step k of an epoch: the fetcher's first files are the shards that step k and the
    next ones read, in the order of their first use (its log), not the epoch's first shards."""
    url = f"s3://{BUCKET}/ds"
    data = attach(url, tmp_path / "cache", parse_size("1G"))
    loader = _loader(data, workers=0, shuffle="shards", shuffle_window=1)
    k = 5
    loader.set_epoch(1, k)
    next(iter(loader))
    spec = LoaderSpec("train", Path("."), 4, shuffle="shards", shuffle_window=1)
    sizes = np.bincount(loader.dataset.rows[:, 0])
    order = loader.dataset.rows[np.concatenate([epoch_indices(len(loader.dataset), spec, 1, k, sizes),
                                                epoch_indices(len(loader.dataset), spec, 2, 0, sizes)]), 0]
    first_use = [f"shards/train-{t:06d}.tar" for t in dict.fromkeys(order.tolist())]
    before_k = {f"shards/train-{t:06d}.tar" for t in
                loader.dataset.rows[epoch_indices(len(loader.dataset), spec, 1, 0, sizes)[:4 * k], 0].tolist()}
    log = Layout(data.parent).log
    deadline = time.monotonic() + 30
    while len(fetched := [ln.split()[1] for ln in log.read_text().splitlines() if ln.startswith("fetched ")]) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Window 1, 4 samples a shard and a step: steps k, k+1, k+2 read the last 3 shards of the epoch's
    # shard order, none of those before k; then the next epoch's. Four downloads at a time
    # (FILES_IN_FLIGHT) finish in any order, and a fifth may overtake one.
    assert len(set(first_use[:3])) == 3 and before_k.isdisjoint(first_use[:3])
    assert set(first_use[:3]) <= set(fetched[:5]) and set(fetched[:5]) <= set(first_use[:7])
    _stop_fetcher(tmp_path / "cache", url)
