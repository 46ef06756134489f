"""bench/: the benchmarks run end to end on a tiny dataset and write the JSON and PNG they promise.

    python -m pytest -q tests/test_bench.py

Numbers are not asserted (timing belongs in bench/, not in tests); what is asserted: every row is
there, each row saw exactly the images of an epoch, ratios are consistent with the rows they come
from, a non-default --max-resolution / --write-mode converts into its own folder and leaves the
defaults alone, a run writes outside the tracked tree unless told otherwise, the harness's order
of work and its targets, and a bad --loaders names the flag.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import harness
from convert.make_sample import make_sample

REPO = Path(__file__).resolve().parent.parent
TRAIN_IMAGES = 2 * 8  # 2 classes x 8 train images
BATCH = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_sample(tmp_path_factory.mktemp("bench_data"), num_classes=2, train_per_class=8, val_per_class=2,
                       quiet=True)


def run(script: str, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, f"bench/{script}", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_loader_fps_measures_every_row_and_converts_non_defaults_apart(data, tmp_path):
    out = tmp_path / "loader_fps.json"
    proc = run("loader_fps.py", "--data", data, "--batch-size", BATCH, "--image-size", 32, "--epochs", 1,
               "--max-resolution", 96, "--write-mode", "raw", "--json", out)
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"stock", "ffcv", "ffcv bare", "dali", "dali bare", "torchvision", "torchvision bare",
                         "decode limit: .beton images (raw)", "decode limit: shard JPEGs",
                         "decode limit: original files"}
    for name, row in rows.items():
        # train drops the last partial batch; 16 images in batches of 4 leave none out
        assert row["images_per_epoch"] == TRAIN_IMAGES, name
        assert row["imgs_per_s"] > 0 and row["imgs_per_s_min"] <= row["imgs_per_s"] <= row["imgs_per_s_max"]
        assert row["peak_rss_mb"] > 0, name
    assert rows["stock"]["x_stock"] == pytest.approx(1.0)
    # one epoch: the paired ratio is the plain ratio of the two rows
    assert rows["ffcv"]["of_bare"] == pytest.approx(rows["ffcv"]["imgs_per_s"] / rows["ffcv bare"]["imgs_per_s"])
    assert rows["ffcv"]["of_limit"] == pytest.approx(
        rows["ffcv"]["imgs_per_s"] / rows["decode limit: .beton images (raw)"]["imgs_per_s"])
    assert rows["ffcv"]["first_batch_s_cold"] > 0
    assert [t["target"] for t in result["targets"]] == [
        "ffcv >= 4.0x stock", "ffcv within 5% of ffcv bare", "dali >= 1.2x stock", "dali within 5% of dali bare",
        "torchvision >= 1.3x stock", "torchvision within 5% of torchvision bare",
        "ffcv >= 70% of its decode limit"]
    # our torchvision loader reads the shards when they exist (DALI's row made them), so its bare row does too
    assert result["settings"]["reads"] == {"ffcv": "beton", "stock": "folder", "dali": "shards",
                                           "torchvision": "shards"}
    assert len(result["load_average_before"]) == 3
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert "decode limit: original files" in proc.stdout  # the table
    # the non-default settings went into their own folders; the default ones were not created
    assert (data / "ffcv-96px-raw" / "train.beton").exists() and list((data / "shards-96px").glob("train-*.idx"))
    assert not (data / "ffcv").exists() and not (data / "shards").exists()


def test_train_fps_reports_stall_per_loader(data, tmp_path):
    out = tmp_path / "train_fps.json"
    png = tmp_path / "chart.png"
    run("train_fps.py", "--data", data, "--loaders", "torchvision", "--device", "cpu", "--arch",
        "mobilenetv3_small_050", "--image-size", 32, "--batch-size", BATCH, "--steps", 2, "--rounds", 1,
        "--warmup-steps", 1, "--json", out, "--png", png)
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    try:
        import augment  # noqa: F401
        expected = {"model only", "model + augment", "e2e torchvision"}
    except ImportError:
        expected = {"model only", "e2e torchvision"}
    assert set(rows) == expected
    e2e = rows["e2e torchvision"]
    # whole epochs: 16 images in batches of 4 = 4 steps, at least --steps 2
    assert e2e["steps_per_round"] == TRAIN_IMAGES // BATCH
    assert rows["model only"]["steps_per_round"] == TRAIN_IMAGES // BATCH
    assert all(r["imgs_per_s"] > 0 for r in rows.values())
    assert e2e["stall"] == pytest.approx(1 - e2e["imgs_per_s"] / rows["model only"]["imgs_per_s"])
    assert 0 <= e2e["wait_pct"] <= 100
    # train.py's window: from step 5 of each epoch, clamped as train.py clamps it (4 steps: from step 3),
    # the epoch's start (its first wait) reported apart, and the whole epochs beside
    assert result["settings"]["e2e_timed_from_step"] == {"torchvision": 3}
    assert e2e["timed_steps_per_round"] == 1 and e2e["first_wait_s"] >= 0 and e2e["epoch_imgs_per_s"] > 0
    assert result["settings"]["device"] == "cpu" and result["targets"] == []  # no ffcv/dali row, no target
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_resolution_schedule_runs_the_trainer_twice_per_loader_and_compares(data, tmp_path):
    out = tmp_path / "resolution_schedule.json"
    run("resolution_schedule.py", "--data", data, "--loaders", "torchvision", "--epochs", 2, "--min-res", 32,
        "--max-res", 64, "--batch-size", BATCH, "--workers", 1, "--json", out)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["name"] == "torchvision" and row["scheduled_res_px"] == [32, 64]  # 3/4 of 2 epochs: 1 at 32
    assert row["wall_ratio"] == pytest.approx(row["scheduled_epoch_s"] / row["fixed_epoch_s"])
    assert row["acc1_drop"] == pytest.approx(row["fixed_acc1"] - row["scheduled_acc1"])
    assert [t["target"] for t in result["targets"]] == [
        "torchvision: a scheduled epoch takes less wall time than a fixed one",
        "torchvision: Acc@1 within 2 points of the fixed run"]
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("script", ["loader_fps.py", "train_fps.py", "resolution_schedule.py"])
def test_an_unknown_loader_is_named(script):
    proc = subprocess.run([sys.executable, f"bench/{script}", "--loaders", "ffcv,nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--loaders nope" in proc.stderr


def test_augment_cost_compares_the_policy_and_every_op_and_plots_them(tmp_path):
    from augment import OPS
    out = tmp_path / "augment_cost.json"
    run("augment_cost.py", "--batch", 4, "--image-size", 32, "--repeats", 1, "--warmup", 0, "--json", out)
    result = json.loads(out.read_text())
    assert result["batch"] == 4 and result["image_size_px"] == 32
    assert result["cpu_speedup"] == pytest.approx(result["cpu_torchvision_ms_per_image"] / result["cpu_ours_ms_per_image"])
    assert list(result["cpu_per_op"]) == list(OPS[1:])  # every op but Identity, in policy order
    for op, r in result["cpu_per_op"].items():
        assert r["ours_ms_per_image"] > 0 and r["torchvision_ms_per_image"] > 0, op
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


def test_step_agreement_compares_two_identical_runs_and_says_when_it_cannot_capture(tmp_path):
    out = tmp_path / "agreement.json"
    proc = run("step_agreement.py", "--device", "cpu", "--arch", "mobilenetv3_small_100", "--image-size", 32,
               "--batch-size", 4, "--steps", 4, "--classes", 3, "--json", out)
    result = json.loads(out.read_text())
    assert "--cuda-graphs: capture needs a CUDA device" in proc.stderr and not result["captured"]
    # the CPU runs both eagerly: the same seed, batches and LRs give the same losses, bit for bit
    assert len(result["loss"]["eager"]) == 4 and result["loss"]["eager"] == result["loss"]["graphed"]
    assert result["max_rel_diff"] == 0.0 and out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def test_a_run_without_json_writes_to_the_untracked_out_folder(data):
    default = REPO / "out" / "bench" / "loader_fps.json"
    before, start = git_status(), time.time()
    run("loader_fps.py", "--data", data, "--loaders", "torchvision", "--batch-size", BATCH, "--image-size", 32,
        "--epochs", 1, "--lead-in", 0, "--device-decode")
    assert git_status() == before
    assert default.stat().st_mtime >= start and default.with_suffix(".png").stat().st_mtime >= start
    result = json.loads(default.read_text())
    assert [r["name"] for r in result["rows"]] == ["stock", "torchvision", "torchvision bare",
                                                   "torchvision device-decode", "device-decode host part",
                                                   "decode limit: original files"]
    # the device-decode row (here the CPU is the device) reads the same epoch with its own few workers
    for device_row in result["rows"][3:5]:
        assert device_row["images_per_epoch"] == TRAIN_IMAGES and device_row["cores_used"] > 0
    assert result["settings"]["device_decode_workers"] == 3
    assert [t["target"] for t in result["targets"]] == [
        "torchvision >= 1.3x stock", "torchvision within 5% of torchvision bare",
        "device-decode host part >= 8x the decode limit per core"]


class Step(harness.Row):
    """Records the order of the harness's calls; `fork` rows report the process they ran in."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def lead_in(self):
        self.log.append(f"lead-in {self.name}")

    def work(self):
        self.log.append(self.name)
        return {"images": 10, "pid": os.getpid()}


