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


def test_the_accelerator_preflight_runs_here_and_names_a_carried_package_that_is_missing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "bench/accelerator_checks.py", "--preflight", "--device", "cpu"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preflight: sgd: 6 steps, eager" in proc.stdout and "preflight: rmsprop: 6 steps" in proc.stdout
    # as if the crc32c wheel had not been carried: the import fails, so the preflight must
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'google_crc32c':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n")
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{REPO}"
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "preflight: cannot import google_crc32c (needed by" in proc.stderr
    assert "Traceback" not in proc.stderr and "preflight: sgd" not in proc.stdout


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
