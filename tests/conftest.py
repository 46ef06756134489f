"""Fixtures shared by every test file. Run the tests with `python -m pytest -q tests` (the project
installed, as `make test` does: `pip install -e .`)."""
from pathlib import Path

import pytest

from convert.make_sample import make_sample


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
