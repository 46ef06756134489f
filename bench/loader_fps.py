"""Loader throughput side by side: our loaders, the stock torchvision pipeline, each library's bare
pipeline, and the decode limit of the bytes each one reads; images/s, CPU, memory, first batch.

    python bench/loader_fps.py [--data DIR] [--loaders ffcv,dali,torchvision] [--epochs 6]
                               [--max-resolution 512] [--write-mode jpg] [--json PATH]   (--help: all)

With no --data it uses the built-in sample dataset. What the loaders need is converted once with
the converter's defaults into DATA/ffcv and DATA/shards; another --max-resolution or --write-mode
goes into its own folder (DATA/ffcv-256px-raw, DATA/shards-256px), so the defaults stay untouched.

Each row runs in its own process, so its CPU time and peak memory are its own (bench/README.md
describes the rows and columns). A timed unit is one whole epoch, from iter() to the last batch,
right after --lead-in untimed epochs of the same row.
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from functools import partial

from bench.harness import Forked, Report, Row, add_output_flags, cores, measure, paired, stats
from convert.images import JPEG_QUALITY, MAX_RES_PX
from core.errors import ConfigError, run_command

LOADER_NAMES = ("ffcv", "dali", "torchvision")
WRITE_MODES = ("jpg", "raw", "smart", "proportion")
COLORS = {"stock": "#7f7f7f", "ffcv": "#1f77b4", "dali": "#2ca02c", "torchvision": "#d62728"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="ImageNet-layout folder; default: the built-in sample dataset")
    p.add_argument("--loaders", default=",".join(LOADER_NAMES),
                   help="comma-separated subset of ffcv,dali,torchvision (the stock row always runs)")
    p.add_argument("--split", default="train", choices=["train", "val"],
                   help="train: RandomResizedCrop + flip; val: resize + center crop")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=cores(),
                   help="worker processes (torchvision, stock) or threads (FFCV, DALI), per row")
    p.add_argument("--image-size", type=int, default=224, help="output crop size in px")
    p.add_argument("--epochs", type=int, default=6, help="timed epochs per row, after the warm-up")
    p.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs per row first")
    p.add_argument("--lead-in", type=int, default=1,
                   help="untimed epochs of the same row right before each timed one, so work done ahead "
                        "between epochs is not done in other rows' time")
    p.add_argument("--max-resolution", dest="max_res_px", type=int, default=MAX_RES_PX,
                   help="converter: longest stored side in px (another value converts into its own folder)")
    p.add_argument("--write-mode", default="jpg", choices=WRITE_MODES,
                   help="FFCV converter: how images are stored (another value converts into its own folder)")
    p.add_argument("--dali-source", default="auto", choices=["auto", "shards", "folder"],
                   help="DALI reads the shards (auto: converted when missing) or the ImageFolder")
    p.add_argument("--torchvision-source", default="auto", choices=["auto", "shards", "folder"],
                   help="our torchvision loader reads the shards (auto: when they exist, as the loader "
                        "does) or the ImageFolder; its bare row reads the same bytes")
    p.add_argument("--device", default="cpu", help="where our loaders deliver batches (cpu, cuda, cuda:1)")
    p.add_argument("--device-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="also a 'torchvision device-decode' row: its threads read JPEG bytes, the batch is decoded "
                        "on --device (nvJPEG on CUDA); default: on when --device is not the CPU")
    p.add_argument("--device-decode-workers", type=int, default=3,
                   help="that row's reader threads (with the thread that hands batches to the device: its host cores)")
    p.add_argument("--resume-at", type=float, default=None,
                   help="also a '<loader> resumed at F' row per loader: each epoch starts at that fraction, as a "
                        "resumed run does (set_epoch(epoch, start_step)); its cold first batch against the fresh row's")
    p.add_argument("--bucket", action="store_true",
                   help="also torchvision rows reading the shards from an S3 bucket on 127.0.0.1 (moto's server, "
                        "started here) through the node cache: 's3 cold' (an empty cache each epoch), 's3 warm' (a "
                        "cache that holds the split), 's3 cache 1/N' (--bucket-cache-fraction of the split, --shuffle "
                        "shards), with bytes fetched per epoch over the split's size and cache hits")
    p.add_argument("--bucket-cache-fraction", type=float, default=0.1,
                   help="the small cache row's bound, as a share of the split's shard bytes")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per shard when converting (another value than the converter's converts into its own "
                        "folder, DATA/shards-sN); the cache rows need many shards")
    p.add_argument("--seed", type=int, default=0, help="shuffling and augmentation seed")
    add_output_flags(p, "loader_fps")
    return p


# --- what each row reads ---------------------------------------------------------------------------

def prepare(args):
    """Set args.data, beton_dir, shards_dir and reads (what each library reads); convert what is missing."""
    from convert.default_data import ensure_sample
    args.data = data = ensure_sample(args.data, "loader_fps")
    if not (data / args.split).is_dir():
        raise ConfigError(f"--data {data}: no {args.split}/ folder (expected {data}/{args.split}/<class>/<image>)")
    default_ffcv = args.max_res_px == MAX_RES_PX and args.write_mode == "jpg"
    args.beton_dir = data / ("ffcv" if default_ffcv else f"ffcv-{args.max_res_px}px-{args.write_mode}")
    args.shards_dir = data / ("shards" if args.max_res_px == MAX_RES_PX else f"shards-{args.max_res_px}px")
    if args.shard_size:
        args.shards_dir = args.shards_dir.with_name(f"{args.shards_dir.name}-s{args.shard_size}")
    if "ffcv" in args.loaders and not ((args.beton_dir / f"{args.split}.beton").exists()
                                       and (args.beton_dir / "classes.json").exists()):
        from convert.to_ffcv import convert
        print(f"loader_fps: converting {data}/{args.split} into {args.beton_dir}", file=sys.stderr)
        convert(data, args.beton_dir, splits=(args.split,), max_res_px=args.max_res_px, write_mode=args.write_mode,
                progress=False)
    sources = {"dali": args.dali_source, "torchvision": args.torchvision_source}
    wanted = [lib for lib, source in sources.items() if lib in args.loaders
              and (source == "shards" or source == "auto" and lib == "dali")] + (["bucket"] if args.bucket else [])
    if wanted and not list(args.shards_dir.glob(f"{args.split}-*.idx")):
        from convert.to_shards import convert
        print(f"loader_fps: writing shards of {data}/{args.split} into {args.shards_dir}", file=sys.stderr)
        convert(data, args.shards_dir, splits=(args.split,), max_res_px=args.max_res_px, progress=False,
                **({"shard_size": args.shard_size} if args.shard_size else {}))
    have_shards = bool(list(args.shards_dir.glob(f"{args.split}-*.idx")))
    # the loaders' own rule: auto reads the shards when they exist
    args.reads = {"ffcv": "beton", "stock": "folder",
                  **{lib: "shards" if source != "folder" and have_shards else "folder"
                     for lib, source in sources.items()}}


IMAGENET_IMAGES = 1_281_167 + 50_000  # train + val


def storage(args) -> dict:
    """What the converted split costs on disk: bytes per image, and ImageNet's size at that rate
    (an estimate from this dataset's images, whose sizes may not be ImageNet's)."""
    from core.dataset import scan
    images, out = len(scan(args.data, splits=(args.split,)).splits[args.split]), {}
    for kind, files in (("beton", [args.beton_dir / f"{args.split}.beton"]),
                        ("shards", sorted(args.shards_dir.glob(f"{args.split}-*.tar")))):
        size = sum(f.stat().st_size for f in files if f.exists())
        if size:
            out[kind] = {"bytes_per_image": round(size / images),
                         "imagenet_gb": round(size / images * IMAGENET_IMAGES / 1e9, 1)}
    return out


def limit_source(library: str, args) -> str:
    """Which bytes a row reads, named as its decode-limit row is."""
    reads = args.reads[library]
    if reads == "beton":
        return ".beton JPEGs" if args.write_mode == "jpg" else f".beton images ({args.write_mode})"
    return "shard JPEGs" if reads == "shards" else "original files"


class Pipeline(Row):
    """Whole epochs of one input pipeline; `builder(args)` returns run_epoch(epoch) -> (images, first batch s)."""

    def __init__(self, name: str, library: str, kind: str, builder, args):
        self.name, self.library, self.kind, self.builder, self.args = name, library, kind, builder, args

    def build(self):
        self.run_epoch, self.epoch = self.builder(self.args), 0

    def work(self) -> dict:
        images, first_batch_s, *more = self.run_epoch(self.epoch)
        self.epoch += 1  # consecutive epoch numbers, lead-ins included, as a training run sees them
        return {"images": images, "first_batch_s": first_batch_s, **(more[0] if more else {})}

    def lead_in(self):
        for _ in range(self.args.lead_in):
            self.work()


def plan_rows(args) -> list[Pipeline]:
    rows = [Pipeline("stock", "stock", "stock", build_stock, args)]
    for lib in args.loaders:
        rows += [Pipeline(lib, lib, "ours", partial(build_ours, library=lib), args),
                 Pipeline(f"{lib} bare", lib, "bare", BARE[lib], args)]
        if args.resume_at is not None:
            rows.append(Pipeline(f"{lib} resumed at {args.resume_at:.0%}", lib, "resumed",
                                 partial(build_ours, library=lib, start_at=args.resume_at), args))
    if args.bucket:
        rows += [Pipeline("torchvision s3 warm", "torchvision", "bucket", partial(build_bucket, mode="warm"), args),
                 BucketCold("torchvision s3 cold", "torchvision", "bucket", partial(build_bucket, mode="cold"), args),
                 Pipeline(f"torchvision s3 cache 1/{round(1 / args.bucket_cache_fraction)}", "torchvision", "bucket",
                          partial(build_bucket, mode="small"), args)]
    if args.device_decode and "torchvision" in args.loaders:
        rows += [Pipeline("torchvision device-decode", "torchvision", "ours",
                          partial(build_ours, library="torchvision", decode="device"), args),
                 Pipeline("device-decode host part", "torchvision", "host part", build_host_part, args)]
    for source in dict.fromkeys(limit_source(lib, args) for lib in [*args.loaders, "stock"]):
        rows.append(Pipeline(f"decode limit: {source}", "limit", "limit", partial(build_limit, source=source), args))
    return rows


# --- the rows' pipelines (built inside each row's process) -----------------------------------------

def _consume(batches, device):
    import torch
    start_s, first_s, n = time.perf_counter(), None, 0
    for images, labels in batches:
        if device.type != "cpu" and images.device != device:
            images = images.to(device, non_blocking=True)  # stock / bare rows copy to the device here
        if first_s is None:
            first_s = time.perf_counter() - start_s
        n += images.shape[0]  # (a batch of one can come with a 0-d label tensor: FFCV's Squeeze)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n, first_s


def our_loader(args, library: str, decode: str = "cpu"):
    """Our loader on what the row reads; decode "device": the torchvision loader decoding on
    --device, read by --device-decode-workers."""
    import torch
    from loaders import build_loader
    options = {"ffcv": {"beton_dir": str(args.beton_dir)},
               "dali": {"shards_dir": str(args.shards_dir), "source": args.dali_source},
               "torchvision": {"shards_dir": str(args.shards_dir), "source": args.torchvision_source}}
    workers = args.device_decode_workers if decode == "device" else args.workers
    return build_loader(library, split=args.split, data=args.data, batch_size=args.batch_size,
                        workers=workers, image_size=args.image_size, seed=args.seed,
                        device=torch.device(args.device), options={**options[library], "decode": decode})


def build_ours(args, library: str, decode: str = "cpu", start_at: float = 0.0):
    """start_at: each epoch from that fraction of its steps on, reading nothing before it."""
    import torch
    device = torch.device(args.device)
    loader = our_loader(args, library, decode)

    def run_epoch(epoch):
        loader.set_epoch(epoch, int(start_at * len(loader)))
        return _consume(loader, device)[0], loader.first_batch_s
    return run_epoch


def build_host_part(args):
    """What the device-decode row's host does alone: its threads read each JPEG's bytes, parse its
    header and draw its crop, and the batches of bytes reach the consumer; nothing is decoded.
    Its img/s per core is the host's share of decoding on the device."""
    loader = our_loader(args, "torchvision", decode="device")

    def run_epoch(epoch):
        loader.set_epoch(epoch)
        start_s, first_s, n = time.perf_counter(), None, 0
        for _, labels in loader._host_batches():
            first_s = first_s if first_s is not None else time.perf_counter() - start_s
            n += len(labels)
        return n, first_s
    return run_epoch


