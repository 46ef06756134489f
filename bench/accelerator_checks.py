"""The accelerator call's own checks (bench/accelerator.sh): its preflight, the issues' "done when"
checks read from the JSON files its stages wrote, and, for the rehearsal, what would come back.

    python bench/accelerator_checks.py --preflight WORK_DIR [--device cuda]   # exits 1 only if nothing can run
    python bench/accelerator_checks.py WORK_DIR                                # writes WORK_DIR/checks.json
    python bench/accelerator_checks.py --returned OUT_DIR --call-rc N [--faults S:hang,...] [--without PART]

The preflight names the machine and decides what runs. Fatal only: torch, the device, and one
captured training step. Then each optional part, written to WORK_DIR/parts.txt as soon as it is
known ("PART ok" or "PART <why not>"); accelerator.sh skips the stages that need a part that is
not ok, with the reason. A check whose input is missing (its stage failed or was skipped) is
reported as not measured. Nothing here imports torch but the preflight (packing runs after every
stage).
"""
import argparse
import io
import json
import os
import platform
import re
import subprocess
import tarfile
import time
from pathlib import Path

import yaml

from bench.harness import TARGETS, device_targets
from core.errors import ConfigError, run_command

# The optional parts, in the order probed (most stages first), and what each gates in accelerator.sh.
PARTS = {"google_crc32c": "the shards' checksums in C: the dataset and every stage that reads it",
         "nvjpeg": "a batched JPEG decode on the device: --decode device (train.py, train_fps_device, "
                   "decode_agreement)",
         "ffcv": "FFCV, numba and cv2 from the carry: the .beton and train_fps_ffcv"}
STAGE_JSONS = {"step_agreement": "step_agreement.json", "train_fps_device": "train_fps_device.json",
               "decode_agreement": "decode_agreement.json", "train_fps_ffcv": "train_fps_ffcv.json",
               "train_bf16_graphs": "train_bf16_graphs/summary.json",
               "train_fp16_graphs": "train_fp16_graphs/summary.json"}  # and train_fps_b<N>: train_fps_b<N>.json
RETURNED = {"files": 8, "file_mb": 16, "total_mb": 64}  # what the device tool brings back from $OUT


