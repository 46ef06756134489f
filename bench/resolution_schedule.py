"""Time to accuracy with a resolution schedule: for each loader, train.py run twice on the same
data, at a fixed resolution and with FFCV's progressive resizing up to it; mean epoch wall time
and final Acc@1 side by side.

    python bench/resolution_schedule.py [--data DIR] [--loaders ffcv,dali,torchvision] [--epochs 8]
                                        [--min-res 96] [--max-res 160] [--json PATH]    (--help: all)

Both runs of a loader use the same seed, recipe and val resolution (--max-res), and differ only in
the train resolution: fixed at --max-res, or --min-res until --start-ramp (default 3/4 of the
epochs), then ramped to --max-res at --end-ramp (default the last; engine/resolution.py). The two
run one after the other, in alternating order from loader to loader. wall ratio = scheduled /
fixed mean epoch wall time (train and evaluation; the first epoch, with the loader's start-up and
FFCV's JIT, left out); Acc@1 drop = fixed - scheduled, in points. The short-run check: the fixed
run (at --bn-momentum's default, auto) again at --bn-momentum 0.1, with torchvision (bitwise
repeatable) or the first loader; its Acc@1 beside the fixed run's shows a short run that
evaluates at chance with the defaults (BatchNorm statistics that did not settle).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import Report, add_output_flags, cores
from convert.default_data import ensure_sample
from core.errors import ConfigError, UserError, run_command
from loaders import LOADERS

REPO = Path(__file__).resolve().parent.parent
COLUMNS = [("loader", "name", ""), ("fixed s/epoch", "fixed_epoch_s", ".2f"),
           ("scheduled s/epoch", "scheduled_epoch_s", ".2f"), ("wall ratio", "wall_ratio", ".2f"),
           ("fixed Acc@1", "fixed_acc1", ".1f"), ("BN momentum", "bn_momentum", "g"),
           ("Acc@1 at BN 0.1", "bn01_acc1", ".1f"), ("scheduled Acc@1", "scheduled_acc1", ".1f"),
           ("Acc@1 drop", "acc1_drop", ".1f")]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="ImageNet-layout folder; default: the built-in sample dataset")
    p.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated subset of " + ",".join(LOADERS))
    p.add_argument("--epochs", type=int, default=8, help="epochs per run")
    p.add_argument("--min-res", type=int, default=96, help="the schedule's first resolution, px")
    p.add_argument("--max-res", type=int, default=160, help="the fixed run's resolution and the schedule's last")
    p.add_argument("--start-ramp", type=int, default=None,
                   help="the schedule's last epoch at --min-res (default: train.py's)")
    p.add_argument("--end-ramp", type=int, default=None,
                   help="the schedule's first epoch at --max-res (default: train.py's)")
    p.add_argument("--arch", default="mobilenetv3_small_100", help="model")
    p.add_argument("--batch-size", type=int, default=16, help="global batch")
    p.add_argument("--workers", type=int, default=cores(), help="loader workers")
    p.add_argument("--recipe", default=str(REPO / "configs" / "sample_cpu.yaml"),
                   help="train.py recipe both runs share (the demo's short CPU recipe)")
    p.add_argument("--bn-check", action=argparse.BooleanOptionalAction, default=True,
                   help="also the fixed run at --bn-momentum 0.1 (one loader): the defaults' Acc@1 beside it")
    add_output_flags(p, "resolution_schedule")
    return p


def train(args, data: Path, loader: str, out: Path, scheduled: bool, extra=()) -> list[dict]:
    """One real train.py run; its metrics.jsonl records."""
    ramp = [f for flag, v in (("--start-ramp", args.start_ramp), ("--end-ramp", args.end_ramp)) if v is not None
            for f in (flag, str(v))]
    resolution = (["--min-res", str(args.min_res), "--max-res", str(args.max_res), *ramp] if scheduled
                  else ["--image-size", str(args.max_res)])
    cmd = [sys.executable, str(REPO / "train.py"), "--config", args.recipe, "--data", str(data), "--loader", loader,
           "--arch", args.arch, "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
           "--workers", str(args.workers), "--val-res", str(args.max_res), "--output-dir", str(out), "--overwrite",
           "--checkpoint-every", "0", *resolution, *extra]
    kind = " ".join(["scheduled" if scheduled else "fixed", *extra])
    print(f"resolution_schedule: {loader}, {kind}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"resolution_schedule: train.py failed ({loader}):\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    names = [n.strip() for n in args.loaders.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        raise ConfigError(f"--loaders {','.join(unknown)}: choose from {','.join(LOADERS)}")
    if not 16 <= args.min_res <= args.max_res or args.epochs < 2:
        raise ConfigError("--min-res must be >= 16 and <= --max-res, and --epochs >= 2")
    report = Report("resolution_schedule", argv)
    data = ensure_sample(args.data, "resolution_schedule", loaders=names)
    rows, bn_loader = [], "torchvision" if "torchvision" in names else names[0]
    with tempfile.TemporaryDirectory() as tmp:
        for k, loader in enumerate(names):
            runs = {}
            for scheduled in ((False, True) if k % 2 == 0 else (True, False)):
                runs[scheduled] = train(args, data, loader, Path(tmp) / f"{loader}-{scheduled}", scheduled)
            fixed, sched = runs[False], runs[True]
            row = {"name": loader, "fixed_epoch_s": statistics.mean(r["epoch_wall_s"] for r in fixed[1:]),
                   "scheduled_epoch_s": statistics.mean(r["epoch_wall_s"] for r in sched[1:]),
                   "fixed_acc1": fixed[-1]["acc1"], "scheduled_acc1": sched[-1]["acc1"],
                   "scheduled_res_px": [r["res_px"] for r in sched], "val_images": fixed[-1]["val_images"]}
            row.update(wall_ratio=row["scheduled_epoch_s"] / row["fixed_epoch_s"],
                       acc1_drop=row["fixed_acc1"] - row["scheduled_acc1"])
            if args.bn_check and loader == bn_loader:
                config = json.loads((Path(tmp) / f"{loader}-False" / "config.json").read_text())
                row["bn_momentum"] = config["bn_momentum"]  # what auto gave the fixed run
                row["bn01_acc1"] = train(args, data, loader, Path(tmp) / f"{loader}-bn0.1", False,
                                         ["--bn-momentum", "0.1"])[-1]["acc1"]
            rows.append(row)
    setting = (f"{args.arch}, {args.epochs} epochs, batch {args.batch_size}, fixed {args.max_res} px vs "
               f"{args.min_res} -> {args.max_res} px, val at {args.max_res} px, on {data}")
    bars = [(f"{r['name']} {kind}", r[f"{kind}_epoch_s"], r[f"{kind}_epoch_s"], r[f"{kind}_epoch_s"],
             "#1f77b4" if kind == "fixed" else "#2ca02c", f"Acc@1 {r[f'{kind}_acc1']:.1f}")
            for r in rows for kind in ("fixed", "scheduled")]
    settings = {"data": str(data), "arch": args.arch, "epochs": args.epochs, "batch_size": args.batch_size,
                "workers": args.workers, "min_res_px": args.min_res, "max_res_px": args.max_res,
                "start_ramp": args.start_ramp, "end_ramp": args.end_ramp, "recipe": args.recipe,
                "bn_check_loader": bn_loader if args.bn_check else None}
    return report.write(args, setting, settings, rows, COLUMNS, bars,
                        "mean epoch wall time after the first, s (train + eval)")


if __name__ == "__main__":
    run_command(main)