def build_stock(args):
    """torchvision's references/classification recipe (PIL backend), as train.py there builds it."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
    from torchvision import datasets, transforms
    from torchvision.transforms import InterpolationMode
    size = args.image_size
    if args.split == "train":
        geometry = [transforms.RandomResizedCrop(size, interpolation=InterpolationMode.BILINEAR, antialias=True),
                    transforms.RandomHorizontalFlip(0.5)]
    else:
        geometry = [transforms.Resize(int(size / 0.875), interpolation=InterpolationMode.BILINEAR, antialias=True),
                    transforms.CenterCrop(size)]
    dataset = datasets.ImageFolder(str(args.data / args.split), transforms.Compose(
        geometry + [transforms.PILToTensor(), transforms.ConvertImageDtype(torch.float),
                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    device = torch.device(args.device)
    sampler = RandomSampler(dataset) if args.split == "train" else SequentialSampler(dataset)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type != "cpu")
    return lambda epoch: _consume(loader, device)


def build_ffcv_bare(args):
    """FFCV's Loader as its ImageNet example writes it, minus normalisation."""
    import torch
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
    size = (args.image_size, args.image_size)
    device = torch.device(args.device)
    to_device = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    if args.split == "train":
        image = [RandomResizedCropRGBImageDecoder(size), RandomHorizontalFlip()]
    else:
        image = [CenterCropRGBImageDecoder(size, ratio=224 / 256)]
    loader = Loader(str(args.beton_dir / f"{args.split}.beton"), batch_size=args.batch_size,
                    num_workers=args.workers, os_cache=True, drop_last=args.split == "train",
                    order=OrderOption.RANDOM if args.split == "train" else OrderOption.SEQUENTIAL,
                    pipelines={"image": image + [ToTensor(), *to_device, ToTorchImage()],
                               "label": [IntDecoder(), ToTensor(), Squeeze(), *to_device]})
    return lambda epoch: _consume(loader, device)


