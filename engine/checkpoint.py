"""Checkpoints that survive a kill: written to a temporary name, then renamed over the old one;
which checkpoint a run continues from; and when to save one mid-epoch."""
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from core.errors import CheckpointError

CHECKPOINT = "checkpoint.pth"
BEST = "model_best.pth"
# What makes two runs the same run: a checkpoint in OUTPUT_DIR that differs in any of these (or in
# its classes) belongs to another run. Epochs may grow; workers, logging and paths may change.
RUN_KEYS = ("arch", "batch_size", "image_size", "opt", "learning_rate", "momentum", "wd", "rmsprop_alpha",
            "rmsprop_eps", "lr_scheduler", "lr_step_size", "lr_gamma", "warmup_epochs", "label_smoothing",
            "auto_augment", "random_erase", "mixup_alpha", "cutmix_alpha", "dropout", "model_ema", "seed",
            "pretrained", "bn_eps", "drop_path", "warmup_lr", "ra_magnitude_std", "random_erase_mode",
            "min_res", "max_res", "start_ramp", "end_ramp",
            "shuffle", "shuffle_window")  # the train order: a mid-epoch resume in another trains other samples


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

    def step(self) -> bool:
        """Called after each step: True when the step count is reached (the same step on every
        rank). The caller restarts the interval when it saves."""
        self.steps_since += 1
        return bool(self.steps) and self.steps_since >= self.steps

    def time_up(self) -> bool:
        """True once the minutes have passed: this rank's clock, which engine/stop.StopRequest
        agrees on across ranks so that every rank saves at the same step."""
        return bool(self.seconds) and time.monotonic() - self.since_s >= self.seconds


# Each rank's own generators: the CPU's and python's (dropout, drop-path on the CPU) and its own
# device's, never another device's: a process that sees fewer devices resumes as well.
def seed_rank(seed: int, rank: int, global_step: int = 0):
    """This rank's generators from (seed, rank) (and the step, for a state made up mid-run), so
    ranks draw different dropout masks. The loaders' sample order and crops and the augmentations
    are seeded apart, from --seed, the step and the rank, and the model's initial weights from
    --seed alone (they are the same on every rank)."""
    derived = int(np.random.SeedSequence([seed, rank, global_step]).generate_state(1, np.uint64)[0] >> 1)
    torch.manual_seed(derived)  # every device's generator too
    random.seed(derived)


def own_rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng_state(runtime, everyone: bool = True) -> dict | None:
    """Every rank's generator states, by rank, on rank 0 (None on the others): a collective that
    every rank enters at the same step. everyone=False (one rank writes alone, the others are
    elsewhere): only this rank's, the others' left None."""
    own = own_rng_state(runtime.device)
    if not runtime.distributed or not everyone:
        ranks = [own if r == runtime.rank else None for r in range(runtime.world_size)]
        return {"world_size": runtime.world_size, "ranks": ranks}
    ranks = [None] * runtime.world_size if runtime.is_main else None
    dist.gather_object(own, ranks, dst=0, group=runtime.cpu_group)
    return {"world_size": runtime.world_size, "ranks": ranks} if runtime.is_main else None


def restore_rng_state(saved: dict, runtime, seed: int, global_step: int, log) -> list[int]:
    """This rank takes the state its rank saved; a rank the checkpoint has none for (a resume on
    more processes than saved it) gets one from (seed, rank, global_step). The ranks without a
    saved state, which rank 0 names in the log."""
    ranks = saved["ranks"] if "ranks" in saved else [_from_rank0_only(saved)]
    made_up = [r for r in range(runtime.world_size) if r >= len(ranks) or ranks[r] is None]
    seed_rank(seed, runtime.rank, global_step)
    own = ranks[runtime.rank] if runtime.rank not in made_up else None
    if own is not None:
        torch.set_rng_state(own["torch"])
        random.setstate(_as_tuple(own["python"]))
        if "cuda" in own and runtime.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"], runtime.device)
    if made_up:
        log(f"train.py: the checkpoint holds the generator states of {len(ranks) - sum(r is None for r in ranks)} "
            f"of {runtime.world_size} ranks; rank(s) {', '.join(map(str, made_up))} start theirs from (--seed, rank, "
            f"step {global_step}): their dropout masks differ from the run that saved it")
    return made_up


def _from_rank0_only(saved: dict) -> dict:
    """A checkpoint from before per-rank states: rank 0's CPU state, and of its devices' states
    (it saved one per device it saw) the first, rank 0's own on one node."""
    state = {"torch": saved["torch"], "python": saved["python"]}
    if saved.get("cuda"):
        state["cuda"] = saved["cuda"][0]
    return state


def _as_tuple(x):
    """random.setstate wants the tuples back that serialisation may have turned into lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
