"""The benchmark harness: rows plug in, the harness times them and writes the results.

A row is something to measure (a loader, a training step, an augmentation). It says how to build
itself and what one unit of its work is; the harness builds every row, warms each up, then times
rounds over all rows in a rotating order (so load from other processes hits every row alike),
with an untimed lead-in right before each timed run. Out of the rounds come the spread
(median/min/max), ratios against a reference row paired round by round, the table, the targets
of bench/targets.yaml, the JSON (with the machine, versions, commit and load average) and a bar
chart beside it. Results go to out/bench/ (not tracked) unless --json says otherwise.

Not a script: bench/loader_fps.py, train_fps.py and augment_cost.py use it.
"""
import multiprocessing as mp
import operator
import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import psutil
import yaml

from core.errors import UserError
from core.memory import PeakRSS

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "out" / "bench"
TARGETS = Path(__file__).with_name("targets.yaml")
COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tree_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process and all its descendants.

    Children that already exited and were reaped (DataLoader workers of a finished epoch) are in
    os.times()'s children fields, live ones are read through psutil.
    """
    t = os.times()
    # process_time: this process's threads at ns resolution (os.times ticks at 10 ms)
    total = time.process_time() + t.children_user + t.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:  # exited between listing and reading
            pass
    return total


# --- rows --------------------------------------------------------------------------------------

class Row:
    """One thing to measure. A row defines `work()`, one unit of its work, which returns
    {"images": N, ...any other numbers}; the rest is optional."""
    name = "row"

    def sync(self):
        """Wait for queued device work; runs at both edges of the timed window."""

    def build(self):
        """Untimed set-up."""

    def ready(self):
        """Wait for a build that runs in the background (Forked), after every row's build() began."""

    def warm_up(self) -> dict:
        """Untimed work before the rounds (JIT, worker start, autotuning)."""
        return self.work()

    def lead_in(self):
        """Untimed work right before each timed run: work a row does ahead between runs is then
        done in its own time, not while another row is being timed."""

    def work(self) -> dict:
        raise NotImplementedError

    def run(self) -> dict:
        """One timed unit of work: what work() returns, plus wall_s and cpu_s of the process tree."""
        self.sync()
        cpu0, t0 = tree_cpu_s(), time.perf_counter()
        out = self.work()
        self.sync()
        wall_s = time.perf_counter() - t0
        return {**out, "wall_s": wall_s, "cpu_s": tree_cpu_s() - cpu0}

    def finish(self) -> dict:
        """Numbers known only at the end (peak memory)."""
        return {}

    def close(self):
        """Release what build() started, also after a failure."""


class Forked(Row):
    """A row run in its own process (fork) and driven over a Pipe, so that its CPU time and peak
    memory are its own. Rows are built side by side: build() starts the process, ready() waits."""
    timeout_s = 1800

    def __init__(self, row: Row):
        self.row, self.name, self.process = row, row.name, None

    def build(self):
        context = mp.get_context("fork")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(self.row, child))
        self.process.start()

    def ready(self):
        self.build_s = self._receive()

    def _call(self, method: str):
        self.conn.send(method)
        return self._receive()

    def _receive(self):
        if not self.conn.poll(self.timeout_s):
            self.process.kill()
            raise UserError(f"row {self.name!r} gave no answer in {self.timeout_s} s")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise UserError(f"row {self.name!r} died (exit code {self.process.exitcode})") from None
        if kind == "error":
            raise UserError(f"row {self.name!r} failed:\n{payload}")
        return payload

    def warm_up(self):
        return self._call("warm_up")

    def lead_in(self):
        return self._call("lead_in")

    def run(self):
        return self._call("run")

    def finish(self):
        out = self._call("finish")
        self.process.join(60)
        return {**out, "build_s": self.build_s}

    def close(self):
        if self.process is not None and self.process.is_alive():
            self.process.kill()