def test_the_harness_rotates_rows_and_leads_each_timed_run_in():
    log = []
    results = harness.measure([Step("a", log), Step("b", log), Step("c", log)], rounds=2, warmups=1)
    assert log == ["a", "b", "c",  # warm-up
                   "lead-in b", "b", "lead-in c", "c", "lead-in a", "a",
                   "lead-in c", "c", "lead-in a", "a", "lead-in b", "b"]
    assert [len(results[n]["runs"]) for n in "abc"] == [2, 2, 2] and len(results["a"]["warmup"]) == 1
    ratio = harness.paired(results["a"], results["b"])
    assert ratio["values"] == pytest.approx([
        (a["images"] / a["wall_s"]) / (b["images"] / b["wall_s"])
        for a, b in zip(results["a"]["runs"], results["b"]["runs"])])
    forked = harness.measure([harness.Forked(Step("f", []))], rounds=1, warmups=0)["f"]
    assert forked["runs"][0]["pid"] != os.getpid() and forked["peak_rss_mb"] > 0


def test_targets_are_read_from_the_data_file_and_checked(tmp_path, monkeypatch):
    targets = tmp_path / "targets.yaml"
    targets.write_text("demo:\n"
                       "  - {name: fast, row: a, metric: x, op: '>=', value: 2}\n"
                       "  - {name: small, row: a, metric: y, op: '<', value: 0.05, format: .1%}\n"
                       "  - {name: not run, row: b, metric: x, op: '>=', value: 1}\n"
                       "  - {name: overall, metric: total, op: '>', value: 1}\n")
    monkeypatch.setattr(harness, "TARGETS", targets)
    checks = harness.check_targets("demo", [{"name": "a", "x": 2.0, "y": 0.1}], {"total": 0.5})
    assert [(c["target"], c["met"]) for c in checks] == [("fast", True), ("small", False), ("overall", False)]
    assert checks[1]["format"] == ".1%"


