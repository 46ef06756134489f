"""What the benchmarks share: CPU time and peak memory of a process tree, the machine's load, the
median/min/max of repeated runs, and the table / JSON / PNG output.

Not a script: `python bench/loader_fps.py` and `python bench/train_fps.py` use it.
"""
import os
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `import loaders`, `convert`, ... when run as a script from anywhere

from convert.scan import PeakRSS  # noqa: E402,F401  (the converters' process-tree memory sampler)
from engine.metrics import write_json_atomic  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tree_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process and all its descendants.

    Live descendants are read through psutil; children that already exited and were reaped
    (DataLoader workers of a finished epoch) are in os.times()'s children fields. The difference
    of two readings is the CPU time the tree spent in between.
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


class Window:
    """Wall and CPU seconds of a timed window: `with Window(sync) as w: ...; w.wall_s, w.cpu_s`.

    `sync` (e.g. torch.cuda.synchronize) runs at both edges, so queued device work is neither
    counted into the window from before nor left out at the end.
    """

    def __init__(self, sync=lambda: None):
        self.sync = sync

    def __enter__(self):
        self.sync()
        self._cpu0, self._t0 = tree_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = tree_cpu_s() - self._cpu0


def spread(values) -> dict:
    """median, min, max of repeated measurements (and the values themselves)."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages: on a shared machine, how busy it was around the run."""
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict:
    import torch
    return {"host_cores": os.cpu_count(), "usable_cores": cores(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__,
            "accelerator": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "code": code_version()}


def code_version() -> dict:
    """The commit measured, and which tracked files differed from it (numbers belong to code)."""
    import subprocess

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    # Not stripped: porcelain's first column is a space for a file modified in the tree only.
    modified = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None, "modified": modified}


def versions(*modules: str) -> dict:
    out = {}
    for name in modules:
        try:
            out[name] = __import__(name).__version__
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


def write_json(obj, path) -> Path:
    """Atomically, as the trainer writes its JSON, into a folder made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(obj, path)
    return path


def bar_chart(path, labels, medians, lows, highs, colors, title: str, xlabel: str, notes=None,
              reference: float | None = None, reference_label: str = "") -> Path:
    """Horizontal bars with min-max whiskers, one per row, top to bottom; `notes` beside each bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(8, 0.42 * n + 1.4))
    ys = list(range(n))[::-1]
    err = [[m - lo for m, lo in zip(medians, lows)], [hi - m for m, hi in zip(medians, highs)]]
    ax.barh(ys, medians, xerr=err, color=colors, capsize=3, height=0.7)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    top = max(highs) if highs else 1.0
    if reference:
        ax.axvline(reference, color="black", linestyle=":", linewidth=1)
        ax.text(reference, -0.6, f" {reference_label}", fontsize=7, va="center")
    for y, hi, note in zip(ys, highs, notes or [""] * n):
        if note:
            ax.text(hi + 0.01 * top, y, f" {note}", va="center", fontsize=7)
    ax.set_xlim(0, top * 1.3)
    ax.set_ylim(-0.9, n - 0.5)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