def _serve(row: Row, conn):
    """The child's side of Forked: build, then answer calls until "finish"."""
    try:
        with PeakRSS(interval_s=0.1, pss_every=20) as rss:
            start_s = time.perf_counter()
            row.build()
            conn.send(("ok", time.perf_counter() - start_s))
            while (method := conn.recv()) != "finish":
                conn.send(("ok", getattr(row, method)()))
            out = row.finish()
        conn.send(("ok", {**out, "peak_rss_mb": rss.peak_rss_mb, "peak_pss_mb": rss.peak_pss_mb}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
        os._exit(0)  # skip atexit handlers of libraries that may wait on their pools


def measure(rows: list[Row], rounds: int, warmups: int = 1, who: str = "bench", keep_going: bool = False,
            progress=None) -> dict:
    """Build every row, `warmups` untimed passes, then `rounds` timed ones, each pass over all rows
    with the order rotated by one. Returns {name: {"warmup": [...], "runs": [...], **finish()}}.

    Interrupted (SIGINT: a time limit) after a complete timed round, it returns the complete rounds
    and sets `measure.partial`, so that what was measured is still written, marked partial.
    keep_going: a row whose warm-up or run raises (a device out of memory) gets {"error": message},
    is closed and left out of the rest; the other rows go on. progress(results), when given, is
    called after every timed run, so a caller can write what is measured as it comes in."""
    results = {row.name: {"warmup": [], "runs": []} for row in rows}
    measure.partial = False

    def attempt(row: Row, call):
        try:
            return call()
        except Exception as e:
            if not keep_going:
                raise
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            results[row.name]["error"] = message
            log(f"{who}: row {row.name!r} failed and is left out from here: {message}")
            row.close()
            return None

    try:
        log(f"{who}: building {len(rows)} rows: {', '.join(r.name for r in rows)}")
        for row in rows:
            row.build()
        for row in rows:
            row.ready()
        for r in range(warmups + rounds):
            timed = r >= warmups
            log(f"{who}: {'round' if timed else 'warm-up'} {r + 1 - warmups * timed}/{rounds if timed else warmups}")
            for k in range(len(rows)):
                row = rows[(k + r) % len(rows)]
                if "error" in results[row.name]:
                    continue
                if timed:
                    run = attempt(row, lambda: (row.lead_in(), row.run())[1])
                    if run is not None:
                        results[row.name]["runs"].append(run)
                    if progress is not None:
                        progress(results)
                else:
                    warm = attempt(row, row.warm_up)
                    if warm is not None:
                        results[row.name]["warmup"].append(warm)
        for row in rows:
            if "error" not in results[row.name]:
                results[row.name].update(row.finish())
    except KeyboardInterrupt:
        complete = min((len(v["runs"]) for v in results.values() if "error" not in v), default=0)
        if not complete:
            raise
        log(f"{who}: interrupted: writing the {complete} complete rounds, marked partial")
        for v in results.values():
            del v["runs"][complete:]
        measure.partial = True
    finally:
        for row in rows:
            row.close()
    return results


# --- numbers ------------------------------------------------------------------------------------

def spread(values) -> dict:
    """median, min, max of repeated measurements (and the values themselves)."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def rate(run: dict) -> float:
    return run["images"] / run["wall_s"]


def stats(result: dict) -> dict:
    """What every row reports: images/s over the rounds, CPU use and cost per image, first batch."""
    runs = result["runs"]
    fps = spread(rate(r) for r in runs)
    wall_s, cpu_s, images = (sum(r[k] for r in runs) for k in ("wall_s", "cpu_s", "images"))
    warm = [r["first_batch_s"] for r in runs if r.get("first_batch_s") is not None]
    return {"imgs_per_s": fps["median"], "imgs_per_s_min": fps["min"], "imgs_per_s_max": fps["max"],
            "imgs_per_s_rounds": [round(v, 1) for v in fps["values"]],
            "cores_used": cpu_s / wall_s, "cpu_util_pct": 100 * cpu_s / wall_s / cores(),
            "imgs_per_core_s": images / cpu_s if cpu_s > 0 else None, "cpu_ms_per_img": 1000 * cpu_s / images,
            "first_batch_s_cold": (result["warmup"] or [{}])[0].get("first_batch_s"),
            "first_batch_s_warm": statistics.median(warm) if warm else None,
            **{k: v for k, v in result.items() if k not in ("runs", "warmup")}}


def paired(result: dict, reference: dict) -> dict:
    """Spread over rounds of this row's images/s divided by the reference row's in the same round."""
    return spread(rate(a) / rate(b) for a, b in zip(result["runs"], reference["runs"]))


def device_targets(device_name: str | None) -> tuple[str | None, dict]:
    """The set of bench/targets.yaml's `devices` whose `match` is found in the GPU's name: (its key,
    its values), or (None, {}) for no GPU or a card with no set."""
    for key, values in yaml.safe_load(TARGETS.read_text()).get("devices", {}).items():
        if device_name and re.search(values["match"], device_name):
            return key, values
    return None, {}


def check_targets(benchmark: str, rows: list[dict], top: dict | None = None, device_name: str | None = None
                  ) -> list[dict]:
    """bench/targets.yaml's targets of `benchmark`, evaluated in the file's order. A target reads
    `metric` of the row named `row` (or of `top`, the result itself, when it names no row); one
    whose row did not run is left out, and so is one whose `device_value` the GPU's set (see
    device_targets) does not give."""
    by_name = {r["name"]: r for r in rows}
    device_set, device_values = device_targets(device_name)
    checks = []
    for t in yaml.safe_load(TARGETS.read_text())[benchmark]:
        source = by_name.get(t["row"]) if "row" in t else top
        if source is None or source.get(t["metric"]) is None:
            continue
        value = device_values.get(t["device_value"]) if "device_value" in t else t["value"]
        if value is None:
            continue
        measured = source[t["metric"]]
        checks.append({"target": t["name"].format(value=value), "row": t.get("row"), "metric": t["metric"],
                       "measured": measured, "op": t["op"], "threshold": value, "format": t.get("format", ".2f"),
                       "met": COMPARE[t["op"]](measured, value),
                       **({"device_set": device_set} if "device_value" in t else {})})
    return checks


# --- output -------------------------------------------------------------------------------------

def add_output_flags(parser, benchmark: str):
    parser.add_argument("--json", default=str(OUT_DIR / f"{benchmark}.json"),
                        help="results as JSON (out/ is not tracked: copy a run into bench/results/ on purpose)")
    parser.add_argument("--png", default=None, help="bar chart (default: the --json path with .png)")


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages: on a shared machine, how busy it was around the run."""
    return [round(x, 2) for x in os.getloadavg()]


def code_version() -> dict:
    """The commit measured, and which tracked files differed from it (numbers belong to code)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    # Not stripped: porcelain's first column is a space for a file modified in the tree only.
    modified = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None, "modified": modified}


def environment() -> dict:
    import torch
    return {"host_cores": os.cpu_count(), "usable_cores": cores(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "accelerator": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "code": code_version()}


def versions(*modules: str) -> dict:
    out = {}
    for name in modules:
        try:
            out[name] = __import__(name, fromlist=["__version__"]).__version__
        except Exception:  # not installed, or no __version__: say so rather than fail the run
            out[name] = None
    return out


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table. columns: (header, key, format spec); a missing value prints as '-'."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(k) is None else format(row[k], f)) for _, k, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def bar_chart(path, bars: list[tuple], title: str, xlabel: str, reference: tuple | None = None) -> Path:
    """Horizontal bars, top to bottom: (label, median, min, max, color, note) each, min-max as
    whiskers and the note beside the bar; `reference` (value, label) draws a dotted line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, medians, lows, highs, colors, notes = zip(*bars)
    n = len(bars)
    fig, ax = plt.subplots(figsize=(8, 0.42 * n + 1.4))
    ys = list(range(n))[::-1]
    err = [[m - lo for m, lo in zip(medians, lows)], [hi - m for m, hi in zip(medians, highs)]]
    ax.barh(ys, medians, xerr=err, color=colors, capsize=3, height=0.7)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    top = max(highs)
    if reference:
        ax.axvline(reference[0], color="black", linestyle=":", linewidth=1)
        ax.text(reference[0], -0.6, f" {reference[1]}", fontsize=7, va="center")
    for y, hi, note in zip(ys, highs, notes):
        if note:
            ax.text(hi + 0.01 * top, y, f" {note}", va="center", fontsize=7)
    ax.set_xlim(0, top * 1.3)
    ax.set_ylim(-0.9, n - 0.5)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def save_result(benchmark: str, args, result: dict) -> Path:
    """A benchmark result that is not a table of rows (see Report for those): with the command and
    the environment added, written atomically to --json. Returns the path."""
    from engine.metrics import write_json_atomic
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"benchmark": benchmark, "command": " ".join([f"python bench/{benchmark}.py", *sys.argv[1:]]),
                       **result, "environment": environment()}, path)
    return path


