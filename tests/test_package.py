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


GRAPH_PACKAGES = ("core", "convert", "loaders", "engine", "model", "augment", "bench", "deploy")


def import_graph(root: Path, packages=GRAPH_PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports, at module level or inside a function (both run)."""
    def name_of(path: Path) -> str:
        parts = list(path.relative_to(root).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    package = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                    base = ".".join(package + ([node.module] if node.module else []))
                # `from pkg import mod` imports the submodule pkg.mod when there is one
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        found = set()
        for target in targets:
            while target and target not in modules:  # `import core.errors.x` -> the module that exists
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        graph[name] = found
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle found by a depth-first walk, as [a, b, ..., a]; [] when the graph is acyclic."""
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_the_packages_import_one_way(tmp_path):
    graph = import_graph(REPO)
    assert {"convert.make_sample", "convert.to_ffcv", "loaders.ffcv_loader", "core.errors"} <= set(graph)
    assert "convert.make_sample" in graph["convert.to_ffcv"]  # the walk sees imports at all
    assert import_cycles(graph) == []
    # and the check sees a cycle when there is one, through a function-level or relative import
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "core" / "a.py").write_text("import core.b\n")
    (tmp_path / "core" / "b.py").write_text("def f():\n    from . import a\n")
    assert import_cycles(import_graph(tmp_path, ("core",))) == [["core.a", "core.b", "core.a"]]
