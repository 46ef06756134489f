"""The accelerator call's own checks (bench/accelerator.sh): its fatal preflight, the issues' "done
when" checks read from the JSON files its stages wrote, and, for the rehearsal, what would come back.

    python bench/accelerator_checks.py --preflight [--device cuda]    # exits 1 naming what is missing
    python bench/accelerator_checks.py WORK_DIR                        # writes WORK_DIR/checks.json
    python bench/accelerator_checks.py --returned OUT_DIR --call-rc N  # would OUT_DIR come back whole?

A check whose input is missing (its stage failed or was skipped) is reported as not measured.
"""
import argparse
import importlib
import importlib.util
import io
import json
import re
import sys
import tarfile
import tempfile
from pathlib import Path

from core.errors import ConfigError, run_command
from engine.metrics import write_json_atomic

MODEL_ONLY_TARGET_IMGS_PER_S = 25_000  # the captured step's goal on one H200
# Everything the call imports, the carried packages first: a missing one fails the preflight, not a stage.
MODULES = ("google_crc32c", "ffcv", "numba", "cv2", "yaml", "tqdm", "psutil", "matplotlib", "pytest", "train",
           "convert.to_shards", "convert.to_ffcv", "loaders.ffcv_loader", "bench.train_fps", "bench.loader_fps",
           "bench.decode_agreement", "bench.step_agreement")
STAGE_JSONS = {"step_agreement": "step_agreement.json", "train_fps_device": "train_fps_device.json",
               "decode_agreement": "decode_agreement.json", "train_fps_graphs": "train_fps_graphs.json",
               "train_fps_ffcv": "train_fps_ffcv.json", "train_bf16_graphs": "train_bf16_graphs/summary.json",
               "train_fp16_graphs": "train_fp16_graphs/summary.json"}
RETURNED = {"files": 8, "file_mb": 16, "total_mb": 64}  # what the device tool brings back from $OUT


def preflight(device_name: str) -> list[str]:
    """Imports, then a batched decode on the device and a tiny captured step, fused SGD and
    capturable RMSprop, fed by the device-decode loader whose thread decodes the next batch
    meanwhile. Returns what it saw; raises ConfigError naming what would fail a stage."""
    missing = {}  # what failed to import -> the modules of the call that need it
    for name in MODULES:
        try:
            if name == "train":  # a script beside the packages, not one of them
                spec = importlib.util.spec_from_file_location("train", Path(__file__).parents[1] / "train.py")
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            else:
                importlib.import_module(name)
        except Exception as e:  # ImportError, or a library that does not load (OSError)
            what = getattr(e, "name", None) or f"{name} ({type(e).__name__}: {e})"
            missing.setdefault(what, []).append(name)
    if missing:
        raise ConfigError("preflight: cannot import " + "; ".join(f"{m} (needed by {', '.join(n)})" for m, n in
                                                                  missing.items())
                          + ": carry it (bench/carry_ffcv.sh) or use a machine that has it")
    import google_crc32c
    import torch
    if google_crc32c.implementation != "c":  # every shard sample is checksummed as it is read
        raise ConfigError("preflight: google_crc32c runs its pure-Python fallback, which would slow every loader: "
                          "carry the wheel built for this Python (CARRY_PYTHON=X.Y bash bench/carry_ffcv.sh)")
    from convert.make_sample import make_sample
    from engine.distributed import setup
    from engine.optim import OptimizerConfig, build_optimizer
    from engine.precision import Precision
    from engine.step import WARMUP_STEPS, DeviceInput, TrainStep
    from loaders import build_loader
    from model import create_model
    device = setup(device_name).device
    data = Path(tempfile.mkdtemp(prefix="mnv3_preflight_"))
    make_sample(data, num_classes=2, train_per_class=8, val_per_class=2, workers=1)
    loader = build_loader("torchvision", split="train", data=data, batch_size=4, workers=1, image_size=32,
                          device=device, options={"decode": "device"})
    seen = [f"imports: {len(MODULES)} modules; decoding {loader.decoding}"]
    for name in ("sgd", "rmsprop"):
        torch.manual_seed(0)
        model = create_model("mobilenetv3_small_100", num_classes=2).to(device, memory_format=torch.channels_last)
        optimizer = build_optimizer(model, OptimizerConfig(name=name))
        step = TrainStep(model, optimizer, Precision.resolve(True, "bfloat16", device), device, cuda_graphs=True)
        losses, inputs, epoch = [], DeviceInput(), 0
        while len(losses) < WARMUP_STEPS + 3:  # warm-up, capture, replays
            loader.set_epoch(epoch)
            epoch += 1
            for images, labels in loader:
                if len(losses) == WARMUP_STEPS + 3:
                    break
                if images.shape != (4, 3, 32, 32) or images.device.type != device.type:
                    raise ConfigError(f"preflight: the device-decode loader gave {tuple(images.shape)} on {images.device}")
                losses.append(step(*inputs(images, labels, len(losses)), lr=0.01))
        captured = step.graph is not None and step.graph.graph is not None
        if not bool(torch.isfinite(torch.stack(losses)).all()):
            raise ConfigError(f"preflight: {name} ({optimizer.__class__.__name__}) gave non-finite losses")
        if device.type == "cuda" and not captured:
            raise ConfigError(f"preflight: {name} was not captured: {step.note}")
        seen.append(f"{name}: {len(losses)} steps, {'captured' if captured else 'eager: ' + str(step.note)}")
    return seen


