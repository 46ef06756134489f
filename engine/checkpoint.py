"""Checkpoints that survive a kill: written to a temporary name, then renamed over the old one."""
import os
import random
from pathlib import Path

import torch

from core.errors import CheckpointError

CHECKPOINT = "checkpoint.pth"
BEST = "model_best.pth"


def save_atomic(obj: dict, path: Path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"--resume {path}: cannot load it as a checkpoint ({type(e).__name__}: {e})") from None


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """'auto' -> OUTPUT_DIR/checkpoint.pth when it exists (a fresh start otherwise)."""
    if resume != "auto":
        return Path(resume) if resume else None
    path = Path(output_dir) / CHECKPOINT
    return path if path.exists() else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    """random.setstate wants the tuples back that serialisation may have turned into lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
