"""Training throughput: the trainer's own step (engine.step) on a batch kept on the device, against
end to end with each loader; input stall = 1 - end-to-end / model-only. CPU, CUDA or NPU.

    python bench/train_fps.py [--data DIR] [--loaders ffcv,dali,torchvision] [--steps N] [--json PATH]
    python bench/train_fps.py --device cuda --arch mobilenetv3_large_100 --image-size 224 --amp \\
        --amp-dtype bfloat16 --batch-size 256 --workers 16 --data DIR [--compile]        (--help: all)

Rows, all through the same TrainStep, model, precision and memory format:
  model only        a uint8 batch made once and kept on the device: the ceiling
  model + augment   the same through augment.DeviceAugment with the recipe's policy (ImageNet
                    AutoAugment, random erasing 0.2): its share = 1 - this / model only
  e2e <loader>      batches from build_loader(<loader>), whole epochs of at least --steps steps,
                    each right after one untimed epoch of the loader alone (its lead-in)
On the CPU the loader and the model share the cores, so the stall is the CPU the loader takes
from the model as well as any waiting; `wait %` (time blocked in next(loader)) tells them apart.
"""
import argparse
import math
import sys
import time

import torch

from bench.harness import Report, Row, add_output_flags, cores, measure, paired, stats
from core.errors import ConfigError, run_command
from engine.distributed import setup
from engine.optim import OptimizerConfig, build_optimizer
from engine.precision import Precision
from engine.step import DeviceInput, TrainStep, sync
from loaders import LOADERS, build_loader
from model import MODEL_NAMES, create_model

# Defaults that finish in a few minutes on a 2-core CPU; accelerators get the recipe's model and size.
CPU_DEFAULTS = {"arch": "mobilenetv3_small_100", "image_size": 128, "batch_size": 64, "steps": 12}
ACCEL_DEFAULTS = {"arch": "mobilenetv3_large_100", "image_size": 224, "batch_size": 256, "steps": 100}
COLORS = {"e2e ffcv": "#1f77b4", "e2e dali": "#2ca02c", "e2e torchvision": "#d62728"}


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
    p.add_argument("--amp", action="store_true", help="autocast in --amp-dtype")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["auto", "bfloat16", "float16"],
                   help="autocast dtype (auto: float16 on accelerators, bfloat16 on the CPU); float16 adds "
                        "the loss scaler")
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
    add_output_flags(p, "train_fps")
    return p


class ModelRow(Row):
    """The step fed `steps` times with the same uint8 batch, kept on the device."""

    def __init__(self, name, step, inputs, images, labels, steps: int, warmup_steps: int):
        self.name, self.step, self.inputs, self.images, self.labels = name, step, inputs, images, labels
        self.steps, self.warmup_steps, self.counter = steps, warmup_steps, 0
        self.sync = lambda: sync(images.device)

    def work(self, steps: int | None = None) -> dict:
        steps = steps or self.steps
        for _ in range(steps):
            self.step(*self.inputs(self.images, self.labels, self.counter))
            self.counter += 1
        return {"images": steps * len(self.labels), "steps": steps}

    def warm_up(self) -> dict:
        return self.work(self.warmup_steps)


class LoaderRow(Row):
    """Whole epochs of a loader, each batch through the step; time blocked in next() is wait_s."""

    def __init__(self, name, step, inputs, loader, epochs: int, device):
        self.name, self.step, self.inputs, self.loader, self.epochs = name, step, inputs, loader, epochs
        self.epoch = self.counter = 0
        self.sync = lambda: sync(device)

    def batches(self):
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def work(self, epochs: int | None = None) -> dict:
        images = steps = 0
        wait_s = 0.0
        for _ in range(epochs or self.epochs):
            batches = self.batches()
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                wait_s += time.perf_counter() - t0
                if batch is None:
                    break
                self.step(*self.inputs(batch[0], batch[1], self.counter))
                self.counter += 1
                images += len(batch[1])
                steps += 1
        return {"images": images, "steps": steps, "wait_s": wait_s, "first_batch_s": self.loader.first_batch_s}

    def warm_up(self) -> dict:
        return self.work(1)

    def lead_in(self):
        for _ in self.batches():
            pass


