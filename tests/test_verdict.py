"""The suite always gives a verdict: a failing test is reported as a failure, not a pytest
INTERNALERROR, even when a finaliser that raises runs while pytest formats the failure."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A test that fails while the collector keeps finding garbage whose finaliser raises (as numba's
# dispatcher finaliser does for FFCV's generated code), one collection every few allocations: some
# fall inside pytest's parse of this file for the failure's report.
VICTIM = '''
import gc


class Finaliser:
    left = 200_000

    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it

    def __del__(self):
        if Finaliser.left > 0:
            Finaliser.left -= 1
            Finaliser()
        return {}["a dead dispatcher"]


def test_victim():
    Finaliser()
    gc.set_threshold(5)
    assert 41 == 42
'''


@pytest.mark.parametrize("protection", ["both", "pytest.ini alone", "conftest.py alone"])
def test_a_failure_is_reported_when_a_finaliser_raises_during_its_formatting(tmp_path, protection):
    """With the repository's pytest.ini and tests/conftest.py (each on its own as well), pytest
    reports the failure; on CPython 3.11.7 without them it ends in an INTERNALERROR, no verdict."""
    (tmp_path / "test_victim.py").write_text(VICTIM)
    if protection != "pytest.ini alone":
        (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    # -c: the repository's settings; -o addopts=: all but its options (the plugin it turns off)
    options = ["-c", str(REPO / "pytest.ini")] + (["-o", "addopts="] if protection == "conftest.py alone" else [])
    proc = subprocess.run([sys.executable, "-m", "pytest", *options, "--rootdir", str(tmp_path), "-q",
                           "-p", "no:cacheprovider", str(tmp_path / "test_victim.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "INTERNALERROR" not in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "assert 41 == 42" in proc.stdout  # the failure's own report, with its source line
