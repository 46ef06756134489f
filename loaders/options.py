"""Each loader's own options, typed: `build_loader` turns the options dict into one of these, and a
key a loader does not have is an error that names the ones it does.

A field's metadata names the trainer flag (argparse dest) it comes from, so train.py hands each
loader exactly its own settings.
"""
from dataclasses import dataclass, field, fields

from core.errors import LoaderError

SOURCES = ("auto", "shards", "folder")
DECODES = ("auto", "cpu", "device")
DEVICE_DECODERS = ("torchvision", "dali")  # the loaders that can decode where the batch trains


def _decode_field():
    return field(default="auto", metadata={"flag": "decode"})


class _Decode:
    """The `decode` option: "cpu" (host threads), "device" (where the batch trains), "auto"
    (device on CUDA where the loader can, else cpu)."""
    device_decode = True  # whether the loader can decode on the device

    def _check_decode(self, loader: str):
        _choice("--decode", self.decode, DECODES)
        if self.decode == "device" and not self.device_decode:
            raise LoaderError(f"--decode device: --loader {loader} decodes on the CPU only; the loaders that "
                              f"decode on the device are {', '.join(DEVICE_DECODERS)} (or use --decode cpu)")

    def resolved_decode(self, device) -> str:
        """"cpu" or "device" for a loader delivering to `device` (a torch.device)."""
        if self.decode == "auto":
            return "device" if self.device_decode and device.type == "cuda" else "cpu"
        return self.decode


def _choice(flag: str, value, choices):
    if value not in choices:
        raise LoaderError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class FFCVOptions(_Decode):
    os_cache: bool = field(default=True, metadata={"flag": "os_cache"})  # the OS page cache holds the .beton
    order: str = field(default="random", metadata={"flag": "ffcv_order"})  # random | quasi_random
    beton_dir: str | None = None  # default DATA/ffcv
    decode: str = _decode_field()  # auto | cpu: FFCV decodes in its JIT-compiled CPU threads
    device_decode = False

    def __post_init__(self):
        _choice("--ffcv-order", self.order, ("random", "quasi_random"))
        self._check_decode("ffcv")


@dataclass(frozen=True)
class DALIOptions(_Decode):
    shards_dir: str | None = None  # default DATA/shards
    source: str = "auto"  # shards when present, else the ImageFolder
    decode: str = _decode_field()  # device: DALI's "mixed" decoder (nvJPEG, hardware engine), CUDA only
    prefetch: int = 2  # batches queued ahead
    hw_decoder_load: float = 0.65  # mixed: the share of each batch for the hardware JPEG engine (DALI's default)

    def __post_init__(self):
        _choice("source", self.source, SOURCES)
        self._check_decode("dali")
        if self.prefetch < 1:
            raise LoaderError(f"prefetch {self.prefetch}: queue at least 1 batch")
        if not 0 <= self.hw_decoder_load <= 1:
            raise LoaderError(f"hw_decoder_load {self.hw_decoder_load}: a share of the batch, 0..1")


@dataclass(frozen=True)
class TorchvisionOptions(_Decode):
    shards_dir: str | None = None  # default DATA/shards
    source: str = "auto"  # shards when present, else the ImageFolder
    # shard samples failing their checksum that are left out (and counted) before the loader stops
    max_bad_samples: int = field(default=0, metadata={"flag": "max_bad_samples"})
    decode: str = _decode_field()  # device: workers read bytes, the batch is decoded where it trains

    def __post_init__(self):
        _choice("source", self.source, SOURCES)
        self._check_decode("torchvision")
        if self.max_bad_samples < 0:
            raise LoaderError(f"--max-bad-samples {self.max_bad_samples}: use 0 (stop at the first) or more")


def make_options(name: str, cls, options: dict):
    """`cls(**options)`, or a LoaderError naming the unknown keys and the valid ones."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise LoaderError(f"--loader {name}: unknown option(s) {', '.join(unknown)}; "
                          f"its options are {', '.join(valid)}")
    return cls(**options)


def options_from_flags(cls, flags) -> dict:
    """The options of `cls` that come from trainer flags, read from the parsed flags `flags`."""
    return {f.name: getattr(flags, f.metadata["flag"]) for f in fields(cls) if "flag" in f.metadata}
