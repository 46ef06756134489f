"""Training throughput: the trainer's own step (engine.step) on a batch kept on the device, against
end to end with each loader; input stall = 1 - end-to-end / model-only. CPU, CUDA or NPU.

    python bench/train_fps.py [--data DIR] [--loaders ffcv,dali,torchvision] [--steps N] [--json PATH]
    python bench/train_fps.py --device cuda --arch mobilenetv3_large_100 --image-size 224 --amp \\
        --amp-dtype bfloat16 --batch-size 256 --workers 16 --data DIR [--compile] \\
        [--compile-modes default,max-autotune-no-cudagraphs,reduce-overhead] [--cuda-graphs] \\
        [--batch-sizes 512,1024]                                                          (--help: all)

Rows, all through the trainer's TrainStep with the same model, precision and memory format:
  model only        a uint8 batch made once and kept on the device: the ceiling (eager, or
                    compiled in default mode with --compile)
  model only, compiled MODE   the same, torch.compile(mode=MODE), one row per --compile-modes
  model only, graphed         the same, the whole step captured as a CUDA graph (--cuda-graphs;
                    left out, with one line saying why, where it cannot be captured)
  ..., batch N      each of those at another batch size (--batch-sizes): which batch is best
  model + augment   model only through augment.DeviceAugment with the recipe's policy (ImageNet
                    AutoAugment, random erasing 0.2): its share = 1 - this / model only
  e2e <loader>      batches from build_loader(<loader>), whole epochs of at least --steps steps,
                    each right after one untimed epoch of the loader alone (its lead-in); each
                    epoch is timed from its --timing-warmup-steps-th step to its end, with
                    engine/meter.py's StepMeter, the window train.py's img/s uses, so a new
                    epoch's start (reader pool, first batch) is not counted as stall: `1st wait s`
                    and `epoch img/s` (whole epochs) report it apart
`of model` is each row against model only in the same round: a compiled or graphed row's speed-up.
With --cuda-graphs (where capture works) the e2e rows train through the graphed step and their
`of model` and stall are against "model only, graphed".
On the CPU the loader and the model share the cores, so the stall is the CPU the loader takes
from the model as well as any waiting; `wait %` (time blocked in next(loader)) tells them apart.
"""
import argparse
import math
import statistics
import sys
import time

import torch

from bench.harness import Report, Row, add_output_flags, cores, measure, paired, stats, tree_cpu_s
from core.errors import ConfigError, UserError, run_command
from engine.config import COMPILE_MODES
from engine.config import get_args_parser as train_args_parser
from engine.distributed import setup
from engine.meter import StepMeter
from engine.optim import OptimizerConfig, build_optimizer
from engine.precision import Precision
from engine.step import WARMUP_STEPS, DeviceInput, TrainStep, graph_blocker, sync
from loaders import LOADERS, build_loader
from loaders.options import DECODES
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
    p.add_argument("--timing-warmup-steps", type=int,
                   default=train_args_parser().get_default("warmup_steps_timing"),
                   help="e2e rows: steps at the start of each epoch left out of the timed window (train.py's "
                        "--warmup-steps-timing, the same window)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds over all rows; medians are reported")
    p.add_argument("--amp", action="store_true", help="autocast in --amp-dtype")
    p.add_argument("--amp-dtype", default="auto", choices=["auto", "bfloat16", "float16"],
                   help="autocast dtype: auto = the device's fast one (bfloat16 on CUDA from Ampere on, float16 on "
                        "Volta/Turing and NPUs, bfloat16 on CPUs with AMX, else fp32, saying so); an explicit one is "
                        "used even where slower than fp32; float16 adds the loss scaler")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format for the model and its input")
    p.add_argument("--compile", action="store_true", help="torch.compile the model of every row (default mode)")
    p.add_argument("--compile-modes", type=_modes, default=[],
                   help=f"comma-separated torch.compile modes, one 'model only, compiled MODE' row each: "
                        f"{','.join(COMPILE_MODES)}")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="a 'model only, graphed' row: the whole step captured as a CUDA graph (CUDA only)")
    p.add_argument("--batch-sizes", type=_sizes, default=[],
                   help="comma-separated batch sizes (e.g. 256,512,1024): each model-only row again at each, to find "
                        "the best batch; every graph keeps its own memory, so mind the device's")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="the model + augment row (recipe: ImageNet AutoAugment, random erasing 0.2) when "
                        "`import augment` works")
    p.add_argument("--decode", default="auto", choices=DECODES,
                   help="every loader's decode option: cpu (host threads), device (where the batch trains), auto "
                        "(device where the loader can on CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"], help="where to train")
    p.add_argument("--seed", type=int, default=0, help="weights, synthetic batch and loader seed")
    add_output_flags(p, "train_fps")
    return p


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in COMPILE_MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: choose from {','.join(COMPILE_MODES)}")
    return modes