def build_rows(args, device) -> tuple[list[Row], dict]:
    names = [s.strip() for s in args.loaders.split(",") if s.strip()]
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        raise ConfigError(f"--loaders {','.join(unknown)}: choose from {','.join(LOADERS)}")
    from convert.make_sample import ensure_sample
    data = ensure_sample(args.data, "train_fps", loaders=names)
    loaders = {n: build_loader(n, split="train", data=data, batch_size=args.batch_size, workers=args.workers,
                               image_size=args.image_size, seed=args.seed, device=device,
                               options={"decode": args.dali_decode} if n == "dali" else {}) for n in names}
    for loader in loaders.values():
        if len(loader) < 1:
            raise ConfigError(f"--batch-size {args.batch_size} is larger than the {loader.num_samples} training "
                              f"images of {data}: lower it or pass a larger --data")
    num_classes = len(next(iter(loaders.values())).classes) if loaders else 1000
    precision = Precision.resolve(args.amp, args.amp_dtype, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = create_model(args.arch, num_classes=num_classes).to(device, memory_format=memory_format).train()
    optimizer = build_optimizer(model, OptimizerConfig())  # the trainer's recipe
    step = TrainStep(torch.compile(model) if args.compile else model, optimizer, precision, device)
    inputs = DeviceInput(channels_last=args.channels_last)

    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), generator=g,
                           dtype=torch.uint8).contiguous(memory_format=torch.channels_last).to(device)
    labels = torch.randint(0, num_classes, (args.batch_size,), generator=g).to(device)
    epochs = {n: math.ceil(args.steps / len(loader)) for n, loader in loaders.items()}
    model_steps = max([epochs[n] * len(loaders[n]) for n in names] or [args.steps])
    rows = [ModelRow("model only", step, inputs, images, labels, model_steps, args.warmup_steps)]
    if args.augment:
        try:
            from augment import DeviceAugment
            augment = DeviceAugment(num_classes=num_classes, auto_augment="imagenet", random_erase=0.2, seed=args.seed)
            rows.append(ModelRow("model + augment", step, DeviceInput(augment, channels_last=args.channels_last),
                                 images, labels, model_steps, args.warmup_steps))
        except ImportError as e:
            print(f"train_fps: no augment row: {e}", file=sys.stderr)
    rows += [LoaderRow(f"e2e {n}", step, inputs, loaders[n], epochs[n], device) for n in names]
    settings = {"data": str(data), "arch": args.arch, "image_size_px": args.image_size,
                "batch_size": args.batch_size, "precision": precision.name, "channels_last": args.channels_last,
                "compile": args.compile, "workers": args.workers, "dali_decode": args.dali_decode,
                "device": str(device), "rounds": args.rounds, "model_steps_per_round": model_steps,
                "epochs_per_round": epochs, "steps_per_epoch": {n: len(l) for n, l in loaders.items()},
                "torch_threads": torch.get_num_threads()}
    return rows, settings


COLUMNS = [("row", "name", ""), ("img/s", "imgs_per_s", ".1f"), ("min", "imgs_per_s_min", ".1f"),
           ("max", "imgs_per_s_max", ".1f"), ("of model", "of_model_only", ".2f"), ("stall", "stall", ".1%"),
           ("aug share", "augment_share", ".1%"), ("wait %", "wait_pct", ".1f"), ("cores", "cores_used", ".2f"),
           ("CPU %", "cpu_util_pct", ".0f"), ("CPU ms/img", "cpu_ms_per_img", ".2f"), ("steps", "steps_per_round", "d"),
           ("1st batch cold s", "first_batch_s_cold", ".2f")]


def summarize(rows: list[Row], results: dict) -> list[dict]:
    out = []
    for row in rows:
        result = results[row.name]
        ratio = paired(result, results["model only"])
        e2e = isinstance(row, LoaderRow)
        wall_s = sum(r["wall_s"] for r in result["runs"])
        out.append({"name": row.name, **stats(result), "of_model_only": ratio["median"],
                    "stall": 1 - ratio["median"] if e2e else None,
                    "stall_min": 1 - ratio["max"] if e2e else None, "stall_max": 1 - ratio["min"] if e2e else None,
                    "augment_share": 1 - ratio["median"] if row.name == "model + augment" else None,
                    "wait_pct": 100 * sum(r["wait_s"] for r in result["runs"]) / wall_s if e2e else None,
                    "steps_per_round": result["runs"][0]["steps"]})
    return out


def bar(r: dict) -> tuple:
    if r["stall"] is not None:
        note = f"stall {r['stall']:.0%}, waiting {r['wait_pct']:.0f}%"
    else:
        note = f"augment share {r['augment_share']:.0%}" if r["augment_share"] is not None else ""
    return (r["name"], r["imgs_per_s"], r["imgs_per_s_min"], r["imgs_per_s_max"], COLORS.get(r["name"], "#7f7f7f"),
            note)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = setup(args.device).device
    for key, value in (CPU_DEFAULTS if device.type == "cpu" else ACCEL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.batch_size, args.steps, args.rounds, args.workers) < 1:
        raise ConfigError("--batch-size, --steps, --rounds and --workers must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows, settings = build_rows(args, device)
    report = Report("train_fps", argv)
    out = summarize(rows, measure(rows, rounds=args.rounds, who="train_fps"))
    setting = (f"{args.arch}, {args.image_size} px, batch {args.batch_size}, {settings['precision']}, "
               f"{'channels_last' if args.channels_last else 'contiguous'}{', compiled' if args.compile else ''}, "
               f"{args.workers} workers, {torch.get_num_threads()} torch threads, on {device}; {args.rounds} rounds of "
               f"{settings['model_steps_per_round']} model steps")
    return report.write(args, setting, settings, out, COLUMNS, [bar(r) for r in out],
                        "training images/s (median over rounds, min-max whiskers)",
                        reference=(out[0]["imgs_per_s"], "model only"), modules=("torchvision", "ffcv", "nvidia.dali"))


if __name__ == "__main__":
    run_command(main)
