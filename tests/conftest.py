"""Fixtures shared by every test file. Run the tests with `python -m pytest -q tests` (the project
installed, as `make test` does: `pip install -e .`)."""
import gc
import sys
from pathlib import Path

import pytest

from convert.make_sample import make_sample


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """No garbage collection while pytest writes a test's report. Formatting a failure parses the
    test's source with `ast`, and CPython 3.11.7's AST builder keeps its recursion depth in one
    counter per interpreter: a collection in the middle runs finalisers, and one that parses too
    (or lets another thread parse) leaves the counter off, so the report itself fails with
    `SystemError: AST constructor recursion depth mismatch`: a pytest INTERNALERROR, no verdict.
    With collection off, no Python code runs inside the parse. (CPython 3.11.8 gives each parse
    its own counter: python/cpython#113035.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        if enabled:
            gc.enable()


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory) -> Path:
    """A 4-class ImageNet-layout dataset (6 train + 3 val images per class), built once per session."""
    return make_sample(tmp_path_factory.mktemp("tiny_sample"), num_classes=4, train_per_class=6,
                       val_per_class=3, oddities=False, quiet=True)


@pytest.fixture(scope="session")
def tiny_converted(tiny_sample, tmp_path_factory) -> Path:
    """A copy of tiny_sample with its FFCV files (ffcv/) and record shards (shards/) written."""
    import shutil

    from convert.to_ffcv import convert as to_ffcv
    from convert.to_shards import convert as to_shards
    root = tmp_path_factory.mktemp("tiny_converted") / "data"
    shutil.copytree(tiny_sample, root)
    to_ffcv(root, workers=2, progress=False)
    to_shards(root, workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def default_sample(tmp_path_factory) -> Path:
    """The sample dataset at make_sample's defaults (what `make demo` trains on: 10 classes, 400 +
    100 images), built once per session for the tests that read it."""
    return make_sample(tmp_path_factory.mktemp("default_sample"), quiet=True)


@pytest.fixture(scope="session")
def one_epoch_run(tiny_sample, tmp_path_factory) -> Path:
    """The output folder of test_train's plainest run (TINY, --loader torchvision, one epoch on
    tiny_sample), run once per session: the tests that start from such a run copy it (shutil.copytree)
    before writing into it, and read it in place otherwise."""
    from test_train import ok, run_train
    out = tmp_path_factory.mktemp("one_epoch_run") / "run"
    ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "1"], out))
    return out


def pytest_runtest_teardown(item):
    """A DALI pipeline ends with its loader (loaders/dali_loader.TrainSource), but a test can leave a
    loader inside a cycle of its own (a generator frame, a trainer object), and then the collector
    ends it whenever it next runs: once that was inside numba's compilation of a later FFCV test,
    where DALI's shutdown crashed the interpreter. Collected here, right after the test that made it."""
    if "dali" in item.nodeid.lower() and "nvidia.dali" in sys.modules:
        gc.collect()
