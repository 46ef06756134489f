"""Loader throughput side by side: our loaders, the stock pipeline, each library's bare pipeline,
and the decode limit of the bytes each one reads; images/s, CPU, memory, time to the first batch.

    python bench/loader_fps.py [--data DIR] [--loaders ffcv,dali,torchvision] [--split train|val]
                               [--batch-size 64] [--workers N] [--image-size 224] [--epochs 6] [--lead-in 1]
                               [--max-resolution 512] [--write-mode jpg] [--json PATH] [--png PATH]

With no --data it uses the built-in sample dataset. What the loaders need is converted once with
the converter's defaults into DATA/ffcv and DATA/shards; another --max-resolution or --write-mode
goes into its own folder (DATA/ffcv-256px-raw, DATA/shards-256px), so the defaults stay untouched.

Rows, each in its own process (so CPU time and peak memory are its own):
  stock        torchvision's reference recipe: ImageFolder + PIL + RandomResizedCrop + flip +
               PILToTensor + ToDtype + Normalize, DataLoader (references/classification/presets.py)
  ffcv | dali | torchvision            our loaders (loaders/), through build_loader
  ffcv bare | dali bare | torchvision bare
               the library used minimally, as its documentation shows, on the same bytes as our
               loader: FFCV's Loader; a DALI CPU pipeline on fn.readers.webdataset
               (fn.readers.file on the folder); torchvision.io.decode_image + transforms v2 +
               DataLoader over ImageFolder, or over the shards by their index offsets
  decode limit: <bytes>
               decode only, libjpeg-turbo (torchvision.io.decode_jpeg) in a process pool over all
               cores, of the very bytes a loader reads: the .beton's JPEGs (FFCV), the shards'
               JPEGs (DALI; torchvision when shards exist), the original files (stock)
Timing: one warm-up epoch per row (numba JIT, worker start: its first batch is the cold
`first_batch_s`), then --epochs epochs per row, interleaved row by row so that load from other
processes hits every row alike. Each timed epoch comes right after --lead-in untimed epochs of
the same row: a loader that works ahead (our DALI stream decodes the next epoch's first batches
as soon as its queue has room) would otherwise do that work while another row is being timed,
for free (measured: 1.80x its bare pipeline on the sample's 6-batch epochs without the lead-in,
1.39x with it). Each epoch is timed whole, from iter() to the last batch (on an accelerator with
a synchronize at both edges). Ratios ("x stock", "of bare", "of limit") are medians of
per-epoch ratios within the same round.
"""
import argparse
import multiprocessing as mp
import os
import sys
import time
import traceback
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (RESULTS_DIR, PeakRSS, Window, bar_chart, cores, environment, load_average,  # noqa: E402
                          spread, table, versions, write_json)
from convert.scan import JPEG_QUALITY, MAX_RES_PX  # noqa: E402

LOADER_NAMES = ("ffcv", "dali", "torchvision")
WRITE_MODES = ("jpg", "raw", "smart", "proportion")
COLORS = {"stock": "#7f7f7f", "ffcv": "#1f77b4", "dali": "#2ca02c", "torchvision": "#d62728"}
# Targets from issue 8 (2 cores, sample dataset at the converter's defaults).
TARGET_VS_STOCK = {"ffcv": 4.0, "dali": 1.2, "torchvision": 1.3}
TARGET_OF_BARE = 0.95
TARGET_FFCV_OF_LIMIT = 0.70
EPOCH_TIMEOUT_S = 1800


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
    p.add_argument("--seed", type=int, default=0, help="shuffling and augmentation seed")
    p.add_argument("--json", default=str(RESULTS_DIR / "loader_fps.json"), help="results as JSON")
    p.add_argument("--png", default=None, help="bar chart (default: the --json path with .png)")
    return p


# --- what each row reads ---------------------------------------------------------------------------

