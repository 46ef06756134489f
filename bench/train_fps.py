"""Training throughput: the model alone on a batch resident on the device, against end to end with
each loader; input stall = 1 - end-to-end / model-only. Runs on the CPU and unchanged on CUDA.

    python bench/train_fps.py [--data DIR] [--arch NAME] [--loaders ffcv,dali,torchvision]
                              [--image-size PX] [--batch-size N] [--workers N] [--steps N]
                              [--amp] [--amp-dtype bfloat16|float16] [--no-channels-last] [--compile]
                              [--dali-decode cpu|mixed] [--device auto|cpu|cuda] [--json PATH] [--png PATH]
    # the accelerator run of issue 8:
    python bench/train_fps.py --device cuda --arch mobilenetv3_large_100 --image-size 224 --amp \\
        --amp-dtype bfloat16 --batch-size 256 --workers 16 --data BIG_DATASET [--compile]

Every row runs the trainer's step (engine/loop.py): normalize on the device, autocast when --amp
(a loss scaler only for float16), cross-entropy, backward, the trainer's optimizer (engine/optim.py,
RMSprop with the recipe's settings), zero_grad; same model, precision and memory format.
  model only        a uint8 batch made once and kept on the device: the ceiling
  model + augment   the same, plus augment.DeviceAugment with the recipe's policy (only when
                    `import augment` works): its share = 1 - this / model only
  e2e <loader>      batches from build_loader(<loader>) (warmed up by one untimed epoch)
Rows are timed in rounds, one after the other and in a rotating order, so load from other
processes hits all of them alike; each figure is the median over --rounds, each ratio the median
of per-round ratios. An e2e phase runs whole epochs (so no loader is left prefetching into the
next row's time) and takes at least --steps steps, right after one untimed epoch of the loader
alone (a loader that works ahead between epochs, as our DALI stream does, would otherwise get
the next row's time for it); the model rows run as many steps. The clock
starts and stops with a synchronize of the device. On the CPU the loader and the model share
the same cores: there the stall measures how much of the CPU the loader takes from the model as
well as any waiting, and `wait %` (time blocked in next(loader)) tells the two apart.
"""
import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import (RESULTS_DIR, Window, bar_chart, cores, environment, load_average, spread,  # noqa: E402
                          table, versions, write_json)
from engine.config import get_args_parser as trainer_args  # noqa: E402
from engine.distributed import resolve_kind  # noqa: E402
from engine.loop import Precision, sync  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from loaders import LOADERS, build_loader, normalize  # noqa: E402
from model import MODEL_NAMES, create_model  # noqa: E402

TARGET_STALL = 0.05  # issue 8: input stall < 5% for FFCV and DALI
STALL_TARGET_LOADERS = ("ffcv", "dali")
# Defaults that finish in a few minutes on a 2-core CPU; accelerators get the recipe's model and size.
CPU_DEFAULTS = {"arch": "mobilenetv3_small_100", "image_size": 128, "batch_size": 64, "steps": 12}
ACCEL_DEFAULTS = {"arch": "mobilenetv3_large_100", "image_size": 224, "batch_size": 256, "steps": 100}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="ImageNet-layout folder; default: the built-in sample dataset")
    p.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated subset of " + ",".join(LOADERS))
    p.add_argument("--arch", default=None, choices=MODEL_NAMES,
                   help=f"model (default {CPU_DEFAULTS['arch']} on the CPU, "
                        f"{ACCEL_DEFAULTS['arch']} on an accelerator)")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"crop size in px (default {CPU_DEFAULTS['image_size']} on the CPU, "
                        f"{ACCEL_DEFAULTS['image_size']} on an accelerator)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per step (default {CPU_DEFAULTS['batch_size']} on the CPU, "
                        f"{ACCEL_DEFAULTS['batch_size']} on an accelerator)")
    p.add_argument("--workers", type=int, default=cores(), help="loader workers / threads")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the model (default: torch's own, one per core); on a "
                        "small CPU, fewer than the cores leaves room for the loader")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per timed phase, at least (e2e phases round up to whole epochs; default "
                        f"{CPU_DEFAULTS['steps']} on the CPU, {ACCEL_DEFAULTS['steps']} on an accelerator)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed model steps first (and compilation)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds over all rows; medians are reported")
    p.add_argument("--amp", action="store_true", help="autocast in --amp-dtype (the CPU always uses bfloat16)")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="autocast dtype; float16 adds the loss scaler")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format for the model and its input")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="the model + augment row (recipe: ImageNet AutoAugment, random erasing 0.2) when "
                        "`import augment` works")
    p.add_argument("--dali-decode", default="cpu", choices=["cpu", "mixed"],
                   help="DALI loader: decode on the CPU, or with nvJPEG on a CUDA device (mixed)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"], help="where to train")
    p.add_argument("--seed", type=int, default=0, help="weights, synthetic batch and loader seed")
    p.add_argument("--json", default=str(RESULTS_DIR / "train_fps.json"), help="results as JSON")
    p.add_argument("--png", default=None, help="bar chart (default: the --json path with .png)")
    return p


