"""The training resolution per epoch: low early, raised late (FFCV's progressive resizing).

Smaller crops early make an epoch cheaper (decoding, resizing and the model all scale with the
pixels) while the network learns coarse features; raising the resolution at the end, and
evaluating above it (the train/test resolution effect), recovers the accuracy.
"""
from dataclasses import dataclass

from core.errors import ConfigError

STEP_PX = 32  # resolutions are multiples of this, as FFCV's schedule rounds them


@dataclass(frozen=True)
class ResolutionSchedule:
    """min_px until epoch start_ramp, then a linear ramp to max_px at epoch end_ramp, rounded down
    to a multiple of 32 (never below min_px); epochs count from 0, the epoch being trained."""
    min_px: int
    max_px: int
    start_ramp: int
    end_ramp: int

    def __post_init__(self):
        if not 16 <= self.min_px <= self.max_px:
            raise ConfigError(f"--min-res {self.min_px} / --max-res {self.max_px}: need 16 <= min-res <= max-res")
        if not 0 <= self.start_ramp <= self.end_ramp:
            raise ConfigError(f"--start-ramp {self.start_ramp} / --end-ramp {self.end_ramp}: need 0 <= start <= end")

    @classmethod
    def fixed(cls, px: int) -> "ResolutionSchedule":
        return cls(px, px, 0, 0)

    def at(self, epoch: int) -> int:
        if epoch <= self.start_ramp:
            return self.min_px
        if epoch >= self.end_ramp:
            return self.max_px
        px = self.min_px + (self.max_px - self.min_px) * (epoch - self.start_ramp) / (self.end_ramp - self.start_ramp)
        return max(self.min_px, int(px) // STEP_PX * STEP_PX)
