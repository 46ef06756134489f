"""Checkpoints that survive a kill: written to a temporary name, then renamed over the old one;
which checkpoint a run continues from; and when to save one mid-epoch."""
import os
import random
import re
import time
from pathlib import Path

import torch

from core.errors import CheckpointError

CHECKPOINT = "checkpoint.pth"
BEST = "model_best.pth"
# What makes two runs the same run: a checkpoint in OUTPUT_DIR that differs in any of these (or in
# its classes) belongs to another run. Epochs may grow; workers, logging and paths may change.
RUN_KEYS = ("arch", "batch_size", "image_size", "opt", "learning_rate", "momentum", "wd", "rmsprop_alpha",
            "rmsprop_eps", "lr_scheduler", "lr_step_size", "lr_gamma", "warmup_epochs", "label_smoothing",
            "auto_augment", "random_erase", "mixup_alpha", "cutmix_alpha", "dropout", "model_ema", "seed",
            "pretrained", "bn_eps", "drop_path", "warmup_lr", "ra_magnitude_std", "random_erase_mode",
            "min_res", "max_res", "start_ramp", "end_ramp")


def save_atomic(obj: dict, path: Path):
    """Write `obj` to a temporary file beside `path`, flush it to disk, then rename it over `path`.
    A failed write (a full disk) leaves the previous file as it was and says why."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise CheckpointError(f"cannot write {path} ({reason}): the previous {path.name} is intact; free "
                              f"space or pass another --output-dir") from None


def load(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"--resume {path}: cannot load it as a checkpoint ({type(e).__name__}: {e})") from None


def differences(saved: dict, config: dict, classes: list, saved_classes, keys=RUN_KEYS) -> list[str]:
    """The `keys` (and classes) in which a checkpoint's run differs from this one, as 'key: A there, B here'."""
    out = [f"{k}: {saved.get(k)!r} there, {config.get(k)!r} here" for k in keys if saved.get(k) != config.get(k)]
    if saved_classes is not None and list(saved_classes) != list(classes):
        out.append(f"classes: {len(saved_classes)} there, {len(classes)} here"
                   + ("" if len(saved_classes) != len(classes) else " (other names)"))
    return out


def resolve_resume(resume: str | None, output_dir: Path, config: dict, classes: list,
                   overwrite: bool = False) -> tuple[Path | None, dict | None]:
    """(checkpoint path, its state) to continue from, or (None, None) for a fresh start.

    An explicit path is loaded whatever run wrote it, but it must hold the same network (arch and
    classes). 'auto' continues from OUTPUT_DIR/checkpoint.pth when that is this run's, so a
    restarted command picks up where it stopped; another run's checkpoint or best weights there
    are an error unless `overwrite`."""
    output_dir = Path(output_dir)
    if resume not in (None, "auto", ""):
        state = load(resume)
        changed = differences(state.get("config") or {}, config, classes, state.get("classes"), keys=("arch",))
        if changed:
            raise CheckpointError(f"--resume {resume}: it holds another network ({'; '.join(changed)}): resume "
                                  f"with the same --arch and dataset, or start from its weights with --pretrained")
        return Path(resume), state
    existing = [p for p in (output_dir / CHECKPOINT, output_dir / BEST) if p.exists()]
    if not existing or overwrite:
        return None, None
    path = output_dir / CHECKPOINT if (output_dir / CHECKPOINT).exists() else existing[0]
    state = load(path)
    changed = differences(state.get("config") or {}, config, classes, state.get("classes"))
    if changed or path.name != CHECKPOINT:
        why = "; ".join(changed) or f"no {CHECKPOINT} beside it"
        raise CheckpointError(f"--output-dir {output_dir} holds another run's {path.name} ({why}): continue it "
                              f"with --resume {path}, replace it with --overwrite, or pass another --output-dir")
    return path, state


def position(epochs_done: int, next_batch: int, steps_per_epoch: int, global_batch: int, world_size: int) -> dict:
    """Where a checkpoint stands, in terms that do not depend on the world size: the global step
    and the samples of the epoch trained (the epoch's order is cut into global batches,
    loaders/common.epoch_indices), with the global batch that cut it; world_size for the log."""
    return dict(global_step=epochs_done * steps_per_epoch + next_batch, samples_seen=next_batch * global_batch,
                global_batch=global_batch, world_size=world_size)


def check_position(state: dict, path, global_batch: int) -> int:
    """The global step in its epoch that a resume starts at. Mid-epoch, the step means the same
    images only with the same global batch: another one is refused."""
    next_batch = state["next_batch"]
    saved = state.get("global_batch") or (state.get("config") or {}).get("batch_size")
    if next_batch and saved != global_batch:
        raise CheckpointError(f"--resume {path}: it stopped mid-epoch ({state.get('samples_seen', '?')} samples "
                              f"into epoch {state['epoch'] + 1}) at global batch {saved}, and --batch_size is "
                              f"{global_batch} here: resume with --batch_size {saved} (any number of processes), "
                              f"or from a checkpoint at an epoch's end")
    return next_batch


class Interval:
    """When to save a mid-epoch checkpoint: every N steps ('500') or every N minutes ('10min')."""

    def __init__(self, every: str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(min|m|steps?|)\s*", str(every))
        if not m:
            raise CheckpointError(f"--checkpoint-every {every}: give steps ('500') or minutes ('10min'); "
                                  f"0 turns it off")
        value, unit = float(m.group(1)), m.group(2)
        self.steps = int(value) if unit in ("", "step", "steps") else 0
        self.seconds = 60 * value if unit in ("min", "m") else 0.0
        self.restart()

    def restart(self):
        self.steps_since, self.since_s = 0, time.monotonic()

    def due(self) -> bool:
        """Called after each step: True (and a new interval) when a checkpoint is due."""
        self.steps_since += 1
        if (self.steps and self.steps_since >= self.steps) or (
                self.seconds and time.monotonic() - self.since_s >= self.seconds):
            self.restart()
            return True
        return False


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