def resolve_defaults(args, device: torch.device):
    defaults = CPU_DEFAULTS if device.type == "cpu" else ACCEL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def make_step(model, optimizer, scaler, precision: Precision, device, channels_last: bool, augment=None):
    """engine/loop.py's training step, without the LR schedule and the logging."""
    def step(images, labels, i: int):
        if augment is not None:
            images = augment.before_normalize(images, i)
        x = normalize(images)
        if not channels_last:
            x = x.contiguous()
        if augment is not None:
            x, labels = augment.after_normalize(x, labels, i)
        with precision.autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


class ModelRow:
    """A synthetic uint8 batch kept on the device, fed `steps` times."""

    def __init__(self, name, step, images, labels):
        self.name, self.step, self.images, self.labels = name, step, images, labels
        self.counter = 0

    def run(self, steps: int) -> dict:
        for _ in range(steps):
            self.step(self.images, self.labels, self.counter)
            self.counter += 1
        return {"images": steps * len(self.labels), "steps": steps, "wait_s": 0.0}


class LoaderRow:
    """Whole epochs of a loader, each batch through the same step; time blocked in next() is wait_s."""

    def __init__(self, name, step, loader, epochs: int):
        self.name, self.step, self.loader, self.epochs = name, step, loader, epochs
        self.epoch = self.counter = 0
        self.first_batch_s_cold = None

    def run(self, epochs: int | None = None) -> dict:
        images = steps = 0
        wait_s = 0.0
        for _ in range(self.epochs if epochs is None else epochs):
            self.loader.set_epoch(self.epoch)
            self.epoch += 1
            batches = iter(self.loader)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                wait_s += time.perf_counter() - t0
                if batch is None:
                    break
                self.step(batch[0], batch[1], self.counter)
                self.counter += 1
                images += len(batch[1])
                steps += 1
        return {"images": images, "steps": steps, "wait_s": wait_s}

    def lead_in(self):
        """One untimed epoch of the loader alone, right before a timed phase: a loader that works
        ahead between epochs (our DALI stream) then does it in its own time, not while the rows
        before it are being timed."""
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        for _ in self.loader:
            pass


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = torch.device(resolve_kind(args.device))
    if device.type != "cpu":  # an explicit index: set_device refuses a bare "cuda" on some torch versions
        device = torch.device(device.type, getattr(torch, device.type).current_device())
        getattr(torch, device.type).set_device(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
    resolve_defaults(args, device)
    names = [s.strip() for s in args.loaders.split(",") if s.strip()]
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        raise SystemExit(f"--loaders {','.join(unknown)}: choose from {','.join(LOADERS)}")
    if min(args.batch_size, args.steps, args.rounds, args.workers) < 1:
        raise SystemExit("--batch-size, --steps, --rounds and --workers must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = prepare(args, names)

    loaders = {n: build_loader(n, split="train", data=data, batch_size=args.batch_size, workers=args.workers,
                               image_size=args.image_size, seed=args.seed, device=device,
                               options={"decode": args.dali_decode} if n == "dali" else {}) for n in names}
    for n, loader in loaders.items():
        if len(loader) < 1:
            raise SystemExit(f"--batch-size {args.batch_size} is larger than the {loader.num_samples} training "
                             f"images of {data}: lower it or pass a larger --data")
    num_classes = len(next(iter(loaders.values())).classes) if loaders else 1000
    precision = Precision(args.amp, torch.bfloat16 if device.type == "cpu" else getattr(torch, args.amp_dtype))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = create_model(args.arch, num_classes=num_classes).to(device, memory_format=memory_format)
    model.train()
    optimizer = build_optimizer(model, trainer_args().parse_args([]))  # the trainer's defaults (the recipe's)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.enabled and precision.dtype == torch.float16)
    net = torch.compile(model) if args.compile else model
    step = make_step(net, optimizer, scaler, precision, device, args.channels_last)

    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), generator=g,
                           dtype=torch.uint8).contiguous(memory_format=torch.channels_last).to(device)
    labels = torch.randint(0, num_classes, (args.batch_size,), generator=g).to(device)

    rows = [ModelRow("model only", step, images, labels)]
    augment_note = None
    if args.augment:
        try:
            from augment import DeviceAugment
            augment = DeviceAugment(num_classes=num_classes, auto_augment="imagenet", random_erase=0.2, seed=args.seed)
            rows.append(ModelRow("model + augment", make_step(net, optimizer, scaler, precision, device,
                                                             args.channels_last, augment), images, labels))
        except ImportError as e:
            augment_note = f"no augment row: {e}"
            print(f"train_fps: {augment_note}", file=sys.stderr)
    epochs = {n: math.ceil(args.steps / len(l)) for n, l in loaders.items()}
    model_steps = max([epochs[n] * len(loaders[n]) for n in names] or [args.steps])
    rows += [LoaderRow(f"e2e {n}", step, loaders[n], epochs[n]) for n in names]

    print(f"train_fps: warm-up ({args.warmup_steps} model steps{', compiling' if args.compile else ''}; "
          f"one epoch per loader)", file=sys.stderr, flush=True)
    for row in rows:
        if isinstance(row, ModelRow):
            row.run(args.warmup_steps)
        else:
            row.run(epochs=1)
            row.first_batch_s_cold = row.loader.first_batch_s
    sync(device)

    load_before = load_average()
    results = {row.name: [] for row in rows}
    for r in range(args.rounds):
        print(f"train_fps: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for k in range(len(rows)):
            row = rows[(k + r) % len(rows)]
            if isinstance(row, LoaderRow):
                row.lead_in()
            with Window(lambda: sync(device)) as w:
                out = row.run(model_steps) if isinstance(row, ModelRow) else row.run()
            results[row.name].append({**out, "wall_s": w.wall_s, "cpu_s": w.cpu_s})
    load_after = load_average()

    out = summarize(rows, results, cores())
    setting = (f"{args.arch}, {args.image_size} px, batch {args.batch_size}, {precision.name}, "
               f"{'channels_last' if args.channels_last else 'contiguous'}{', compiled' if args.compile else ''}, "
               f"{args.workers} workers, {torch.get_num_threads()} torch threads, on {device}")
    print(f"\ntrain_fps: {setting}; {args.rounds} rounds of {model_steps} model steps / "
          f"{', '.join(f'{epochs[n]} epoch(s) of {len(loaders[n])} steps ({n})' for n in names)}; "
          f"load average {load_before} before, {load_after} after")
    print(table(out, COLUMNS))
    checks = [{"target": f"{n} input stall < {TARGET_STALL:.0%}", "measured": row["stall"],
               "met": row["stall"] < TARGET_STALL}
              for row in out for n in STALL_TARGET_LOADERS if row["name"] == f"e2e {n}"]
    print()
    for c in checks:
        print(f"{'MET ' if c['met'] else 'MISS'}  {c['target']}: {c['measured']:.1%}")
    result = {
        "benchmark": "train_fps", "command": " ".join(["python bench/train_fps.py", *map(str, argv or sys.argv[1:])]),
        "settings": {"data": str(data), "arch": args.arch, "image_size_px": args.image_size,
                     "batch_size": args.batch_size, "precision": precision.name,
                     "channels_last": args.channels_last, "compile": args.compile, "workers": args.workers,
                     "dali_decode": args.dali_decode,
                     "device": str(device), "rounds": args.rounds, "model_steps_per_round": model_steps,
                     "epochs_per_round": epochs, "steps_per_epoch": {n: len(l) for n, l in loaders.items()},
                     "torch_threads": torch.get_num_threads()},
        "hardware": {**environment(), "device": str(device),
                     "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": versions("torchvision", "ffcv", "nvidia.dali"),
        "load_average_before": load_before, "load_average_after": load_after,
        "augment_note": augment_note, "rows": out, "targets": checks,
    }
    json_path = write_json(result, args.json)
    png_path = plot(args.png or Path(args.json).with_suffix(".png"), out, f"train_fps: {setting}")
    print(f"\nwrote {json_path} and {png_path}")
    return result


def prepare(args, names) -> Path:
    """The dataset folder; with no --data, the sample, converted for the chosen loaders (as train.py does)."""
    from convert.make_sample import ensure_sample
    data = ensure_sample(args.data, "train_fps")
    if "ffcv" in names and not (data / "ffcv" / "train.beton").exists():
        from convert.to_ffcv import convert
        print(f"train_fps: converting {data} for FFCV into {data / 'ffcv'}", file=sys.stderr)
        convert(data, progress=False)
    if "dali" in names and not list((data / "shards").glob("train-*.idx")):
        from convert.to_shards import convert
        print(f"train_fps: writing shards of {data} into {data / 'shards'}", file=sys.stderr)
        convert(data, progress=False)
    return data


def summarize(rows, results, usable_cores) -> list[dict]:
    base = results["model only"]
    out = []
    for row in rows:
        runs = results[row.name]
        fps = spread([r["images"] / r["wall_s"] for r in runs])
        ratio = spread([(r["images"] / r["wall_s"]) / (b["images"] / b["wall_s"]) for r, b in zip(runs, base)])
        wall_s = sum(r["wall_s"] for r in runs)
        cpu_s = sum(r["cpu_s"] for r in runs)
        is_loader = isinstance(row, LoaderRow)
        out.append({
            "name": row.name, "imgs_per_s": fps["median"], "imgs_per_s_min": fps["min"],
            "imgs_per_s_max": fps["max"], "imgs_per_s_rounds": [round(v, 1) for v in fps["values"]],
            "of_model_only": ratio["median"],
            # for the loaders this is the input stall; for the augment row, augmentation's share
            "stall": 1 - ratio["median"] if is_loader else None,
            "stall_min": 1 - ratio["max"] if is_loader else None, "stall_max": 1 - ratio["min"] if is_loader else None,
            "augment_share": 1 - ratio["median"] if row.name == "model + augment" else None,
            "wait_pct": 100 * sum(r["wait_s"] for r in runs) / wall_s if is_loader else None,
            "cores_used": cpu_s / wall_s, "cpu_util_pct": 100 * cpu_s / wall_s / usable_cores,
            # CPU time (all threads and worker processes) per trained image: the e2e rows minus the
            # model row is what the input pipeline, and the contention it brings, cost the CPU
            "cpu_ms_per_img": 1000 * cpu_s / sum(r["images"] for r in runs),
            "steps_per_round": runs[0]["steps"],
            "first_batch_s_cold": row.first_batch_s_cold if is_loader else None,
        })
    return out


COLUMNS = [("row", "name", ""), ("img/s", "imgs_per_s", ".1f"), ("min", "imgs_per_s_min", ".1f"),
           ("max", "imgs_per_s_max", ".1f"), ("of model", "of_model_only", ".2f"), ("stall", "stall", ".1%"),
           ("aug share", "augment_share", ".1%"), ("wait %", "wait_pct", ".1f"), ("cores", "cores_used", ".2f"),
           ("CPU %", "cpu_util_pct", ".0f"), ("CPU ms/img", "cpu_ms_per_img", ".2f"), ("steps", "steps_per_round", "d"),
           ("1st batch cold s", "first_batch_s_cold", ".2f")]


def plot(path, out, title):
    notes = []
    for r in out:
        if r["stall"] is not None:
            notes.append(f"stall {r['stall']:.0%}, waiting {r['wait_pct']:.0f}%")
        elif r["augment_share"] is not None:
            notes.append(f"augment share {r['augment_share']:.0%}")
        else:
            notes.append("")
    colors = ["#7f7f7f" if not r["name"].startswith("e2e") else
              {"e2e ffcv": "#1f77b4", "e2e dali": "#2ca02c"}.get(r["name"], "#d62728") for r in out]
    return bar_chart(path, [r["name"] for r in out], [r["imgs_per_s"] for r in out],
                     [r["imgs_per_s_min"] for r in out], [r["imgs_per_s_max"] for r in out], colors, title,
                     "training images/s (median over rounds, min-max whiskers)", notes=notes,
                     reference=out[0]["imgs_per_s"], reference_label="model only")


if __name__ == "__main__":
    main()