def test_code_version_names_each_modified_file_whole(tmp_path, monkeypatch):
    """Results record the commit and the tracked files that differed from it; a file modified in
    the tree only is listed as ' M name' by git, first in the list here, and must keep its name."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    for name in ("README.md", "train.py", "untouched.py"):
        (tmp_path / name).write_text("v1\n")
    git("add", ".")
    git("commit", "-qm", "v1")
    (tmp_path / "README.md").write_text("v2\n")  # modified in the tree only
    (tmp_path / "train.py").write_text("v2\n")
    git("add", "train.py")  # modified and staged
    (tmp_path / "new.py").write_text("untracked: not code that was measured\n")
    monkeypatch.setattr(harness, "REPO", tmp_path)
    version = harness.code_version()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True)
    assert version == {"commit": head.stdout.strip(), "modified": ["README.md", "train.py"]}


class Interrupted(Step):
    """A row whose `at`-th timed run is cut off by a time limit (SIGINT)."""

    def __init__(self, name, log, at: int):
        super().__init__(name, log)
        self.at, self.calls = at, 0

    def work(self):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().work()


def test_a_measurement_cut_off_keeps_its_complete_rounds_marked_partial():
    log = []
    results = harness.measure([Step("a", log), Interrupted("b", log, at=2)], rounds=3, warmups=0)
    assert harness.measure.partial and [len(results[n]["runs"]) for n in "ab"] == [1, 1]
    assert harness.stats(results["a"])["imgs_per_s"] > 0
    with pytest.raises(KeyboardInterrupt):  # not one complete round: nothing to write
        harness.measure([Step("a", log), Interrupted("b", log, at=1)], rounds=3, warmups=0)
    harness.measure([Step("a", log)], rounds=1, warmups=0)
    assert not harness.measure.partial


def test_the_accelerator_preflight_names_the_machine_and_a_missing_part_only_skips_its_stages(tmp_path):
    """Fatal only without torch, the device or a captured step: a missing google_crc32c (its import
    blocked here, as if the wheel had not been carried) is recorded with its reason, and the
    preflight goes on to the other parts and exits 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'google_crc32c':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n")
    env["PYTHONPATH"] = f"{tmp_path / 'block'}{os.pathsep}{REPO}"
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "bench/accelerator_checks.py", "--preflight", str(work), "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preflight: device: cpu (" in proc.stdout and "targets: none for this device" in proc.stdout
    found = json.loads((work / "preflight.json").read_text())
    assert found["fatal"]["ok"] and found["machine"]["torch"] and found["machine"]["torchvision"]
    parts = dict(line.split(" ", 1) for line in (work / "parts.txt").read_text().splitlines())
    assert parts["google_crc32c"].startswith("missing: ") and "google_crc32c" in parts["google_crc32c"]
    assert parts["nvjpeg"] == "ok"  # the CPU as the device: torchvision's or TorchCodec's decoder


