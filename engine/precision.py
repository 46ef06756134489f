"""One precision path: autocast when enabled, a loss scaler only for float16."""
from dataclasses import dataclass

import torch

from core.errors import ConfigError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    enabled: bool
    dtype: torch.dtype = torch.bfloat16

    @classmethod
    def resolve(cls, amp: bool, amp_dtype: str, device: torch.device) -> "Precision":
        """`amp_dtype` auto: float16 on accelerators (the reference's apex O1/O2), bfloat16 on the
        CPU, whose fast autocast path it is."""
        if amp_dtype == "auto":
            return cls(amp, torch.bfloat16 if device.type == "cpu" else torch.float16)
        if amp_dtype not in DTYPES:
            raise ConfigError(f"--amp-dtype {amp_dtype}: choose auto, {', '.join(DTYPES)}")
        return cls(amp, DTYPES[amp_dtype])

    @property
    def name(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype] if self.enabled else "fp32"

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.enabled)
