"""Each loader's own options, typed: `build_loader` turns the options dict into one of these, and a
key a loader does not have is an error that names the ones it does.

A field's metadata names the trainer flag (argparse dest) it comes from, so train.py hands each
loader exactly its own settings.
"""
from dataclasses import dataclass, field, fields

from core.errors import LoaderError

SOURCES = ("auto", "shards", "folder")


def _choice(flag: str, value, choices):
    if value not in choices:
        raise LoaderError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class FFCVOptions:
    os_cache: bool = field(default=True, metadata={"flag": "os_cache"})  # the OS page cache holds the .beton
    order: str = field(default="random", metadata={"flag": "ffcv_order"})  # random | quasi_random
    beton_dir: str | None = None  # default DATA/ffcv

    def __post_init__(self):
        _choice("--ffcv-order", self.order, ("random", "quasi_random"))


@dataclass(frozen=True)
class DALIOptions:
    shards_dir: str | None = None  # default DATA/shards
    source: str = "auto"  # shards when present, else the ImageFolder
    decode: str = field(default="cpu", metadata={"flag": "dali_decode"})  # cpu | mixed (nvJPEG)
    prefetch: int = 2  # batches queued ahead

    def __post_init__(self):
        _choice("source", self.source, SOURCES)
        _choice("--dali-decode", self.decode, ("cpu", "mixed"))
        if self.prefetch < 1:
            raise LoaderError(f"prefetch {self.prefetch}: queue at least 1 batch")


@dataclass(frozen=True)
class TorchvisionOptions:
    shards_dir: str | None = None  # default DATA/shards
    source: str = "auto"  # shards when present, else the ImageFolder
    # shard samples failing their checksum that are left out (and counted) before the loader stops
    max_bad_samples: int = field(default=0, metadata={"flag": "max_bad_samples"})

    def __post_init__(self):
        _choice("source", self.source, SOURCES)
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
