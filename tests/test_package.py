"""The project as a package: imports run one way, heavy libraries load only where used, the library
raises typed errors and only the commands exit, and the commands run from any folder."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import LoaderError, UserError
from loaders import LOADERS, build_loader

REPO = Path(__file__).resolve().parent.parent
LIGHT_PACKAGES = ("core", "loaders", "engine", "model", "augment")
HEAVY = ("cv2", "PIL", "ffcv", "nvidia.dali")


def tracked_python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if (REPO / line).exists()]  # not those deleted, uncommitted


def test_the_light_packages_load_no_image_or_loader_library():
    # Every module of each package except the loaders' own library modules, in a fresh interpreter.
    code = f"""
import importlib, pkgutil, sys
for name in {LIGHT_PACKAGES!r}:
    pkg = importlib.import_module(name)
    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.name.endswith("_loader"):
            importlib.import_module(f"{{name}}.{{m.name}}")
print(",".join(sorted(m for m in sys.modules if m in {HEAVY!r} or m.split(".")[0] in {HEAVY!r})))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
    # and the check itself sees a heavy import when there is one
    proc = subprocess.run([sys.executable, "-c", code.replace("for name in", "import convert.images\nfor name in")],
                          cwd="/", capture_output=True, text=True, timeout=120)
    assert "cv2" in proc.stdout and "PIL" in proc.stdout


def test_no_file_edits_sys_path():
    offenders = [str(p.relative_to(REPO)) for p in tracked_python_files()
                 for node in ast.walk(ast.parse(p.read_text())) if ast.unparse(node) == "sys.path"]
    assert offenders == []


def test_only_the_commands_exit():
    """No `raise SystemExit` and no sys.exit anywhere but core.errors.run_command, which every
    command's `__main__` block goes through. (os._exit, which ends a forked worker, is not this.)"""
    offenders = []
    for path in tracked_python_files():
        if path.parts[-2] == "tests":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            raised = isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.unparse(node.exc)
            exits = isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit", "quit")
            if raised or (exits and path != REPO / "core" / "errors.py"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("name", list(LOADERS))
def test_an_unknown_loader_option_is_an_error_naming_the_valid_ones(tiny_converted, name):
    valid = {"ffcv": "os_cache, order, beton_dir", "dali": "shards_dir, source, decode, prefetch",
             "torchvision": "shards_dir, source, max_bad_samples"}[name]
    with pytest.raises(LoaderError, match=f"unknown option\\(s\\) os_cahce; its options are {valid}"):
        build_loader(name, split="val", data=tiny_converted, batch_size=2, options={"os_cahce": False})
    with pytest.raises(LoaderError, match="choose one of"):
        build_loader(name, split="val", data=tiny_converted, batch_size=2,
                     options={"order": "sideways"} if name == "ffcv" else {"source": "sideways"})


@pytest.mark.parametrize("command", ["train.py", "convert/to_ffcv.py", "convert/to_shards.py",
                                     "convert/make_sample.py", "bench/loader_fps.py", "bench/train_fps.py",
                                     "bench/augment_cost.py", "bench/resolution_schedule.py", "convert/verify.py",
                                     "export.py", "predict.py"])
def test_each_command_runs_from_another_folder(command, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / command), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_a_user_error_is_one_line_and_its_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "convert/to_shards.py"), str(tmp_path / "nowhere")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"no such folder: {tmp_path / 'nowhere'}: pass the dataset root, "
                                                f"the folder that holds train/ and val/"]
    assert issubclass(LoaderError, UserError)