def prepare(args) -> dict:
    """Dataset folder and converted folders; convert what is missing."""
    from convert.make_sample import ensure_sample
    data = ensure_sample(args.data, "loader_fps")
    if not (data / args.split).is_dir():
        raise SystemExit(f"--data {data}: no {args.split}/ folder (expected {data}/{args.split}/<class>/<image>)")
    default_ffcv = args.max_res_px == MAX_RES_PX and args.write_mode == "jpg"
    beton_dir = data / ("ffcv" if default_ffcv else f"ffcv-{args.max_res_px}px-{args.write_mode}")
    shards_dir = data / ("shards" if args.max_res_px == MAX_RES_PX else f"shards-{args.max_res_px}px")
    if "ffcv" in args.loaders and not ((beton_dir / f"{args.split}.beton").exists()
                                       and (beton_dir / "classes.json").exists()):
        from convert.to_ffcv import convert
        print(f"loader_fps: converting {data}/{args.split} into {beton_dir}", file=sys.stderr)
        convert(data, beton_dir, splits=(args.split,), max_res_px=args.max_res_px, write_mode=args.write_mode,
                progress=False)
    sources = {"dali": args.dali_source, "torchvision": args.torchvision_source}
    wanted = [lib for lib, source in sources.items() if lib in args.loaders
              and (source == "shards" or source == "auto" and lib == "dali")]
    if wanted and not list(shards_dir.glob(f"{args.split}-*.idx")):
        from convert.to_shards import convert
        print(f"loader_fps: writing shards of {data}/{args.split} into {shards_dir}", file=sys.stderr)
        convert(data, shards_dir, splits=(args.split,), max_res_px=args.max_res_px, progress=False)
    have_shards = bool(list(shards_dir.glob(f"{args.split}-*.idx")))
    # what each row reads: the loaders' own rule (auto = shards when present)
    reads = {"ffcv": "beton", "stock": "folder",
             **{lib: "shards" if source != "folder" and have_shards else "folder" for lib, source in sources.items()}}
    return {"data": data, "beton_dir": beton_dir, "shards_dir": shards_dir, "reads": reads}


def limit_source(library: str, args) -> str:
    """Which bytes a row reads, named as its decode-limit row is."""
    reads = args.reads[library]
    if reads == "beton":
        return ".beton JPEGs" if args.write_mode == "jpg" else f".beton images ({args.write_mode})"
    return "shard JPEGs" if reads == "shards" else "original files"


def plan_rows(args) -> list[dict]:
    rows = [dict(name="stock", library="stock", kind="stock")]
    for lib in args.loaders:
        rows += [dict(name=lib, library=lib, kind="ours"), dict(name=f"{lib} bare", library=lib, kind="bare")]
    sources = []
    for lib in [*args.loaders, "stock"]:
        if limit_source(lib, args) not in sources:
            sources.append(limit_source(lib, args))
    rows += [dict(name=f"decode limit: {s}", library="limit", kind="limit", source=s) for s in sources]
    return rows


# --- the rows' pipelines (built inside each row's process) -----------------------------------------
# Each builder returns run_epoch(epoch) -> (images, first_batch_s).

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


def build_ours(row, args, paths):
    import torch
    from loaders import build_loader
    device = torch.device(args.device)
    options = {"ffcv": {"beton_dir": str(paths["beton_dir"])},
               "dali": {"shards_dir": str(paths["shards_dir"]), "source": args.dali_source},
               "torchvision": {"shards_dir": str(paths["shards_dir"]), "source": args.torchvision_source},
               }[row["library"]]
    loader = build_loader(row["library"], split=args.split, data=paths["data"], batch_size=args.batch_size,
                          workers=args.workers, image_size=args.image_size, seed=args.seed, device=device,
                          options=options)

    def run_epoch(epoch):
        loader.set_epoch(epoch)
        n, _ = _consume(loader, device)
        return n, loader.first_batch_s
    return run_epoch


