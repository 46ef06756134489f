"""The accelerator run's "done when" checks, read from the JSON files bench/accelerator.sh wrote:
decoding on the device (loader alone, end to end, pixels) and the captured step (model-only
throughput, graphed against eager, agreement, the trainer against the benchmark).

    python bench/accelerator_checks.py OUT_DIR        # after bash bench/accelerator.sh; writes OUT_DIR/checks.json

A check whose input is missing (its stage failed or was skipped) is reported as not measured.
"""
import json
import sys
from pathlib import Path

from core.errors import ConfigError, run_command
from engine.metrics import write_json_atomic

MODEL_ONLY_TARGET_IMGS_PER_S = 25_000  # the captured step's goal on one H200


def _load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _row(result, name: str):
    return next((r for r in (result or {}).get("rows", []) if r["name"] == name), None)


def checks(folder: Path) -> list[dict]:
    out = []

    def check(what: str, measured, ok, detail: str = ""):
        out.append({"check": what, "measured": measured, "met": None if measured is None else bool(ok),
                    "detail": detail})

    device_e2e = _load(folder, "train_fps_device.json")
    loader = _load(folder, "loader_fps.json")
    decode = _load(folder, "decode_agreement.json")
    graphs = _load(folder, "train_fps_graphs.json")
    agreement = _load(folder, "step_agreement.json")

    model_only = _row(device_e2e, "model only")
    device_loader = _row(loader, "torchvision device-decode")
    if model_only and device_loader:
        ratio = device_loader["imgs_per_s"] / model_only["imgs_per_s"]
        check("device-decode loader alone >= 2x model only", round(ratio, 2), ratio >= 2,
              f"{device_loader['imgs_per_s']:.0f} vs {model_only['imgs_per_s']:.0f} img/s")
    else:
        check("device-decode loader alone >= 2x model only", None, None)
    check("device-decode loader uses <= 4 host cores", device_loader and round(device_loader["cores_used"], 2),
          device_loader and device_loader["cores_used"] <= 4)
    e2e = _row(device_e2e, "e2e torchvision")
    step = (device_e2e or {}).get("settings", {}).get("e2e_step")
    check("end to end with device decode: stall < 5%", e2e and round(e2e["stall"], 3), e2e and e2e["stall"] < 0.05,
          f"against the {step} model-only row" if e2e else "")
    check("end to end with device decode: >= 0.95 of model only", e2e and round(e2e["of_model_only"], 3),
          e2e and e2e["of_model_only"] >= 0.95)
    check("device-decoded pixels: mean |difference| from the host path (levels)",
          decode and round(decode["mean_abs_diff"], 3),
          decode and decode["labels_equal"] and decode["mean_abs_diff"] < 2,
          decode and f"max {decode['max_abs_diff']}, {100 * decode['share_within_1']:.1f}% within 1, "
                     f"decoded {decode['decoding']}")

    best = (graphs or {}).get("best_model_only")
    check(f"best model-only >= {MODEL_ONLY_TARGET_IMGS_PER_S:,} img/s", best and round(best["imgs_per_s"]),
          best and best["imgs_per_s"] >= MODEL_ONLY_TARGET_IMGS_PER_S, best and best["row"])
    eager, graphed = _row(graphs, "model only"), _row(graphs, "model only, graphed")
    check("graphed >= 2x eager at the base batch", graphed and round(graphed["of_model_only"], 2),
          graphed and graphed["of_model_only"] >= 2,
          graphed and f"{graphed['imgs_per_s']:.0f} vs {eager['imgs_per_s']:.0f} img/s")
    check("graphed vs eager: largest relative loss difference", agreement and agreement["max_rel_diff"],
          agreement and agreement["captured"] and agreement["max_rel_diff"] < 0.05,
          agreement and f"{agreement['settings']['steps']} steps, {agreement['settings']['precision']}"
                        f"{'' if agreement['captured'] else ', NOT captured: ' + str(agreement['note'])}")
    e2e_graphed = _row(device_e2e, "e2e torchvision") if step == "graphed" else None
    for run in sorted(folder.glob("train_*/summary.json")):
        summary = json.loads(run.read_text())
        name = run.parent.name
        if e2e_graphed and summary.get("cuda_graphs") and summary.get("precision") == "bf16":
            ratio = summary["imgs_per_s"] / e2e_graphed["imgs_per_s"]
            check(f"train.py {name}: FPS within 10% of train_fps's", round(ratio, 3), abs(ratio - 1) <= 0.10,
                  f"{summary['imgs_per_s']:.0f} vs {e2e_graphed['imgs_per_s']:.0f} img/s")
        check(f"train.py {name}: ran (Acc@1 of its short run)", round(summary["acc1"], 2), True,
              f"{summary['precision']}, cuda_graphs {summary.get('cuda_graphs')}, {summary['imgs_per_s']:.0f} img/s")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        raise ConfigError("usage: python bench/accelerator_checks.py OUT_DIR (the folder bench/accelerator.sh wrote)")
    folder = Path(argv[0])
    result = checks(folder)
    for c in result:
        state = {True: "MET ", False: "MISS", None: "----"}[c["met"]]
        measured = "not measured" if c["measured"] is None else c["measured"]
        print(f"{state}  {c['check']}: {measured}{'  (' + c['detail'] + ')' if c['detail'] else ''}")
    write_json_atomic(result, folder / "checks.json")
    return result


if __name__ == "__main__":
    run_command(main)