def write_json(obj, path: Path):
    """Atomically (a reader never sees half a file), without engine.metrics' torch import."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# -- the preflight ---------------------------------------------------------------------------------
class Preflight:
    """What the preflight found, written to WORK_DIR after every finding: a cut-off preflight
    leaves what it knew, and a part it never reached is not ok."""

    def __init__(self, work: Path):
        self.work, self.found = work, {"machine": None, "device_line": None, "target_set": None, "batch_sweep": [],
                                       "fatal": None, "parts": {}}

    def record(self, key: str, value):
        self.found[key] = value
        self.save()

    def part(self, name: str, ok: bool, detail: str):
        self.found["parts"][name] = {"ok": ok, "detail": detail}
        print(f"preflight: {name}: {'ok' if ok else 'MISSING'}: {detail}", flush=True)
        self.save()

    def save(self):
        write_json(self.found, self.work / "preflight.json")
        lines = [f"{name} {'ok' if p['ok'] else 'missing: ' + p['detail']}" for name, p in self.found["parts"].items()]
        (self.work / "parts.txt").write_text("".join(f"{line}\n" for line in lines))


def machine(device) -> dict:
    """GPU name, memory, driver, CUDA, torch, torchvision, Python: the device line of the log."""
    import torch
    import torchvision
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", driver=driver_version())
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    return info


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_line(info: dict, target_set: str | None) -> str:
    if info["gpu"]:
        where = (f"{info['gpu']}, {info['memory_gib']} GiB, capability {info['capability']}, driver "
                 f"{info['driver'] or '?'}, CUDA {info['cuda']}")
    else:
        where = f"{info['device']} ({info['cpu']}, {info['cores']} cores)"
    return (f"{where}; torch {info['torch']}, torchvision {info['torchvision']}, Python {info['python']}; "
            f"targets: {target_set or 'none for this device (ratios only)'}")


def batch_sweep(info: dict, target_values: dict) -> list[int]:
    """The batch sizes beyond 256 to measure, each in its own process: the card's set's, or, for a
    card with none, multiples of 256 whose eager + graphed rows fit 85% of its memory at the stated
    MiB per image (bench/targets.yaml; the rest: the CUDA context, cuDNN workspaces, fragmentation)."""
    if target_values.get("batch_sweep"):
        return list(target_values["batch_sweep"])
    if not info.get("memory_gib"):
        return []
    fits = int(0.85 * info["memory_gib"] * 1024 / yaml.safe_load(TARGETS.read_text())["sweep_mib_per_image"])
    return [size for size in (512, 768, 1024) if size <= fits][-2:]


def captured_step(device) -> str:
    """The fatal check: a tiny model trained WARMUP_STEPS eagerly, captured, and replayed with the
    trainer's optimiser (capturable RMSprop) in bf16, on batches made on the device."""
    import torch
    from engine.optim import OptimizerConfig, build_optimizer
    from engine.precision import Precision
    from engine.step import WARMUP_STEPS, DeviceInput, TrainStep
    from model import create_model
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_100", num_classes=2).to(device, memory_format=torch.channels_last)
    # bf16 on the GPU, as the call trains; the CPU stand-in's fast type (fp32 without AMX: oneDNN's bf16
    # kernels compile for every conv shape first, minutes under load)
    precision = Precision.resolve(True, "bfloat16" if device.type == "cuda" else "auto", device)
    step = TrainStep(model, build_optimizer(model, OptimizerConfig()), precision, device, cuda_graphs=True)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (4,), device=device)
    inputs = DeviceInput()
    losses = [step(*inputs(images.contiguous(memory_format=torch.channels_last), labels, i), lr=0.01)
              for i in range(WARMUP_STEPS + 3)]
    if not bool(torch.isfinite(torch.stack(losses)).all()):
        raise ConfigError("preflight: the captured step gave non-finite losses")
    if device.type == "cuda" and not step.captured:
        raise ConfigError(f"preflight: the step was not captured: {step.note}")
    return f"{len(losses)} steps, " + ("captured and replayed" if step.captured else f"eager ({step.note})")


def probe_crc32c() -> str:
    import google_crc32c
    if google_crc32c.implementation != "c":  # every shard sample is checksummed as it is read
        raise ConfigError("google_crc32c runs its pure-Python fallback, which would slow every loader: carry the "
                          "wheel built for this Python (CARRY_PYTHON=X.Y bash bench/carry_ffcv.sh)")
    return "C implementation"


def probe_nvjpeg(device) -> str:
    """A batch of two JPEG sizes decoded on the device, against the host's decode."""
    import torch
    from torchvision.io import encode_jpeg
    from loaders.device_decode import DECODER, decode_image, decode_jpegs
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ((48, 64), (40, 40))]
    blobs = [encode_jpeg(image, quality=95) for image in images]
    decoded = decode_jpegs(blobs, device)
    for blob, image in zip(blobs, decoded):
        host = decode_image(blob)
        if image.device.type != device.type or image.shape != host.shape:
            raise ConfigError(f"a {tuple(host.shape)} JPEG came back as {tuple(image.shape)} on {image.device}")
        diff = (image.cpu().float() - host.float()).abs().mean().item()
        if diff > 3:
            raise ConfigError(f"decoded on {device} {diff:.1f} levels from the host's decode")
    return f"{len(blobs)} JPEGs decoded on {device} by {DECODER}"


def probe_ffcv() -> str:
    import cv2
    import ffcv
    import numba
    import convert.to_ffcv  # noqa: F401
    import loaders.ffcv_loader  # noqa: F401
    return f"ffcv {getattr(ffcv, '__version__', '?')}, numba {numba.__version__}, cv2 {cv2.__version__}"