def build_stock(row, args, paths):
    """torchvision's references/classification recipe (PIL backend), as train.py there builds it."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
    from torchvision import datasets, transforms
    from torchvision.transforms import InterpolationMode
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    size = args.image_size
    if args.split == "train":
        geometry = [transforms.RandomResizedCrop(size, interpolation=InterpolationMode.BILINEAR, antialias=True),
                    transforms.RandomHorizontalFlip(0.5)]
    else:
        geometry = [transforms.Resize(int(size / 0.875), interpolation=InterpolationMode.BILINEAR, antialias=True),
                    transforms.CenterCrop(size)]
    dataset = datasets.ImageFolder(str(paths["data"] / args.split), transforms.Compose(
        geometry + [transforms.PILToTensor(), transforms.ConvertImageDtype(torch.float),
                    transforms.Normalize(mean, std)]))
    device = torch.device(args.device)
    sampler = RandomSampler(dataset) if args.split == "train" else SequentialSampler(dataset)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type != "cpu")
    return lambda epoch: _consume(loader, device)


def build_ffcv_bare(row, args, paths):
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
    loader = Loader(str(paths["beton_dir"] / f"{args.split}.beton"), batch_size=args.batch_size,
                    num_workers=args.workers, os_cache=True, drop_last=args.split == "train",
                    order=OrderOption.RANDOM if args.split == "train" else OrderOption.SEQUENTIAL,
                    pipelines={"image": image + [ToTensor(), *to_device, ToTorchImage()],
                               "label": [IntDecoder(), ToTensor(), Squeeze(), *to_device]})
    return lambda epoch: _consume(loader, device)


def build_dali_bare(row, args, paths):
    """A DALI CPU pipeline as DALI's examples write it; built once, reset between epochs."""
    import torch
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    train, size = args.split == "train", args.image_size
    tars = sorted(paths["shards_dir"].glob(f"{args.split}-*.tar")) if paths["reads"]["dali"] == "shards" else []

    @pipeline_def(batch_size=args.batch_size, num_threads=args.workers, device_id=None)
    def pipe():
        if tars:
            jpegs, labels = fn.readers.webdataset(paths=[str(t) for t in tars],
                                                  index_paths=[str(t.with_suffix(".idx")) for t in tars],
                                                  ext=["jpg", "cls"], random_shuffle=train, name="Reader")
            labels = fn.pad(labels, axes=(0,), shape=(8,))  # ASCII digits, padded to one shape per batch
        else:
            jpegs, labels = fn.readers.file(file_root=str(paths["data"] / args.split), random_shuffle=train,
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
    started = [False]

    def run_epoch(epoch):
        if started[0]:
            iterator.reset()
        started[0] = True
        return _consume(((b[0]["images"], b[0]["labels"]) for b in iterator), device)
    return run_epoch


class ShardJPEGs:
    """Map-style dataset over the shards, as small as it gets: the .idx files say where each JPEG and
    label sit in the tars; open, seek, read, decode."""

    def __init__(self, shards_dir: Path, split: str, transform):
        import numpy as np
        self.transform, self.items = transform, []
        for tar, rows in shard_samples(shards_dir, split):
            with open(tar, "rb") as f:
                for jpg_offset, jpg_size, cls_offset, cls_size in rows:
                    f.seek(cls_offset)
                    self.items.append((tar, jpg_offset, jpg_size, int(f.read(cls_size))))
        self.labels = np.array([item[-1] for item in self.items])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch
        from torchvision.io import decode_jpeg
        tar, offset, size, label = self.items[i]
        with open(tar, "rb") as f:
            f.seek(offset)
            data = torch.frombuffer(bytearray(f.read(size)), dtype=torch.uint8)
        return self.transform(decode_jpeg(data)), label


def build_torchvision_bare(row, args, paths):
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
    if paths["reads"]["torchvision"] == "shards":
        dataset = ShardJPEGs(paths["shards_dir"], args.split, transform)
    else:
        dataset = datasets.ImageFolder(str(paths["data"] / args.split), transform=transform,
                                       loader=partial(decode_image, mode=ImageReadMode.RGB))
    device = torch.device(args.device)
    # persistent_workers as our loader has them: the bare row pays no more worker start-ups than ours.
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=args.split == "train",
                        num_workers=args.workers, drop_last=args.split == "train",
                        persistent_workers=args.workers > 0, pin_memory=device.type != "cpu")
    return lambda epoch: _consume(loader, device)


# --- the decode limit ------------------------------------------------------------------------------

_BLOBS = []  # (uint8 array, height, width or None for an encoded image); inherited by forked workers


def beton_blobs(path: Path) -> list:
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
        data = np.array(raw[ptr:ptr + sizes[ptr]])
        jpg = field["mode"] == IMAGE_MODES["jpg"]
        out.append((data, None if jpg else (int(field["height"]), int(field["width"]))))
    return out


def shard_samples(shards_dir: Path, split: str) -> list:
    """[(tar path, rows of its samples: jpg offset, jpg size, cls offset, cls size)], read from the
    DALI index files the way the loaders read them (loaders.shards)."""
    from loaders.shards import Shards
    shards = Shards(shards_dir, sorted(shards_dir.glob(f"{split}-*.tar")), classes=[])
    rows = shards.samples()
    return [(str(tar), rows[rows[:, 0] == t, 1:].tolist()) for t, tar in enumerate(shards.tars)]


def shard_blobs(shards_dir: Path, split: str) -> list:
    """The .jpg members of the shards, as the readers find them."""
    import numpy as np
    out = []
    for tar, rows in shard_samples(shards_dir, split):
        with open(tar, "rb") as f:
            for jpg_offset, jpg_size, _, _ in rows:
                f.seek(jpg_offset)
                out.append((np.frombuffer(f.read(jpg_size), np.uint8).copy(), None))
    return out


