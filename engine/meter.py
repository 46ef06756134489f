"""Where an epoch's time goes: images per second and the share of it spent waiting for the loader.

Two windows over the same steps, kept on the host clock: the log window (reset at every log
point) and the timed window, which opens after the epoch's first warm-up steps (worker start-up,
JIT, cudnn autotuning, a new epoch's reader pool filling) with a device sync, so the epoch's img/s
and data-wait share are the steady state's; the wait for the epoch's first batch is reported
apart (`first_wait_s`). train.py (engine/loop.py) and bench/train_fps.py's end-to-end rows both
time with this meter, so their windows are the same steps of each epoch.
"""
import time
from typing import Callable


class StepMeter:
    def __init__(self, timed_from_step: int, sync: Callable[[], None] = lambda: None):
        self.timed_from_step, self.sync = timed_from_step, sync
        self.timed_start_s = None
        self.timed_wait_s, self.timed_images, self.timed_steps = 0.0, 0, 0
        self.first_wait_s = None  # the wait for the epoch's first batch: start-up, not stall
        self.restart_window()

    def restart_window(self):
        self.window_start_s, self.window_steps, self.window_images, self.window_wait_s = time.perf_counter(), 0, 0, 0.0

    def begin_step(self, i: int, wait_s: float):
        """Step i starts after `wait_s` seconds blocked on the loader."""
        if self.first_wait_s is None:
            self.first_wait_s = wait_s
        if i == self.timed_from_step:
            self.sync()  # the timed window opens on an idle device
            self.timed_start_s = time.perf_counter()
        elif self.timed_start_s is not None:
            self.timed_wait_s += wait_s
        self.window_wait_s += wait_s

    def end_step(self, images: int):
        self.window_steps += 1
        self.window_images += images
        if self.timed_start_s is not None:
            self.timed_images += images
            self.timed_steps += 1

    def take_window(self) -> dict:
        """The log window since the last call: img/s, data-wait share, steps; then a new window."""
        wall_s = time.perf_counter() - self.window_start_s
        out = {"imgs_per_s": self.window_images / wall_s, "data_wait_frac": self.window_wait_s / wall_s,
               "steps": self.window_steps, "wall_s": wall_s}
        self.restart_window()
        return out

    def close(self) -> dict:
        """The epoch's timed window, closed after a device sync (NaN when it never opened)."""
        self.sync()
        if self.timed_start_s is None:
            return {"imgs_per_s": float("nan"), "timed_images": 0, "timed_steps": 0, "timed_wall_s": float("nan"),
                    "data_wait_frac": float("nan"), "timed_wait_s": 0.0, "first_wait_s": self.first_wait_s}
        wall_s = time.perf_counter() - self.timed_start_s
        return {"imgs_per_s": self.timed_images / wall_s, "timed_images": self.timed_images,
                "timed_steps": self.timed_steps, "timed_wall_s": wall_s, "timed_wait_s": self.timed_wait_s,
                "data_wait_frac": self.timed_wait_s / wall_s if wall_s > 0 else float("nan"),
                "first_wait_s": self.first_wait_s}