def preflight(work: Path, device_name: str, fault: str | None = None) -> Preflight:
    """Fatal: torch, the device, one captured step (ConfigError). Then every optional part, each
    recorded ok or not with its reason; `fault` ("part:NAME") marks that part missing, as a test."""
    found = Preflight(work)
    import torch
    from engine.distributed import setup
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"preflight: torch {torch.__version__} sees no CUDA device: nothing to measure")
    device = setup(device_name).device
    info = machine(device)
    target_set, target_values = device_targets(info["gpu"])
    found.record("machine", info)
    found.record("target_set", target_set)
    found.record("batch_sweep", batch_sweep(info, target_values))
    found.record("device_line", device_line(info, target_set))
    print(f"preflight: device: {found.found['device_line']}", flush=True)
    t0 = time.perf_counter()
    found.record("fatal", {"ok": True, "detail": captured_step(device), "s": round(time.perf_counter() - t0, 1)})
    print(f"preflight: capture: {found.found['fatal']['detail']} ({found.found['fatal']['s']} s)", flush=True)
    probes = {"google_crc32c": probe_crc32c, "nvjpeg": lambda: probe_nvjpeg(device), "ffcv": probe_ffcv}
    for name, probe in probes.items():
        if fault == f"part:{name}":
            found.part(name, False, "FAULT: marked missing by the rehearsal")
            continue
        try:
            found.part(name, True, probe())
        except Exception as e:  # a missing module, a library that does not load, a decoder that fails
            found.part(name, False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    return found


# -- the checks --------------------------------------------------------------------------------------
def _load(folder: Path, name: str):
    path = folder / name
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None


def _row(result, name: str):
    return next((r for r in (result or {}).get("rows", []) if r["name"] == name and "imgs_per_s" in r), None)


def checks(folder: Path) -> dict:
    """The verdict: the machine, the target set it was judged by, and each check MET, MISS or not
    measured."""
    found = _load(folder, "preflight.json") or {}
    gpu = (found.get("machine") or {}).get("gpu")
    target_set, targets = device_targets(gpu)
    out = []

    def check(what: str, source, measured, ok, detail=""):  # source: the JSON, None when not measured
        partial = " (PARTIAL: its stage was cut off)" if (source or {}).get("partial") else ""
        measured = None if source is None or measured is None else round(measured, 3) if isinstance(measured, float) \
            else measured
        out.append({"check": what, "measured": measured, "met": None if measured is None or ok is None else bool(ok),
                    "detail": (detail or "") + partial})

    stages = folder / "stages.jsonl"
    for stage in map(json.loads, stages.read_text().splitlines() if stages.exists() else []):
        if stage.get("skipped"):
            check(f"stage {stage['stage']}", stage, "skipped", False, stage.get("reason", ""))
        else:
            check(f"stage {stage['stage']}", stage, stage["rc"], stage["rc"] == 0,
                  f"{stage['wall_s']} s of {stage['limit_s']}" + (f"; {stage['note']}" if stage.get("note") else ""))
    for name, part in found.get("parts", {}).items():
        check(f"part {name}", found, "ok" if part["ok"] else "missing", part["ok"], part["detail"])
    device = _load(folder, "train_fps_device.json")
    sweep = [r for r in (_load(folder, p.name) for p in sorted(folder.glob("train_fps_b*.json"))) if r]
    decode, agree, ffcv = (_load(folder, f"{n}.json") for n in ("decode_agreement", "step_agreement", "train_fps_ffcv"))
    eager, graphed, e2e = (_row(device, name) or {} for name in ("model only", "model only, graphed", "e2e torchvision"))
    step = (device or {}).get("settings", {}).get("e2e_step")
    check("end to end with device decode: stall < 5%", e2e and device, e2e.get("stall"),
          (e2e.get("stall") or 1) < 0.05, e2e and f"against the {step} model-only row, steps "
                                                  f"{(device['settings'].get('e2e_timed_from_step') or {}).get('torchvision', '?')}+ "
                                                  f"of each epoch; first wait {e2e.get('first_wait_s') or 0:.3f} s apart")
    check("end to end with device decode: >= 0.95 of model only", e2e and device, e2e.get("of_model_only"),
          (e2e.get("of_model_only") or 0) >= 0.95, e2e and f"{e2e['imgs_per_s']:.0f} img/s, "
                                                          f"{e2e['cores_used']:.1f} host cores")
    check("device-decoded pixels: mean |difference| from the host path (levels)", decode,
          decode and decode["mean_abs_diff"], decode and decode["labels_equal"] and decode["mean_abs_diff"] < 2,
          decode and f"max {decode['max_abs_diff']}, {100 * decode['share_within_1']:.1f}% within 1, "
                     f"decoded {decode['decoding']}")
    bests = [r["best_model_only"] for r in [device, *sweep] if r and r.get("best_model_only")]
    best = max(bests, key=lambda b: b["imgs_per_s"], default=None)
    goal = targets.get("model_only_imgs_per_s")
    check(f"best model-only >= {goal:,} img/s ({target_set})" if goal else "best model-only img/s (no target here)",
          best and (device or sweep[0]), best and round(best["imgs_per_s"]), goal and best["imgs_per_s"] >= goal,
          best and best["row"])
    ratio = targets.get("graphed_x_eager")
    check(f"graphed >= {ratio}x eager at the base batch ({target_set})" if ratio else "graphed over eager (no target)",
          graphed and device, graphed.get("of_model_only"), ratio and (graphed.get("of_model_only") or 0) >= ratio,
          graphed and f"{graphed['imgs_per_s']:.0f} vs {eager['imgs_per_s']:.0f} img/s")
    for run in sweep:
        for row in run.get("rows", []):
            if "error" in row:
                check(f"batch sweep: {row['name']}", run, "failed", False, row["error"])
    here = agree and not agree["captured"] and agree["settings"]["device"] == "cpu"  # the rehearsal: nothing to capture
    check("graphed vs eager: largest relative loss difference", agree, agree and agree["max_rel_diff"],
          None if here else agree and agree["captured"] and agree["max_rel_diff"] < 0.05,
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
            check(f"train.py {name}: FPS within 10% of train_fps's (the same window)", summary, ratio,
                  abs(ratio - 1) <= 0.10, f"{summary['imgs_per_s']:.0f} vs {e2e['imgs_per_s']:.0f} img/s")
        check(f"train.py {name}: ran (Acc@1 of its short run)", summary, round(summary["acc1"], 2), True,
              f"{summary['precision']}, cuda_graphs {summary.get('cuda_graphs')}, {summary['imgs_per_s']:.0f} img/s")
    return {"device": found.get("device_line"), "target_set": target_set, "targets": targets, "checks": out}


# -- the rehearsal's verdict -------------------------------------------------------------------------
def returned(out_dir: Path, call_rc: int, faults: dict | None = None, without: str | None = None) -> list[str]:
    """The rehearsal's verdict on what the device tool would bring back from OUT_DIR: problems, or [].
    faults: {stage: "hang" | "fail"} injected on purpose: those stages must have failed, every other
    one must have run and written its JSON. without: a part left out on purpose: the preflight
    must name it missing and exactly the stages that need it must be skipped, saying so."""
    faults = faults or {}
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
                 if re.search(r"(ModuleNotFoundError|ImportError|cannot import|skipped: \d+ s of the budget)", line)
                 and not (without and without in line)]
    if "preflight: device: " not in log:
        problems.append("the log has no device line from the preflight")
    if not (out_dir / "results.tar.gz").exists():
        return problems + [f"no results.tar.gz in {out_dir}"]
    with tarfile.open(out_dir / "results.tar.gz") as tar:
        names = {Path(n).as_posix().removeprefix("./") for n in tar.getnames()}
        stages = [json.loads(line) for line in tar.extractfile("./stages.jsonl").read().decode().splitlines()]
        verdict = json.load(io.TextIOWrapper(tar.extractfile("./checks.json"))) if "checks.json" in names else {}
    for s in stages:
        if s["stage"] in faults:
            if s.get("skipped") or s["rc"] == 0:
                problems.append(f"stage {s['stage']}: the injected {faults[s['stage']]} did not fail it")
        elif s.get("skipped"):
            if not (without and without in s.get("reason", "")):
                problems.append(f"stage {s['stage']}: skipped: {s.get('reason')}")
        elif s["rc"] != 0:
            problems.append(f"stage {s['stage']}: rc {s['rc']} after {s['wall_s']} s (limit {s['limit_s']} s)")
    ran = {s["stage"] for s in stages if not s.get("skipped") and s["stage"] not in faults}
    expected = {**STAGE_JSONS, **{s: f"{s}.json" for s in ran if s.startswith("train_fps_b")}}
    problems += [f"stage {name} wrote no {path}" for name, path in expected.items() if name in ran and path not in names]
    problems += [f"stage {name}, made to {kind}, left no record" for name, kind in faults.items()
                 if name not in {s["stage"] for s in stages}]
    done = {c["check"] for c in verdict.get("checks", [])}
    problems += [f"checks.json lacks {c!r}" for c in ("graphed vs eager: largest relative loss difference",
                                                       "end to end with device decode: stall < 5%") if c not in done]
    if "target_set" not in verdict:
        problems.append("checks.json names no target set")
    if without and f"part {without}" not in done:
        problems.append(f"the preflight did not report {without} missing")
    if call_rc != 0 and not problems and not faults and not without:
        problems.append(f"the call exited {call_rc}")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", type=Path, help="the folder bench/accelerator.sh measures into")
    p.add_argument("--preflight", action="store_true", help="name the machine, capture once, probe the optional parts")
    p.add_argument("--device", default="cuda", help="--preflight: where (cuda, or cpu for the rehearsal)")
    p.add_argument("--fault", default=None, help="--preflight: part:NAME marks that part missing (a rehearsal)")
    p.add_argument("--returned", type=Path, help="the rehearsal: check what the call left in this $OUT")
    p.add_argument("--call-rc", type=int, default=0, help="--returned: the call's exit status")
    p.add_argument("--faults", default="", help="--returned: STAGE:hang|fail,... injected on purpose")
    p.add_argument("--without", default=None, help="--returned: the part left out on purpose")
    args = p.parse_args(argv)
    if args.returned:
        faults = dict(f.split(":", 1) for f in args.faults.split(",") if f and not f.startswith("part:"))
        problems = returned(args.returned, args.call_rc, faults, args.without)
        for line in problems:
            print(f"rehearse: {line}")
        if problems:
            raise ConfigError(f"rehearse: {len(problems)} problems: the call above would not bring back what it "
                              f"should")
        print(f"rehearse: {args.returned} would come back whole: {', '.join(sorted(x.name for x in args.returned.iterdir()))}")
        return 0
    if args.folder is None:
        raise ConfigError("usage: python bench/accelerator_checks.py [--preflight] WORK_DIR (the folder "
                          "bench/accelerator.sh measures into)")
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.preflight:
        preflight(args.folder, args.device, args.fault)
        return 0
    verdict = checks(args.folder)
    print(f"device: {verdict['device']}\ntarget set: {verdict['target_set'] or 'none (ratios only)'}")
    for c in verdict["checks"]:
        state = {True: "MET ", False: "MISS", None: "----"}[c["met"]]
        measured = "not measured" if c["measured"] is None else c["measured"]
        print(f"{state}  {c['check']}: {measured}{'  (' + c['detail'] + ')' if c['detail'] else ''}")
    write_json(verdict, args.folder / "checks.json")
    return 0


if __name__ == "__main__":
    run_command(main)
