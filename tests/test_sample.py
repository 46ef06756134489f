"""The built-in sample dataset, and the thin real path `make demo` runs through it."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from convert.make_sample import class_names, make_sample

REPO = Path(__file__).resolve().parent.parent


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.JPEG")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_the_same_arguments_give_the_same_bytes_and_another_seed_does_not(tmp_path):
    a = make_sample(tmp_path / "a", num_classes=3, train_per_class=2, val_per_class=1, quiet=True)
    b = make_sample(tmp_path / "b", num_classes=3, train_per_class=2, val_per_class=1, quiet=True, workers=1)
    c = make_sample(tmp_path / "c", num_classes=3, train_per_class=2, val_per_class=1, quiet=True, seed=1)
    assert _digest(a) == _digest(b) != _digest(c)


def test_the_default_sample_looks_like_imagenet_to_a_decoder(default_sample):
    root = default_sample  # the defaults `make demo` uses
    names = class_names(10)
    assert sorted(p.name for p in (root / "train").iterdir()) == names
    assert all(n.startswith("n") and len(n) == 9 for n in names)
    train = sorted((root / "train").rglob("*.JPEG"))
    val = sorted((root / "val").rglob("*.JPEG"))
    assert len(train) == 400 and len(val) == 100
    assert train[0].name.startswith(train[0].parent.name + "_") and val[0].name.startswith("ILSVRC2012_val_")
    shorts, aspects, sizes_kb = [], [], []
    for path in train[::7] + val[::7]:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            w, h = im.size
        shorts.append(min(w, h))
        aspects.append(w / h)
        sizes_kb.append(path.stat().st_size / 1024)
    assert 200 <= min(shorts) and max(shorts) <= 500
    assert min(aspects) < 0.9 and max(aspects) > 1.2  # portrait and landscape
    assert 10 < np.median(sizes_kb) < 150 and max(sizes_kb) < 400  # tens to a hundred-odd KB at q90
    # Not flat colour: real texture at every scale (the row-to-row differences are not tiny).
    pixels = np.asarray(Image.open(train[0]).convert("L"), dtype=np.float32)
    assert np.abs(np.diff(pixels, axis=0)).mean() > 2 and pixels.std() > 10


def test_oddities_on_request_are_what_imagenet_holds(tmp_path):
    root = make_sample(tmp_path / "odd", num_classes=3, train_per_class=1, val_per_class=1, oddities=True,
                       quiet=True)
    odd = {p.name.rsplit("_", 1)[1]: p for p in (root / "train").rglob("*_odd_*.JPEG")}
    assert set(odd) == {"gray.JPEG", "cmyk.JPEG", "png.JPEG"}
    with Image.open(odd["gray.JPEG"]) as im:
        assert (im.format, im.mode) == ("JPEG", "L")
    with Image.open(odd["cmyk.JPEG"]) as im:
        assert (im.format, im.mode) == ("JPEG", "CMYK")
    with Image.open(odd["png.JPEG"]) as im:
        assert im.format == "PNG"


def test_the_demo_runs_the_real_path_and_learns(tmp_path):
    """What `make demo` runs: sample -> FFCV writer -> FFCV loader -> MobileNetV3 -> CPU training."""
    env = {**os.environ, "MNV3_SAMPLE_DIR": str(tmp_path / "sample"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/sample_cpu.yaml",
                           "--output-dir", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "using the built-in sample dataset" in proc.stderr
    assert (tmp_path / "sample" / "ffcv" / "train.beton").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loader"] == "ffcv" and summary["arch"] == "mobilenetv3_small_100"
    assert summary["acc1"] > 40.0, proc.stdout  # 10 classes: chance is 10%
    assert proc.stdout.strip().splitlines()[-1].startswith("Acc@1 ")