class Report:
    """One benchmark run's record: opened before the measurement (command, load average, clock),
    written after it (table, targets, JSON, chart)."""

    def __init__(self, benchmark: str, argv=None):
        self.benchmark = benchmark
        self.command = " ".join([f"python bench/{benchmark}.py", *map(str, sys.argv[1:] if argv is None else argv)])
        self.load_before, self.start_s = load_average(), time.perf_counter()

    def write(self, args, setting: str, settings: dict, rows: list[dict], columns, bars, xlabel: str,
              reference=None, modules=("torchvision",), **fields) -> dict:
        """Print `setting`, the table and the targets; write the JSON to args.json and the chart of
        `bars` (see bar_chart) to args.png or beside the JSON. `fields` go into the JSON as they are."""
        from engine.metrics import write_json_atomic
        load_after = load_average()
        result = {"benchmark": self.benchmark, "command": self.command, "settings": settings,
                  "load_average_before": self.load_before, "load_average_after": load_after,
                  "wall_s": round(time.perf_counter() - self.start_s, 1),
                  "environment": environment(), "versions": versions(*modules), "partial": getattr(measure, "partial", False),
                  **fields, "rows": rows}
        result["targets"] = checks = check_targets(self.benchmark, rows, result, result["environment"]["accelerator"])
        print(f"\n{self.benchmark}: {setting}; load average {self.load_before} before, {load_after} after")
        if columns:
            print(table(rows, columns))
        print()
        for c in checks:
            print(f"{'MET ' if c['met'] else 'MISS'}  {c['target']}: {c['measured']:{c['format']}}")
        json_path = Path(args.json)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result, json_path)
        if not bars:  # every row failed: the JSON says why, there is nothing to draw
            print(f"\nwrote {json_path}")
            return result
        png_path = bar_chart(args.png or json_path.with_suffix(".png"), bars, f"{self.benchmark}: {setting}", xlabel,
                             reference)
        print(f"\nwrote {json_path} and {png_path}")
        return result

    def write_partial(self, args, settings: dict, rows: list[dict]):
        """The rows measured so far to args.json, marked partial (no table, targets or chart): a run
        killed later (a hang, out of memory) still leaves them; write() replaces the file at the end."""
        from engine.metrics import write_json_atomic
        json_path = Path(args.json)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic({"benchmark": self.benchmark, "command": self.command, "settings": settings,
                           "partial": True, "wall_s": round(time.perf_counter() - self.start_s, 1), "rows": rows},
                          json_path)