def _sizes(text: str) -> list[int]:
    sizes = [int(v) for v in text.split(",") if v.strip()]
    if min(sizes, default=1) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return sizes


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

    def run(self) -> dict:
        reset_peak_memory(self.images.device)
        return {**super().run(), "peak_memory_gib": peak_memory_gib(self.images.device)}


class LoaderRow(Row):
    """Whole epochs of a loader, each batch through the step. Each epoch is timed by a StepMeter
    from step `timed_from_step` to its end (train.py's window); time blocked in next() inside
    that window is wait_s. The whole epochs' figures are kept beside it (epoch_*)."""

    def __init__(self, name, step, inputs, loader, epochs: int, device, reference: str = "model only",
                 timed_from_step: int = 0):
        self.name, self.step, self.inputs, self.loader, self.epochs = name, step, inputs, loader, epochs
        self.reference = reference  # the model-only row its stall is measured against
        self.timed_from_step = max(0, min(timed_from_step, len(loader) - 1))  # as train.py clamps it
        self.epoch = self.counter = 0
        self.device = device
        self.sync = lambda: sync(device)

    def batches(self):
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def work(self, epochs: int | None = None) -> dict:
        out = {"images": 0, "steps": 0, "wait_s": 0.0, "timed_wall_s": 0.0, "cpu_s": 0.0, "epoch_images": 0,
               "epoch_wait_s": 0.0, "first_wait_s": []}
        edges = []  # (clock, CPU seconds of the process tree) at each edge of a timed window

        def edge():  # the meter syncs the device at both edges of its window
            sync(self.device)
            edges.append(tree_cpu_s())

        for _ in range(epochs or self.epochs):
            batches, meter, i = self.batches(), StepMeter(self.timed_from_step, edge), 0
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                wait_s = time.perf_counter() - t0
                if batch is None:
                    break
                meter.begin_step(i, wait_s)
                self.step(*self.inputs(batch[0], batch[1], self.counter))
                meter.end_step(len(batch[1]))
                self.counter += 1
                i += 1
                out["epoch_images"] += len(batch[1])
                out["epoch_wait_s"] += wait_s
            timed = meter.close()
            out["images"] += timed["timed_images"]
            out["steps"] += i
            out["wait_s"] += timed["timed_wait_s"]
            out["timed_wall_s"] += timed["timed_wall_s"] if timed["timed_images"] else 0.0
            out["cpu_s"] += edges[-1] - edges[-2] if len(edges) >= 2 and timed["timed_images"] else 0.0
            out["first_wait_s"].append(timed["first_wait_s"])
            edges.clear()
        out["first_batch_s"] = self.loader.first_batch_s
        return out

    def run(self) -> dict:
        """The timed windows of whole epochs: img/s and CPU over the windows, epochs' wall beside."""
        reset_peak_memory(self.device)
        self.sync()
        t0 = time.perf_counter()
        out = self.work()
        self.sync()
        return {**out, "wall_s": out.pop("timed_wall_s"), "epoch_wall_s": time.perf_counter() - t0,
                "peak_memory_gib": peak_memory_gib(self.device)}

    def warm_up(self) -> dict:
        return self.work(1)

    def lead_in(self):
        for _ in self.batches():
            pass


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float | None:
    """The allocator's peak since reset_peak_memory (graph pools included): what a batch size needs."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def synthetic_batch(args, batch_size: int, num_classes: int, device):
    """uint8 images and labels made once, kept on the device."""
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (batch_size, 3, args.image_size, args.image_size), generator=g,
                           dtype=torch.uint8).contiguous(memory_format=torch.channels_last).to(device)
    return images, torch.randint(0, num_classes, (batch_size,), generator=g).to(device)


def build_step(args, device, precision: Precision, num_classes: int, compile_mode: str | None = None,
               cuda_graphs: bool = False) -> TrainStep:
    """The trainer's step on a fresh model and the trainer's optimiser; compiled in `compile_mode`
    (or default mode with --compile), captured with cuda_graphs where it can be (else `note`)."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = create_model(args.arch, num_classes=num_classes).to(device, memory_format=memory_format).train()
    optimizer = build_optimizer(model, OptimizerConfig())  # the trainer's recipe
    mode = compile_mode or ("default" if args.compile else None)
    net = torch.compile(model, mode=None if mode == "default" else mode) if mode else model
    return TrainStep(net, optimizer, precision, device, cuda_graphs=cuda_graphs, compile_mode=mode)


