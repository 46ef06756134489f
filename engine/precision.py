"""One precision path: autocast when enabled, a loss scaler only for float16; mixed precision only
where the device has a fast path for it."""
from dataclasses import dataclass, field

import torch

from core.errors import ConfigError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def cpu_capabilities() -> dict:
    return dict(torch.cpu.get_capabilities())


def fast_dtypes(device: torch.device) -> tuple[list[torch.dtype], str]:
    """The autocast dtypes that run faster than fp32 on `device`, best first, and if none, why."""
    if device.type == "cuda":
        if torch.version.hip:
            return [torch.bfloat16, torch.float16], ""
        major, minor = cuda_capability(device)
        # bf16 tensor cores from Ampere (8.0) on, fp16 ones from Volta (7.0) on: what
        # torch.cuda.is_bf16_supported(including_emulation=False) checks, for this device.
        if major >= 8:
            return [torch.bfloat16, torch.float16], ""
        if major >= 7:
            return [torch.float16], ""
        return [], f"compute capability {major}.{minor} has no fp16/bf16 tensor cores"
    if device.type == "npu":
        return [torch.float16], ""  # the reference's apex O2 on Ascend; bf16 only on some chips
    if device.type == "cpu":
        caps = cpu_capabilities()
        # Without AMX, oneDNN runs bf16/fp16 convolutions (and MobileNet's depthwise ones above
        # all) far slower than fp32: ~10x per training step on an AVX-512-BF16 CPU (bench/README).
        fast = [dtype for dtype, amx in ((torch.bfloat16, "amx_bf16"), (torch.float16, "amx_fp16")) if caps.get(amx)]
        return fast, "" if fast else "this CPU has no AMX, and autocast without it runs ~10x slower than fp32"
    return [], f"no known fast autocast path on {device.type}"


@dataclass(frozen=True)
class Precision:
    enabled: bool
    dtype: torch.dtype = torch.bfloat16
    note: str | None = field(default=None, compare=False)  # one line for the log: why not the asked-for path

    @classmethod
    def resolve(cls, amp: bool, amp_dtype: str, device: torch.device) -> "Precision":
        """`amp` with `amp_dtype` auto: the device's fastest autocast dtype (bf16 on Ampere and
        later, fp16 on Volta/Turing and NPUs, bf16 on AMX CPUs), or fp32 where none is faster,
        with a `note` saying so. An explicit dtype is honoured; where it is slow, `note` says that."""
        if amp_dtype != "auto" and amp_dtype not in DTYPES:
            raise ConfigError(f"--amp-dtype {amp_dtype}: choose auto, {', '.join(DTYPES)}")
        if not amp:
            return cls(False)
        fast, why = fast_dtypes(device)
        if amp_dtype == "auto":
            if fast:
                return cls(True, fast[0])
            return cls(False, note=f"mixed precision on {device.type}: training in fp32, faster here ({why}); "
                                   f"--amp-dtype bfloat16 or float16 forces autocast")
        dtype = DTYPES[amp_dtype]
        if dtype in fast:
            return cls(True, dtype)
        return cls(True, dtype, note=f"--amp-dtype {amp_dtype} on {device.type}: slower than fp32 here "
                                     f"({why or 'no fast path for it'}); --amp-dtype auto picks the faster precision")

    @property
    def name(self) -> str:
        return NAMES[self.dtype] if self.enabled else "fp32"

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.enabled)