def build_dali_bare(args):
    """A DALI CPU pipeline as DALI's examples write it; built once, reset between epochs."""
    import torch
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    train, size = args.split == "train", args.image_size
    tars = sorted(args.shards_dir.glob(f"{args.split}-*.tar")) if args.reads["dali"] == "shards" else []

    @pipeline_def(batch_size=args.batch_size, num_threads=args.workers, device_id=None)
    def pipe():
        if tars:
            jpegs, labels = fn.readers.webdataset(paths=[str(t) for t in tars],
                                                  index_paths=[str(t.with_suffix(".idx")) for t in tars],
                                                  ext=["jpg", "cls"], random_shuffle=train, name="Reader")
            labels = fn.pad(labels, axes=(0,), shape=(8,))  # ASCII digits, padded to one shape per batch
        else:
            jpegs, labels = fn.readers.file(file_root=str(args.data / args.split), random_shuffle=train,
                                            name="Reader")
        if train:
            images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
            images = fn.resize(images, resize_x=size, resize_y=size)
            images = fn.flip(images, horizontal=fn.random.coin_flip())
        else:
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            images = fn.resize(images, resize_shorter=int(size / 0.875))
            images = fn.crop(images, crop=(size, size))
        return images, labels

    pipeline = pipe()
    pipeline.build()
    # auto_reset off: reset() at the start of the next epoch, so no prefetching happens between
    # epochs (while other rows are being timed).
    iterator = DALIGenericIterator(pipeline, ["images", "labels"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL)
    device = torch.device(args.device)

    def run_epoch(epoch):
        if epoch:
            iterator.reset()
        return _consume(((b[0]["images"], b[0]["labels"]) for b in iterator), device)
    return run_epoch


def shard_members(shards_dir, split) -> list[tuple]:
    """(tar, jpg offset, jpg size, label) of every sample in the shards, from the DALI index files
    the loaders read (core.shards)."""
    from core.shards import Shards
    shards = Shards(shards_dir, sorted(shards_dir.glob(f"{split}-*.tar")), classes=[])
    samples, out = shards.samples(), []
    for t, tar in enumerate(shards.tars):
        with open(tar, "rb") as f:
            for _, jpg_offset, jpg_size, cls_offset, cls_size in samples[samples[:, 0] == t].tolist():
                f.seek(cls_offset)
                out.append((str(tar), jpg_offset, jpg_size, int(f.read(cls_size))))
    return out


def read_bytes(tar: str, offset: int, size: int) -> bytes:
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


class ShardJPEGs:
    """Map-style dataset over the shards, as small as it gets: seek, read, decode."""

    def __init__(self, shards_dir, split: str, transform):
        self.transform, self.items = transform, shard_members(shards_dir, split)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch
        from torchvision.io import decode_jpeg
        tar, offset, size, label = self.items[i]
        return self.transform(decode_jpeg(torch.frombuffer(bytearray(read_bytes(tar, offset, size)),
                                                           dtype=torch.uint8))), label


def build_torchvision_bare(args):
    """torchvision.io's decoder and transforms v2 on uint8 tensors in a DataLoader, as the docs show:
    over ImageFolder, or over the shards (ShardJPEGs) when our loader reads those."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2
    size = args.image_size
    if args.split == "train":
        transform = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    else:
        transform = v2.Compose([v2.Resize(int(size / 0.875), antialias=True), v2.CenterCrop(size)])
    if args.reads["torchvision"] == "shards":
        dataset = ShardJPEGs(args.shards_dir, args.split, transform)
    else:
        dataset = datasets.ImageFolder(str(args.data / args.split), transform=transform,
                                       loader=partial(decode_image, mode=ImageReadMode.RGB))
    device = torch.device(args.device)
    # persistent_workers as our loader has them: the bare row pays no more worker start-ups than ours.
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=args.split == "train",
                        num_workers=args.workers, drop_last=args.split == "train",
                        persistent_workers=args.workers > 0, pin_memory=device.type != "cpu")
    return lambda epoch: _consume(loader, device)


BARE = {"ffcv": build_ffcv_bare, "dali": build_dali_bare, "torchvision": build_torchvision_bare}


# --- the bucket rows: our torchvision loader on s3:// (moto's server on 127.0.0.1) ----------------

def start_bucket(args):
    """moto's S3 server on 127.0.0.1 (a subprocess), with the split's shards published to
    s3://bench/data; the environment points every S3 client at it with dummy credentials."""
    import os
    import socket
    import subprocess
    import tempfile
    from pathlib import Path
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import boto3
    for _ in range(400):
        try:
            boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
            break
        except Exception:  # still starting
            time.sleep(0.05)
    from convert.publish_remote import publish_remote
    staging = Path(tempfile.mkdtemp(prefix="loader_fps-publish-"))
    (staging / "shards").symlink_to(args.shards_dir.resolve())
    publish_remote(staging, "s3://bench/data")
    (staging / "shards").unlink()
    staging.rmdir()
    args.bucket_url, args.cache_root = "s3://bench/data", Path(tempfile.mkdtemp(prefix="loader_fps-cache-"))
    args.split_bytes = sum(t.stat().st_size for t in args.shards_dir.glob(f"{args.split}-*.tar"))
    args.shard_count = len(list(args.shards_dir.glob(f"{args.split}-*.tar")))
    from core.shards import Shards
    args.images = Shards(args.shards_dir, sorted(args.shards_dir.glob(f"{args.split}-*.tar")), []).count()
    return server


def _bucket_loader(args, cache_dir, bound: int, shuffle="global", window=8):
    import torch
    from loaders import build_loader
    from storage.cache import attach
    data = attach(args.bucket_url, cache_dir, bound)
    return build_loader("torchvision", split=args.split, data=data, batch_size=args.batch_size, workers=args.workers,
                        image_size=args.image_size, seed=args.seed, device=torch.device(args.device),
                        options={"source": "shards", "decode": "cpu"}, shuffle=shuffle, shuffle_window=window)


def build_bucket(args, mode: str):
    """warm: a cache that holds the split (its lead-in epochs fill it); small: a bound of
    --bucket-cache-fraction of the split, --shuffle shards with windows sized to what the cache holds
    beyond the readers' batches in flight; cold: see BucketCold. Each epoch also returns the bytes the node's fetcher
    fetched during it and the cache hits and misses of its reads."""
    import torch
    from storage.cache import hit_counts
    from storage.layout import cache_key, read_json
    device = torch.device(args.device)
    cache_dir = args.cache_root / f"{mode}-{os.getpid()}"
    headroom = 1 << 20  # the index files
    if mode == "small":
        bound = int(args.bucket_cache_fraction * args.split_bytes) + headroom
        # the cache must hold what the readers have in flight (2 batches per worker and the one
        # being consumed) plus two windows; the windows get what is left
        per_shard = max(1, args.images // args.shard_count)
        in_flight = -(-(2 * args.workers + 1) * args.batch_size // per_shard) + 1
        window = max(1, (int(args.bucket_cache_fraction * args.shard_count) - in_flight) // 2)
        loader = _bucket_loader(args, cache_dir, bound, "shards", window)
    else:
        loader = _bucket_loader(args, cache_dir, 2 * args.split_bytes + headroom)
        loader.set_epoch(10_000)  # warm: the split in the cache before any epoch is timed, lead-in or not
        _consume(loader, device)
    root = cache_dir / cache_key(args.bucket_url)

    def run_epoch(epoch):
        before, hits_before = (read_json(root / "stats.json") or {}).get("bytes_fetched", 0), hit_counts(root)
        loader.set_epoch(epoch)
        images = _consume(loader, device)[0]
        after, hits = (read_json(root / "stats.json") or {}).get("bytes_fetched", 0), hit_counts(root)
        return images, loader.first_batch_s, {"bytes_fetched": after - before, "cache_hits": hits[0] - hits_before[0],
                                              "cache_misses": hits[1] - hits_before[1]}
    return run_epoch


class BucketCold(Pipeline):
    """Each timed epoch from an empty cache: a new cache folder, its fetcher and the loader are made
    (untimed, as every row's loader is built outside its time), then the epoch is timed."""

    def build(self):
        self.epoch = 0

    def lead_in(self):
        pass

    def warm_up(self):
        return self.run()

    def run(self):
        import shutil
        args = self.args
        cache_dir = args.cache_root / f"cold-{os.getpid()}-{self.epoch}"
        self.run_epoch = build_bucket_cold(args, cache_dir)
        try:
            return super().run()
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)


def build_bucket_cold(args, cache_dir):
    import torch
    from storage.cache import hit_counts
    from storage.layout import cache_key, read_json
    loader = _bucket_loader(args, cache_dir, 2 * args.split_bytes + (1 << 20))
    root, device = cache_dir / cache_key(args.bucket_url), torch.device(args.device)

    def run_epoch(epoch):
        loader.set_epoch(epoch)
        images = _consume(loader, device)[0]
        hits = hit_counts(root)
        return images, loader.first_batch_s, {"bytes_fetched": (read_json(root / "stats.json") or {}).get(
            "bytes_fetched", 0), "cache_hits": hits[0], "cache_misses": hits[1]}
    return run_epoch


# --- the decode limit ------------------------------------------------------------------------------

_BLOBS = []  # (uint8 array, (height, width) or None for an encoded image); inherited by forked workers


def beton_blobs(path) -> list:
    """Every stored image of a .beton as FFCV stores it: JPEG bytes, or raw pixels (raw/smart modes)."""
    import numpy as np
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader
    reader = Reader(str(path))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    raw = np.memmap(str(path), dtype=np.uint8, mode="r")
    out = []
    for field in reader.metadata[f"f{reader.field_names.index('image')}"]:
        ptr = int(field["data_ptr"])
        jpg = field["mode"] == IMAGE_MODES["jpg"]
        out.append((np.array(raw[ptr:ptr + sizes[ptr]]), None if jpg else (int(field["height"]), int(field["width"]))))
    return out


def blobs(source: str, args) -> list:
    import numpy as np
    if source.startswith(".beton"):
        return beton_blobs(args.beton_dir / f"{args.split}.beton")
    if source == "shard JPEGs":
        return [(np.frombuffer(read_bytes(tar, offset, size), np.uint8).copy(), None)
                for tar, offset, size, _ in shard_members(args.shards_dir, args.split)]
    from core.dataset import split_index
    return [(np.fromfile(p, np.uint8), None) for p in split_index(args.data, args.split).paths]


def _decode_range(bounds) -> int:
    import torch
    from torchvision.io import ImageReadMode, decode_image
    for data, shape in _BLOBS[bounds[0]:bounds[1]]:
        if shape is None:
            decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB)
        else:  # a raw image: FFCV copies it, so the limit is a copy
            data.reshape(*shape, 3).copy()
    return bounds[1] - bounds[0]


def build_limit(args, source: str):
    """Decode only, libjpeg-turbo (torchvision.io) in a process pool over all cores."""
    import torch
    global _BLOBS
    _BLOBS = blobs(source, args)
    workers = cores()
    pool = mp.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,))  # parallel: processes
    n = len(_BLOBS)
    step = max(1, -(-n // (8 * workers)))  # 8 chunks per process: balanced, few round trips
    chunks = [(i, min(n, i + step)) for i in range(0, n, step)]
    return lambda epoch: (sum(pool.map(_decode_range, chunks)), None)


# --- numbers and output ----------------------------------------------------------------------------

COLUMNS = [("pipeline", "name", ""), ("img/s", "imgs_per_s", ".0f"), ("min", "imgs_per_s_min", ".0f"),
           ("max", "imgs_per_s_max", ".0f"), ("x stock", "x_stock", ".2f"), ("of bare", "of_bare", ".2f"),
           ("of limit", "of_limit", ".2f"), ("cores", "cores_used", ".2f"), ("img/s/core", "imgs_per_core_s", ".0f"),
           ("/core x limit", "per_core_x_limit", ".1f"), ("1st x fresh", "first_batch_x_fresh", ".2f"), ("CPU %", "cpu_util_pct", ".0f"), ("RSS MB", "peak_rss_mb", ".0f"),
           ("PSS MB", "peak_pss_mb", ".0f"), ("1st batch cold s", "first_batch_s_cold", ".2f"),
           ("warm s", "first_batch_s_warm", ".3f"), ("x local", "x_local", ".2f"),
           ("fetched x split", "fetched_x_split", ".2f"), ("hits", "cache_hit_frac", ".2f")]


def summarize(rows: list[Pipeline], results: dict, args) -> list[dict]:
    out = []
    for row in rows:
        result, own = results[row.name], stats(results[row.name])
        limit = result if row.kind == "limit" else results[f"decode limit: {limit_source(row.library, args)}"]
        bare = paired(result, results[f"{row.library} bare"]) if row.kind == "ours" else {}
        out.append({"name": row.name, "library": row.library, "kind": row.kind,
                    "images_per_epoch": sum(r["images"] for r in result["runs"]) // len(result["runs"]),
                    **own, "x_stock": paired(result, results["stock"])["median"],
                    "of_bare": bare.get("median"), "of_bare_min": bare.get("min"), "of_bare_max": bare.get("max"),
                    "of_limit": paired(result, limit)["median"] if row.kind in ("ours", "stock", "bare") else None,
                    # the host part's img/s per core over decoding's, same run: images handed over per one decoded
                    "per_core_x_limit": (own["imgs_per_core_s"] / stats(limit)["imgs_per_core_s"]
                                         if row.kind == "host part" else None),
                    # a restarted run's first batch (a new loader: workers, JIT) against a fresh one's
                    "first_batch_x_fresh": (own["first_batch_s_cold"] / stats(results[row.library])["first_batch_s_cold"]
                                            if row.kind == "resumed" else None),
                    **(bucket_numbers(result, results, args) if row.kind == "bucket" else {})})
    return out


def bucket_numbers(result: dict, results: dict, args) -> dict:
    """A bucket row against the local shards' torchvision row (same round), and what it fetched."""
    runs = result["runs"]
    return {"x_local": paired(result, results["torchvision"])["median"],
            "fetched_x_split": statistics.median(r["bytes_fetched"] for r in runs) / args.split_bytes,
            "cache_hit_frac": statistics.median(r["cache_hits"] / max(1, r["cache_hits"] + r["cache_misses"])
                                                for r in runs),
            "split_mb": args.split_bytes / 1e6, "shards": args.shard_count}


def bar(r: dict) -> tuple:
    note = [f"{r['x_stock']:.2f}x stock"] if r["kind"] != "stock" else []
    if r["of_bare"] is not None:
        note.append(f"{r['of_bare']:.0%} of bare")
    if r["of_limit"] is not None and r["kind"] in ("ours", "stock"):
        note.append(f"{r['of_limit']:.0%} of limit")
    return (r["name"], r["imgs_per_s"], r["imgs_per_s_min"], r["imgs_per_s_max"], COLORS.get(r["library"], "#bbbbbb"),
            ", ".join(note))


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.loaders = [s.strip() for s in args.loaders.split(",") if s.strip()]
    unknown = [s for s in args.loaders if s not in LOADER_NAMES]
    if unknown or not args.loaders:
        raise ConfigError(f"--loaders {','.join(unknown) or '(empty)'}: choose from {','.join(LOADER_NAMES)}")
    if args.device_decode is None:
        args.device_decode = args.device != "cpu"
    if args.epochs < 1 or args.warmup_epochs < 0 or args.lead_in < 0 or args.batch_size < 1 or args.workers < 1:
        raise ConfigError("--epochs, --batch-size and --workers must be >= 1, --warmup-epochs and --lead-in >= 0")
    import torch, torchvision  # noqa: F401,E401  (imported once here, not in every forked row)
    prepare(args)
    if args.bucket and "torchvision" not in args.loaders:
        raise ConfigError("--bucket compares against the torchvision row: keep torchvision in --loaders")
    server = start_bucket(args) if args.bucket else None
    rows = plan_rows(args)
    report = Report("loader_fps", argv)
    try:
        results = measure([Forked(r) for r in rows], rounds=args.epochs, warmups=args.warmup_epochs, who="loader_fps")
    finally:
        if server is not None:
            import shutil
            server.terminate()
            shutil.rmtree(args.cache_root, ignore_errors=True)  # the rows' caches (their fetchers end when idle)
    out = summarize(rows, results, args)
    setting = (f"{args.split}, batch {args.batch_size}, {args.workers} workers, {args.image_size} px, "
               f"stored at {args.max_res_px} px {args.write_mode}, {out[0]['images_per_epoch']} images/epoch, "
               f"{args.epochs} epochs")
    settings = {"data": str(args.data), "split": args.split, "batch_size": args.batch_size, "workers": args.workers,
                "image_size_px": args.image_size, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
                "lead_in_epochs": args.lead_in, "max_res_px": args.max_res_px, "write_mode": args.write_mode,
                "jpeg_quality": JPEG_QUALITY, "device": args.device, "reads": args.reads,
                "device_decode_workers": args.device_decode_workers if args.device_decode else None,
                "beton_dir": str(args.beton_dir), "shards_dir": str(args.shards_dir),
                "bucket": {"url": args.bucket_url, "server": "moto on 127.0.0.1", "split_bytes": args.split_bytes,
                           "shards": args.shard_count, "small_cache_fraction": args.bucket_cache_fraction}
                if args.bucket else None,
                "storage": storage(args)}
    stock = next(r["imgs_per_s"] for r in out if r["kind"] == "stock")
    return report.write(args, setting, settings, out, COLUMNS, [bar(r) for r in out],
                        "images/s (median, min-max whiskers)", reference=(stock, "stock"),
                        modules=("torchvision", "torchcodec", "ffcv", "nvidia.dali", "numpy"))


if __name__ == "__main__":
    run_command(main)