def model_rows(args, device, precision: Precision, num_classes: int, steps: int, base: TrainStep, inputs) -> list[Row]:
    """model only: eager (`base`), each compile mode, graphed; at --batch-size, then at each --batch-sizes."""
    kinds = [("", {})] + [(f", compiled {m}", {"compile_mode": m}) for m in args.compile_modes]
    if args.cuda_graphs:
        why = graph_blocker(base.model, base.optimizer, device)
        if why:  # the row would repeat the eager one
            print(f"train_fps: no graphed rows: {why}", file=sys.stderr)
        else:
            kinds.append((", graphed", {"cuda_graphs": True}))
    rows = []
    for batch_size in [args.batch_size] + [b for b in args.batch_sizes if b != args.batch_size]:
        images, labels = synthetic_batch(args, batch_size, num_classes, device)
        for suffix, kind in kinds:
            step = base if not kind and batch_size == args.batch_size else build_step(args, device, precision,
                                                                                      num_classes, **kind)
            # a graphed step runs WARMUP_STEPS eagerly per shape, then captures: all before the timing
            warmup = args.warmup_steps + (WARMUP_STEPS + 1 if step.graph is not None else 0)
            name = "model only" + suffix + (f", batch {batch_size}" if batch_size != args.batch_size else "")
            rows.append(ModelRow(name, step, inputs, images, labels, steps, warmup))
    return rows


def build_rows(args, device) -> tuple[list[Row], dict]:
    names = [s.strip() for s in args.loaders.split(",") if s.strip()]
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        raise ConfigError(f"--loaders {','.join(unknown)}: choose from {','.join(LOADERS)}")
    from convert.default_data import ensure_sample
    data = ensure_sample(args.data, "train_fps", loaders=names)
    loaders = {n: build_loader(n, split="train", data=data, batch_size=args.batch_size, workers=args.workers,
                               image_size=args.image_size, seed=args.seed, device=device,
                               options={"decode": args.decode}) for n in names}
    for loader in loaders.values():
        if len(loader) < 1:
            raise ConfigError(f"--batch-size {args.batch_size} is larger than the {loader.num_samples} training "
                              f"images of {data}: lower it or pass a larger --data")
    num_classes = len(next(iter(loaders.values())).classes) if loaders else 1000
    precision = Precision.resolve(args.amp, args.amp_dtype, device)
    if precision.note:
        print(f"train_fps: {precision.note}", file=sys.stderr)
    step = build_step(args, device, precision, num_classes)
    inputs = DeviceInput(channels_last=args.channels_last)

    images, labels = synthetic_batch(args, args.batch_size, num_classes, device)
    epochs = {n: math.ceil(args.steps / len(loader)) for n, loader in loaders.items()}
    model_steps = max([epochs[n] * len(loaders[n]) for n in names] or [args.steps])
    rows = model_rows(args, device, precision, num_classes, model_steps, step, inputs)
    if args.augment:
        try:
            from augment import DeviceAugment
            augment = DeviceAugment(num_classes=num_classes, auto_augment="imagenet", random_erase=0.2, seed=args.seed)
            rows.append(ModelRow("model + augment", step, DeviceInput(augment, channels_last=args.channels_last),
                                 images, labels, model_steps, args.warmup_steps))
        except ImportError as e:
            print(f"train_fps: no augment row: {e}", file=sys.stderr)
    # With --cuda-graphs the loaders feed the graphed step, as train.py --cuda-graphs does, and
    # their stall is against the graphed model-only row.
    graphed = next((r for r in rows if r.name == "model only, graphed"), None)
    rows += [LoaderRow(f"e2e {n}", (graphed or rows[0]).step, inputs, loaders[n], epochs[n], device,
                       reference=(graphed or rows[0]).name, timed_from_step=args.timing_warmup_steps) for n in names]
    settings = {"data": str(data), "arch": args.arch, "image_size_px": args.image_size,
                "batch_size": args.batch_size, "batch_sizes": args.batch_sizes, "precision": precision.name,
                "channels_last": args.channels_last, "compile": args.compile, "compile_modes": args.compile_modes,
                "cuda_graphs": any(", graphed" in r.name for r in rows), "e2e_step": "graphed" if graphed else "eager",
                "workers": args.workers,
                "decode": args.decode, "device": str(device), "rounds": args.rounds,
                "model_steps_per_round": model_steps, "epochs_per_round": epochs,
                "e2e_timed_from_step": {n: r.timed_from_step for n, r in zip(names, rows[-len(names):])} if names else {},
                "steps_per_epoch": {n: len(l) for n, l in loaders.items()}, "torch_threads": torch.get_num_threads()}
    return rows, settings