def file_blobs(data: Path, split: str) -> list:
    import numpy as np
    from loaders.dataset_index import split_index
    return [(np.fromfile(p, np.uint8), None) for p in split_index(data, split).paths]


def _decoder_setup():
    import torch
    torch.set_num_threads(1)  # the parallelism is the processes


def _decode_range(bounds) -> int:
    import torch
    from torchvision.io import ImageReadMode, decode_image
    for data, shape in _BLOBS[bounds[0]:bounds[1]]:
        if shape is None:
            decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB)
        else:  # a raw image: FFCV copies it, so the limit is a copy
            data.reshape(*shape, 3).copy()
    return bounds[1] - bounds[0]


def build_limit(row, args, paths):
    global _BLOBS
    source = row["source"]
    if source.startswith(".beton"):
        _BLOBS = beton_blobs(paths["beton_dir"] / f"{args.split}.beton")
    elif source == "shard JPEGs":
        _BLOBS = shard_blobs(paths["shards_dir"], args.split)
    else:
        _BLOBS = file_blobs(paths["data"], args.split)
    workers = cores()
    pool = mp.get_context("fork").Pool(workers, initializer=_decoder_setup)
    n = len(_BLOBS)
    step = max(1, -(-n // (8 * workers)))  # 8 chunks per process: balanced, few round trips
    chunks = [(i, min(n, i + step)) for i in range(0, n, step)]

    def run_epoch(epoch):
        return sum(pool.map(_decode_range, chunks)), None
    return run_epoch


BUILDERS = {"ours": build_ours, "stock": build_stock, "limit": build_limit,
            ("bare", "ffcv"): build_ffcv_bare, ("bare", "dali"): build_dali_bare,
            ("bare", "torchvision"): build_torchvision_bare}


# --- one process per row, driven epoch by epoch from the parent -----------------------------------

def _host(row, args, paths, conn):
    try:
        with PeakRSS(interval_s=0.1, pss_every=20) as rss:
            start_s = time.perf_counter()
            key = (row["kind"], row["library"]) if row["kind"] == "bare" else row["kind"]
            run_epoch = BUILDERS[key](row, args, paths)
            conn.send(("ready", time.perf_counter() - start_s))
            epoch = 0  # consecutive epoch numbers, lead-ins included, as a training run would see them
            while True:
                command, lead_in = conn.recv()
                if command == "stop":
                    break
                for _ in range(lead_in):
                    run_epoch(epoch)
                    epoch += 1
                with Window() as w:  # _consume synchronizes the device before returning
                    images, first_batch_s = run_epoch(epoch)
                epoch += 1
                conn.send(("epoch", {"images": images, "wall_s": w.wall_s, "cpu_s": w.cpu_s,
                                     "first_batch_s": first_batch_s}))
        conn.send(("done", {"peak_rss_mb": rss.peak_rss_mb, "peak_pss_mb": rss.peak_pss_mb}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
        os._exit(0)  # skip atexit handlers of libraries that may wait on their pools


class Host:
    def __init__(self, row, args, paths):
        self.row = row
        self.conn, child = mp.get_context("fork").Pipe()
        self.process = mp.get_context("fork").Process(target=_host, args=(row, args, paths, child), daemon=False)
        self.process.start()
        self.build_s = None

    def wait_ready(self):
        self.build_s = self._receive("ready")

    def _receive(self, expected):
        if not self.conn.poll(EPOCH_TIMEOUT_S):
            self.process.kill()
            raise SystemExit(f"loader_fps: row {self.row['name']!r} gave no answer in {EPOCH_TIMEOUT_S} s")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise SystemExit(f"loader_fps: row {self.row['name']!r} died (exit code {self.process.exitcode})") from None
        if kind == "error":
            raise SystemExit(f"loader_fps: row {self.row['name']!r} failed:\n{payload}")
        assert kind == expected, (kind, expected)
        return payload

    def epoch(self, lead_in: int) -> dict:
        """Run `lead_in` untimed epochs, then time one."""
        self.conn.send(("epoch", lead_in))
        return self._receive("epoch")

    def stop(self) -> dict:
        self.conn.send(("stop", None))
        memory = self._receive("done")
        self.process.join(60)
        return memory


def measure(rows, args, paths) -> list[dict]:
    """Warm-up epochs then timed epochs, interleaved row by row; the order rotates every round."""
    hosts = []
    try:
        print(f"loader_fps: building {len(rows)} rows: {', '.join(r['name'] for r in rows)}", file=sys.stderr,
              flush=True)
        for row in rows:  # built side by side: building is not timed
            hosts.append(Host(row, args, paths))
        for host in hosts:
            host.wait_ready()
        for row in rows:
            row.update(build_s=None, warmup=[], epochs=[])
        for r in range(args.warmup_epochs + args.epochs):
            timed = r >= args.warmup_epochs
            print(f"loader_fps: {'epoch' if timed else 'warm-up epoch'} {r + 1}/{args.warmup_epochs + args.epochs}",
                  file=sys.stderr, flush=True)
            for k in range(len(hosts)):
                host = hosts[(k + r) % len(hosts)]
                result = host.epoch(args.lead_in if timed else 0)
                (host.row["epochs"] if timed else host.row["warmup"]).append(result)
        for host in hosts:
            host.row.update(host.stop(), build_s=host.build_s)
    finally:
        for host in hosts:
            if host.process.is_alive():
                host.process.kill()
    return rows


# --- numbers, table, JSON, PNG --------------------------------------------------------------------

def _paired_ratio(row, ref) -> dict:
    """Median (min-max) over rounds of row's images/s divided by ref's in the same round."""
    return spread([(a["images"] / a["wall_s"]) / (b["images"] / b["wall_s"])
                   for a, b in zip(row["epochs"], ref["epochs"])])


def summarize(rows, args, usable_cores) -> tuple[list[dict], list[dict]]:
    by_name = {row["name"]: row for row in rows}
    stock = by_name["stock"]
    out = []
    for row in rows:
        epochs = row["epochs"]
        fps = spread([e["images"] / e["wall_s"] for e in epochs])
        wall_s = sum(e["wall_s"] for e in epochs)
        cpu_s = sum(e["cpu_s"] for e in epochs)
        images = sum(e["images"] for e in epochs)
        limit = row if row["kind"] == "limit" else by_name[f"decode limit: {limit_source(row['library'], args)}"]
        bare = _paired_ratio(row, by_name[f"{row['library']} bare"]) if row["kind"] == "ours" else None
        warm_first = [e["first_batch_s"] for e in epochs if e["first_batch_s"] is not None]
        out.append({
            "name": row["name"], "library": row["library"], "kind": row["kind"],
            "images_per_epoch": images // len(epochs),
            "imgs_per_s": fps["median"], "imgs_per_s_min": fps["min"], "imgs_per_s_max": fps["max"],
            "imgs_per_s_epochs": [round(v, 1) for v in fps["values"]],
            "x_stock": _paired_ratio(row, stock)["median"],
            "of_bare": bare and bare["median"], "of_bare_min": bare and bare["min"],
            "of_bare_max": bare and bare["max"],
            "of_limit": _paired_ratio(row, limit)["median"] if row["kind"] != "limit" else None,
            "cores_used": cpu_s / wall_s,
            "cpu_util_pct": 100 * cpu_s / wall_s / usable_cores,
            "imgs_per_core_s": images / cpu_s if cpu_s > 0 else None,
            "peak_rss_mb": row["peak_rss_mb"], "peak_pss_mb": row["peak_pss_mb"],
            "first_batch_s_cold": row["warmup"][0]["first_batch_s"] if row["warmup"] else None,
            "first_batch_s_warm": spread(warm_first)["median"] if warm_first else None,
            "build_s": row["build_s"],
        })
    return out, targets(out, args)


def targets(out, args) -> list[dict]:
    by_name = {r["name"]: r for r in out}
    checks = []
    for lib in args.loaders:
        ours = by_name[lib]
        checks.append({"target": f"{lib} >= {TARGET_VS_STOCK[lib]}x stock", "measured": ours["x_stock"],
                       "unit": "x", "met": ours["x_stock"] >= TARGET_VS_STOCK[lib]})
        checks.append({"target": f"{lib} within 5% of {lib} bare", "measured": ours["of_bare"],
                       "unit": "of bare", "met": ours["of_bare"] >= TARGET_OF_BARE})
    if "ffcv" in args.loaders:
        ffcv = by_name["ffcv"]
        checks.append({"target": f"ffcv >= {TARGET_FFCV_OF_LIMIT:.0%} of its decode limit",
                       "measured": ffcv["of_limit"], "unit": "of limit",
                       "met": ffcv["of_limit"] >= TARGET_FFCV_OF_LIMIT})
    return checks


COLUMNS = [("pipeline", "name", ""), ("img/s", "imgs_per_s", ".0f"), ("min", "imgs_per_s_min", ".0f"),
           ("max", "imgs_per_s_max", ".0f"), ("x stock", "x_stock", ".2f"), ("of bare", "of_bare", ".2f"),
           ("of limit", "of_limit", ".2f"), ("cores", "cores_used", ".2f"), ("img/s/core", "imgs_per_core_s", ".0f"),
           ("CPU %", "cpu_util_pct", ".0f"), ("RSS MB", "peak_rss_mb", ".0f"), ("PSS MB", "peak_pss_mb", ".0f"),
           ("1st batch cold s", "first_batch_s_cold", ".2f"), ("warm s", "first_batch_s_warm", ".3f")]


def plot(path, out, title):
    labels, notes = [], []
    for r in out:
        labels.append(r["name"])
        note = [f"{r['x_stock']:.2f}x stock"] if r["kind"] != "stock" else []
        if r["of_bare"] is not None:
            note.append(f"{r['of_bare']:.0%} of bare")
        if r["of_limit"] is not None and r["kind"] in ("ours", "stock"):
            note.append(f"{r['of_limit']:.0%} of limit")
        notes.append(", ".join(note))
    colors = [COLORS.get(r["library"], "#bbbbbb") for r in out]
    stock = next(r["imgs_per_s"] for r in out if r["kind"] == "stock")
    return bar_chart(path, labels, [r["imgs_per_s"] for r in out], [r["imgs_per_s_min"] for r in out],
                     [r["imgs_per_s_max"] for r in out], colors, title, "images/s (median, min-max whiskers)",
                     notes=notes, reference=stock, reference_label="stock")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.loaders = [s.strip() for s in args.loaders.split(",") if s.strip()]
    unknown = [s for s in args.loaders if s not in LOADER_NAMES]
    if unknown or not args.loaders:
        raise SystemExit(f"--loaders {','.join(unknown) or '(empty)'}: choose from {','.join(LOADER_NAMES)}")
    if args.epochs < 1 or args.warmup_epochs < 0 or args.lead_in < 0 or args.batch_size < 1 or args.workers < 1:
        raise SystemExit("--epochs, --batch-size and --workers must be >= 1, --warmup-epochs and --lead-in >= 0")
    import torch, torchvision  # noqa: F401,E401  (imported once here: the forked rows start without importing them)
    paths = prepare(args)
    args.reads = paths["reads"]
    rows = plan_rows(args)
    load_before = load_average()
    start_s = time.perf_counter()
    measure(rows, args, paths)
    out, checks = summarize(rows, args, cores())
    load_after = load_average()
    setting = (f"{args.split}, batch {args.batch_size}, {args.workers} workers, {args.image_size} px, "
               f"stored at {args.max_res_px} px {args.write_mode}, {out[0]['images_per_epoch']} images/epoch, "
               f"{args.epochs} epochs")
    print(f"\nloader_fps: {setting}; load average {load_before} before, {load_after} after")
    print(table(out, COLUMNS))
    print()
    for c in checks:
        print(f"{'MET ' if c['met'] else 'MISS'}  {c['target']}: {c['measured']:.2f} {c['unit']}")
    result = {
        "benchmark": "loader_fps", "command": " ".join(["python bench/loader_fps.py", *map(str, argv or sys.argv[1:])]),
        "settings": {"data": str(paths["data"]), "split": args.split, "batch_size": args.batch_size,
                     "workers": args.workers, "image_size_px": args.image_size, "epochs": args.epochs,
                     "warmup_epochs": args.warmup_epochs, "lead_in_epochs": args.lead_in, "max_res_px": args.max_res_px,
                     "write_mode": args.write_mode, "jpeg_quality": JPEG_QUALITY, "device": args.device,
                     "reads": args.reads,
                     "beton_dir": str(paths["beton_dir"]), "shards_dir": str(paths["shards_dir"])},
        "load_average_before": load_before, "load_average_after": load_after,
        "wall_s": round(time.perf_counter() - start_s, 1),
        "environment": environment(), "versions": versions("torchvision", "ffcv", "nvidia.dali", "numpy"),
        "rows": out, "targets": checks,
    }
    json_path = write_json(result, args.json)
    png_path = plot(args.png or Path(args.json).with_suffix(".png"), out, f"loader_fps: {setting}")
    print(f"\nwrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