def _load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _row(result, name: str):
    return next((r for r in (result or {}).get("rows", []) if r["name"] == name), None)


def checks(folder: Path) -> list[dict]:
    out = []

    def check(what: str, source, measured, ok, detail=""):  # source: the JSON, None when not measured
        partial = " (PARTIAL: its stage was cut off)" if (source or {}).get("partial") else ""
        measured = None if source is None else round(measured, 3) if isinstance(measured, float) else measured
        out.append({"check": what, "measured": measured, "met": None if measured is None else bool(ok),
                    "detail": (detail or "") + partial})

    stages = folder / "stages.jsonl"
    for stage in map(json.loads, stages.read_text().splitlines() if stages.exists() else []):
        ran = not stage.get("skipped")
        check(f"stage {stage['stage']}", stage, stage.get("rc", "skipped"), stage.get("rc") == 0,
              f"{stage['wall_s']} s of {stage['limit_s']}" if ran else "")
    device, graphs, ffcv = (_load(folder, f"train_fps_{name}.json") for name in ("device", "graphs", "ffcv"))
    decode, agree = _load(folder, "decode_agreement.json"), _load(folder, "step_agreement.json")
    eager, graphed, e2e = (_row(device, name) or {} for name in ("model only", "model only, graphed", "e2e torchvision"))
    step = (device or {}).get("settings", {}).get("e2e_step")
    check("end to end with device decode: stall < 5%", e2e and device, e2e.get("stall"),
          (e2e.get("stall") or 1) < 0.05, f"against the {step} model-only row")
    check("end to end with device decode: >= 0.95 of model only", e2e and device, e2e.get("of_model_only"),
          (e2e.get("of_model_only") or 0) >= 0.95, e2e and f"{e2e['imgs_per_s']:.0f} img/s, "
                                                          f"{e2e['cores_used']:.1f} host cores")
    check("device-decoded pixels: mean |difference| from the host path (levels)", decode,
          decode and round(decode["mean_abs_diff"], 3), decode and decode["labels_equal"] and decode["mean_abs_diff"] < 2,
          decode and f"max {decode['max_abs_diff']}, {100 * decode['share_within_1']:.1f}% within 1, "
                     f"decoded {decode['decoding']}")
    best = max([r["best_model_only"] for r in (graphs, device) if r], key=lambda b: b["imgs_per_s"], default=None)
    check(f"best model-only >= {MODEL_ONLY_TARGET_IMGS_PER_S:,} img/s", best and (graphs or device),
          best and round(best["imgs_per_s"]), best and best["imgs_per_s"] >= MODEL_ONLY_TARGET_IMGS_PER_S,
          best and best["row"])
    check("graphed >= 2x eager at the base batch", graphed and device, graphed.get("of_model_only"),
          (graphed.get("of_model_only") or 0) >= 2,
          graphed and f"{graphed['imgs_per_s']:.0f} vs {eager['imgs_per_s']:.0f} img/s")
    check("graphed vs eager: largest relative loss difference", agree, agree and agree["max_rel_diff"],
          agree and agree["captured"] and agree["max_rel_diff"] < 0.05,
          agree and f"{len(agree['loss']['eager'])} steps, {agree['settings']['precision']}"
                    f"{'' if agree['captured'] else ', NOT captured: ' + str(agree['note'])}")
    ffcv_e2e = _row(ffcv, "e2e ffcv") or {}
    check("FFCV --preset fast end to end: >= 0.95 of model only", ffcv_e2e and ffcv, ffcv_e2e.get("of_model_only"),
          (ffcv_e2e.get("of_model_only") or 0) >= 0.95,
          ffcv_e2e and f"{ffcv_e2e['imgs_per_s']:.0f} img/s on {ffcv_e2e['cores_used']:.1f} host cores")
    for run in sorted(folder.glob("train_*/summary.json")):
        summary, name = json.loads(run.read_text()), run.parent.name
        if e2e and step == "graphed" and summary.get("cuda_graphs") and summary.get("precision") == "bf16":
            ratio = summary["imgs_per_s"] / e2e["imgs_per_s"]
            check(f"train.py {name}: FPS within 10% of train_fps's", summary, round(ratio, 3), abs(ratio - 1) <= 0.10,
                  f"{summary['imgs_per_s']:.0f} vs {e2e['imgs_per_s']:.0f} img/s")
        check(f"train.py {name}: ran (Acc@1 of its short run)", summary, round(summary["acc1"], 2), True,
              f"{summary['precision']}, cuda_graphs {summary.get('cuda_graphs')}, {summary['imgs_per_s']:.0f} img/s")
    return out