COLUMNS = [("row", "name", ""), ("img/s", "imgs_per_s", ".1f"), ("min", "imgs_per_s_min", ".1f"),
           ("max", "imgs_per_s_max", ".1f"), ("of model", "of_model_only", ".2f"), ("stall", "stall", ".1%"),
           ("aug share", "augment_share", ".1%"), ("wait %", "wait_pct", ".1f"), ("cores", "cores_used", ".2f"),
           ("CPU %", "cpu_util_pct", ".0f"), ("CPU ms/img", "cpu_ms_per_img", ".2f"), ("steps", "steps_per_round", "d"),
           ("epoch img/s", "epoch_imgs_per_s", ".1f"), ("1st wait s", "first_wait_s", ".3f"),
           ("1st batch cold s", "first_batch_s_cold", ".2f"), ("peak GiB", "peak_memory_gib", ".1f"),
           ("error", "error", "")]


def summarize(rows: list[Row], results: dict) -> list[dict]:
    """One dict per row that has timed runs (or an error); ratios against the reference row's runs
    of the same rounds, None while the reference has none (a partial write)."""
    out = []
    for row in rows:
        result = results[row.name]
        if not result["runs"]:
            if "error" in result:
                out.append({"name": row.name, "error": result["error"]})
            continue
        reference = results[getattr(row, "reference", "model only")]
        ratio = paired(result, reference) if reference["runs"] else {"median": None, "min": None, "max": None}
        e2e = isinstance(row, LoaderRow) and ratio["median"] is not None
        wall_s = sum(r["wall_s"] for r in result["runs"])
        peaks = [r["peak_memory_gib"] for r in result["runs"] if r.get("peak_memory_gib") is not None]
        summary = {"name": row.name, **stats(result), "of_model_only": ratio["median"],
                   "stall": 1 - ratio["median"] if e2e else None,
                   "stall_min": 1 - ratio["max"] if e2e else None, "stall_max": 1 - ratio["min"] if e2e else None,
                   "augment_share": 1 - ratio["median"] if row.name == "model + augment" and ratio["median"] else None,
                   "wait_pct": 100 * sum(r["wait_s"] for r in result["runs"]) / wall_s if e2e else None,
                   "steps_per_round": result["runs"][0]["steps"], "peak_memory_gib": max(peaks) if peaks else None}
        if isinstance(row, LoaderRow):  # whole epochs, start included, and each epoch's first wait apart
            runs = result["runs"]
            summary["epoch_imgs_per_s"] = sum(r["epoch_images"] for r in runs) / sum(r["epoch_wall_s"] for r in runs)
            summary["first_wait_s"] = statistics.median(w for r in runs for w in r["first_wait_s"])
            summary["timed_steps_per_round"] = runs[0]["steps"] - len(runs[0]["first_wait_s"]) * row.timed_from_step
        out.append(summary)
    return out


def bar(r: dict) -> tuple:
    if r.get("stall") is not None:
        note = f"stall {r['stall']:.0%}, waiting {r['wait_pct']:.0f}%"
    else:
        note = f"augment share {r['augment_share']:.0%}" if r.get("augment_share") is not None else ""
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

    def progress(results: dict):  # the JSON as rows complete: a cut-off run (a hang killed) keeps them
        report.write_partial(args, settings, summarize(rows, results))

    out = summarize(rows, measure(rows, rounds=args.rounds, who="train_fps", keep_going=True, progress=progress))
    measured = [r for r in out if "imgs_per_s" in r]
    best = max((r for r in measured if r["name"].startswith("model only")), key=lambda r: r["imgs_per_s"],
               default=None)
    setting = (f"{args.arch}, {args.image_size} px, batch {args.batch_size}, {settings['precision']}, "
               f"{'channels_last' if args.channels_last else 'contiguous'}{', compiled' if args.compile else ''}, "
               f"{args.workers} workers, {torch.get_num_threads()} torch threads, on {device}; {args.rounds} rounds of "
               f"{settings['model_steps_per_round']} model steps")
    result = report.write(args, setting, settings, out, COLUMNS, [bar(r) for r in measured],
                          "training images/s (median over rounds, min-max whiskers)",
                          reference=(measured[0]["imgs_per_s"], "model only") if measured else None,
                          modules=("torchvision", *[{"ffcv": "ffcv", "dali": "nvidia.dali"}[n] for n in
                                                     settings["steps_per_epoch"] if n != "torchvision"]),
                          best_model_only=best and {"row": best["name"], "imgs_per_s": best["imgs_per_s"]})
    if best:
        print(f"fastest model-only row: {best['name']}, {best['imgs_per_s']:.1f} img/s")
    failed = [r for r in out if "error" in r]
    if failed:
        raise UserError("train_fps: " + "; ".join(f"row {r['name']!r} failed: {r['error']}" for r in failed)
                        + f" (the other rows are in {args.json})")
    return result


if __name__ == "__main__":
    run_command(main)