def test_the_accelerator_help_prints_and_starts_nothing(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": "false"}
    proc = subprocess.run(["bash", "bench/accelerator.sh", "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and "--rehearse" in proc.stdout and "FAULT=" in proc.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    bad = subprocess.run(["bash", "bench/accelerator.sh", "--nope"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "--help" in bad.stderr and not (tmp_path / "out").exists()


def test_a_carried_library_the_machine_has_is_not_put_first_even_when_ldconfig_dies_of_sigpipe(tmp_path):
    """`ldconfig -p | grep -q NAME` under pipefail: grep leaves at the first match, ldconfig writing
    the rest gets SIGPIPE, the pipeline fails, and the carried copy shadowed the machine's."""
    bin_dir, carry = tmp_path / "bin", tmp_path / "carry"
    bin_dir.mkdir()
    (carry / "site").mkdir(parents=True)
    (carry / "lib").mkdir()
    for name in ("libhave.so.1", "liblack.so.2"):
        (carry / "lib" / name).write_bytes(b"")
    (bin_dir / "ldconfig").write_text("#!/bin/bash\n"  # the cache: our library first, then a long tail
                                      "printf '\\tlibhave.so.1 (libc6,x86-64) => /usr/lib/libhave.so.1\\n'\n"
                                      "yes $'\\tlibother.so.0 (libc6,x86-64) => /usr/lib/libother.so.0' | head -n 200000\n")
    (bin_dir / "ldconfig").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CARRY": str(carry),
           "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": "false", "BUDGET_S": "1"}
    proc = subprocess.run(["bash", "bench/accelerator.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert "dry run: carried libraries put first: liblack.so.2\n" in proc.stdout, proc.stdout + proc.stderr


def test_targets_per_gpu_follow_from_the_anchor_and_fit_the_memory():
    """Every GPU set but the anchor states values derived from it by the bandwidth ratio (rounded
    down; a ratio to the tenth), and its batch sweep fits 85% of its memory at the stated MiB per image; the harness
    picks a set by the name torch reports, and none for a card with no set."""
    import math
    import yaml
    targets = yaml.safe_load(harness.TARGETS.read_text())
    devices = targets["devices"]
    for name, values in devices.items():
        assert max(values["batch_sweep"]) * targets["sweep_mib_per_image"] <= 0.85 * values["memory_gib"] * 1024, name
        if "derived_from" in values:
            anchor = devices[values["derived_from"]]
            ratio = values["bandwidth_tb_s"] / anchor["bandwidth_tb_s"]
            assert values["model_only_imgs_per_s"] == math.floor(anchor["model_only_imgs_per_s"] * ratio / 100) * 100
            assert values["graphed_x_eager"] == round(anchor["graphed_x_eager"] * ratio, 1)
    assert harness.device_targets("NVIDIA H100 80GB HBM3")[0] == "h100_80gb"
    assert harness.device_targets("NVIDIA H200")[0] == "h200"
    assert harness.device_targets("NVIDIA A100-SXM4-80GB") == (None, {}) and harness.device_targets(None) == (None, {})
    rows = [{"name": "model only, graphed", "of_model_only": 1.5}]
    (h100,) = harness.check_targets("train_fps", rows, {}, "NVIDIA H100 80GB HBM3")
    (h200,) = harness.check_targets("train_fps", rows, {}, "NVIDIA H200")
    assert (h100["target"], h100["met"], h100["device_set"]) == ("graphed step >= 1.4x eager at --batch-size", True,
                                                                 "h100_80gb")
    assert (h200["threshold"], h200["met"]) == (2.0, False)
    assert harness.check_targets("train_fps", rows, {}, None) == []  # the CPU: no set, no such target


def test_the_verdict_names_the_target_set_of_the_card_it_ran_on(tmp_path):
    from bench.accelerator_checks import checks
    (tmp_path / "preflight.json").write_text(json.dumps({
        "machine": {"gpu": "NVIDIA H100 80GB HBM3"}, "device_line": "NVIDIA H100 80GB HBM3, ...", "parts": {}}))
    (tmp_path / "train_fps_device.json").write_text(json.dumps({
        "settings": {"e2e_step": "graphed", "e2e_timed_from_step": {"torchvision": 5}},
        "best_model_only": {"row": "model only, graphed", "imgs_per_s": 18000.0},
        "rows": [{"name": "model only", "imgs_per_s": 8000.0},
                 {"name": "model only, graphed", "imgs_per_s": 18000.0, "of_model_only": 2.25}]}))
    verdict = checks(tmp_path)
    assert verdict["target_set"] == "h100_80gb" and verdict["targets"]["model_only_imgs_per_s"] == 17400
    by_name = {c["check"]: c for c in verdict["checks"]}
    assert by_name["best model-only >= 17,400 img/s (h100_80gb)"]["met"] is True
    assert by_name["graphed >= 1.4x eager at the base batch (h100_80gb)"]["met"] is True


def test_one_failing_row_costs_that_row_and_rows_are_handed_over_as_they_complete():
    class Failing(Step):
        def work(self):
            if self.log.count("b-run") == 1:  # its second timed run: out of memory, say
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
            self.log.append("b-run")
            return super().work()

    log, seen = [], []
    results = harness.measure([Step("a", log), Failing("b", log)], rounds=3, warmups=0, keep_going=True,
                              progress=lambda r: seen.append({n: len(v["runs"]) for n, v in r.items()}))
    assert [len(results[n]["runs"]) for n in "ab"] == [3, 1]
    assert results["b"]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert seen[0] in ({"a": 1, "b": 0}, {"a": 0, "b": 1}) and seen[-1] == {"a": 3, "b": 1}
    with pytest.raises(RuntimeError):  # without keep_going a failure is the benchmark's
        harness.measure([Failing("b", ["b-run"])], rounds=1, warmups=0)


def test_a_hung_stage_and_a_failed_one_cost_only_themselves(data, tmp_path):
    """The call itself on this machine (its .venv, the CPU as the device) with its fault hooks:
    train.py under torchrun made to hang (the worker, which torchrun starts in a session of its
    own, ignores SIGINT and SIGTERM, as a process stuck in a CUDA call would), step_agreement made
    to fail, FFCV marked missing. The hung stage is ended whole at its limit, worker included; the
    failed one records its exit; the FFCV stage is skipped saying why; the others' figures come back."""
    import shutil
    import tarfile
    from bench.accelerator_checks import returned
    shutil.copytree(data, tmp_path / "data")  # the builder adds shards: not to the shared fixture
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "OUT": str(out), "WORK": str(work),
           "DATA": str(tmp_path / "data"), "CARRY": str(tmp_path / "no-carry"), "GRACE_S": "3",
           "STAGES": "step_agreement,train_bf16_graphs,decode_agreement,train_fps_ffcv",
           "FAULT": "train_bf16_graphs:hang,step_agreement:fail,part:ffcv", "LIMITS": "train_bf16_graphs=25,preflight=900"}  # the preflight: whatever the shared cores' load
    call = subprocess.Popen(["bash", "bench/accelerator.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    stdout, _ = call.communicate(timeout=1200)  # returns: nothing the stages left holds the pipe
    stages = {s["stage"]: s for s in map(json.loads, (work / "stages.jsonl").read_text().splitlines())}
    assert call.returncode == 1 and list(stages) == ["preflight", "step_agreement", "train_bf16_graphs",
                                                     "decode_agreement", "train_fps_ffcv"], stdout[-3000:]
    assert stages["preflight"]["rc"] == 0 and "preflight: device: cpu (" in stdout
    assert stages["step_agreement"]["rc"] == 3  # the injected failure's exit status
    hung = stages["train_bf16_graphs"]
    assert hung["rc"] == 124 and "ended at its limit" in hung["note"] and hung["wall_s"] <= 25 + 3 + 15, hung
    assert stages["decode_agreement"]["rc"] == 0 and (work / "decode_agreement.json").exists()
    assert stages["train_fps_ffcv"]["skipped"] and "ffcv" in stages["train_fps_ffcv"]["reason"]
    # the worker that hung led its own session (torchrun's start_new_session), and it is gone
    pid, sid = map(int, re.search(r"FAULT: pid (\d+) \(session (\d+)\) hangs",
                                  (work / "logs" / "train_bf16_graphs.log").read_text()).groups())
    assert pid == sid
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    token = f"MNV3_STAGE_TOKEN=mnv3-{call.pid}-".encode()
    alive = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if token in environ.read_bytes():
                alive.append(environ.parent.name)
        except OSError:  # gone meanwhile, or not ours
            pass
    assert alive == []
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"decode_agreement.json", "checks.json", "stages.jsonl", "preflight.json"} <= names
    assert returned(out, call.returncode, {"train_bf16_graphs": "hang", "step_agreement": "fail"}, "ffcv") == []


def test_the_rehearsal_refuses_what_would_not_come_back(tmp_path):
    import tarfile
    from bench.accelerator_checks import returned
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "train_bf16_graphs").mkdir(parents=True)
    out.mkdir()
    stages = [{"stage": "preflight", "rc": 0, "wall_s": 9, "limit_s": 45},
              {"stage": "train_bf16_graphs", "rc": 0, "wall_s": 30, "limit_s": 75},
              {"stage": "step_agreement", "rc": 124, "wall_s": 45, "limit_s": 45}]
    (work / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    (out / "accelerator.log").write_text("== preflight: rc 0 after 9 s\n")
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        tar.add(work, arcname=".")
    problems = returned(out, call_rc=1)
    assert "stage step_agreement: rc 124 after 45 s (limit 45 s)" in problems
    assert "stage train_bf16_graphs wrote no train_bf16_graphs/summary.json" in problems
    assert "stage step_agreement wrote no step_agreement.json" in problems
    for i in range(8):
        (out / f"extra{i}.json").write_text("{}")
    assert f"10 files in {out}: the device tool brings back 8" in returned(out, call_rc=1)