def returned(out_dir: Path, call_rc: int) -> list[str]:
    """The rehearsal's verdict on what the device tool would bring back from OUT_DIR: problems, or []."""
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    problems = [f"{len(files)} files in {out_dir}: the device tool brings back {RETURNED['files']}"] \
        if len(files) > RETURNED["files"] else []
    problems += [f"{p}: {p.stat().st_size / 2 ** 20:.1f} MiB, over {RETURNED['file_mb']}" for p in files
                 if p.stat().st_size > RETURNED["file_mb"] * 2 ** 20]
    problems += [f"{p}: a name or depth the device tool leaves behind" for p in files
                 if not re.fullmatch(r"[A-Za-z0-9._-]+", p.name) or len(p.relative_to(out_dir).parts) > 3]
    if sum(p.stat().st_size for p in files) > RETURNED["total_mb"] * 2 ** 20:
        problems.append(f"{out_dir} holds over {RETURNED['total_mb']} MiB")
    log = (out_dir / "accelerator.log").read_text() if (out_dir / "accelerator.log").exists() else ""
    problems += [f"the log: {line.strip()}" for line in log.splitlines()
                 if re.search(r"(ModuleNotFoundError|ImportError|cannot import|skipped, \d+ s of the budget)", line)]
    if not (out_dir / "results.tar.gz").exists():
        return problems + [f"no results.tar.gz in {out_dir}"]
    with tarfile.open(out_dir / "results.tar.gz") as tar:
        names = {Path(n).as_posix().removeprefix("./") for n in tar.getnames()}
        stages = [json.loads(line) for line in tar.extractfile("./stages.jsonl").read().decode().splitlines()]
        done = json.load(io.TextIOWrapper(tar.extractfile("./checks.json"))) if "checks.json" in names else []
    problems += [f"stage {s['stage']}: " + ("skipped: the budget ran out" if s.get("skipped") else
                                            f"rc {s['rc']} after {s['wall_s']} s (limit {s['limit_s']} s)")
                 for s in stages if s.get("skipped") or s["rc"] != 0]
    ran = {s["stage"] for s in stages}
    problems += [f"stage {name} wrote no {path}" for name, path in STAGE_JSONS.items()
                 if name in ran and path not in names]
    problems += [f"checks.json lacks {c!r}" for c in ("graphed vs eager: largest relative loss difference",
                                                       "end to end with device decode: stall < 5%")
                 if c not in {d["check"] for d in done}]
    if call_rc != 0 and not problems:
        problems.append(f"the call exited {call_rc}")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", type=Path, help="the folder bench/accelerator.sh measured into")
    p.add_argument("--preflight", action="store_true", help="import everything, decode and capture once")
    p.add_argument("--device", default="cuda", help="--preflight: where (cuda, or cpu for the rehearsal)")
    p.add_argument("--returned", type=Path, help="the rehearsal: check what the call left in this $OUT")
    p.add_argument("--call-rc", type=int, default=0, help="--returned: the call's exit status")
    args = p.parse_args(argv)
    if args.preflight:
        for line in preflight(args.device):
            print(f"preflight: {line}")
        return 0
    if args.returned:
        problems = returned(args.returned, args.call_rc)
        for line in problems:
            print(f"rehearse: {line}")
        if problems:
            raise ConfigError(f"rehearse: {len(problems)} problems: the call above would not bring back what it "
                              f"should")
        print(f"rehearse: {args.returned} would come back whole: {', '.join(sorted(x.name for x in args.returned.iterdir()))}")
        return 0
    if args.folder is None or not args.folder.is_dir():
        raise ConfigError("usage: python bench/accelerator_checks.py WORK_DIR (the folder bench/accelerator.sh "
                          "measured into)")
    result = checks(args.folder)
    for c in result:
        state = {True: "MET ", False: "MISS", None: "----"}[c["met"]]
        measured = "not measured" if c["measured"] is None else c["measured"]
        print(f"{state}  {c['check']}: {measured}{'  (' + c['detail'] + ')' if c['detail'] else ''}")
    write_json_atomic(result, args.folder / "checks.json")
    return result


if __name__ == "__main__":
    run_command(main)
