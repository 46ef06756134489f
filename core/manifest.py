"""Checksums of converted data: written by the converters beside what they publish, checked by
`python convert/verify.py`, by train.py at start (sizes) and by the loaders that read shard
samples one by one (each sample's checksum).

- OUT/manifest.json: for every published file its size and the CRC32C of each CHUNK_BYTES chunk,
  so a check names the damaged byte range, not only the file.
- OUT/<split>-NNNNNN.crc beside each shard's index: one line per sample, in index order,
  "<crc32c of the .jpg> <crc32c of the .cls>" in hex: a reader checks a sample as it reads it.

CRC32C (Castagnoli) is what TFRecord stores per record; google-crc32c computes it in hardware at
several GB/s, so a full check runs at the disk's speed.
"""
import json
from pathlib import Path

import numpy as np

from core.errors import ConfigError

try:
    import google_crc32c
except ImportError as missing:  # only checksumming needs it: importing the loaders (a training step) does not
    class _Missing:
        def __getattr__(self, name, error=str(missing)):
            raise ConfigError(f"google-crc32c does not import ({error}): it checksums converted data; "
                              f"pip install google-crc32c (on a lent GPU: bash bench/carry_ffcv.sh)")

    google_crc32c = _Missing()

MANIFEST = "manifest.json"
CHUNK_BYTES = 16 << 20
VERSION = 1


def crc32c(data) -> int:
    return google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)


def describe(path: Path, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """What the manifest records of one file: its size and the checksum of each chunk."""
    crcs = []
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            crcs.append(google_crc32c.value(chunk))
    return {"size": Path(path).stat().st_size, "chunk_bytes": chunk_bytes, "crc32c": crcs}


def read_manifest(folder: Path) -> dict | None:
    """{file name: description}, or None for a folder converted before manifests existed."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())["files"]


def manifest_text(folder: Path, described: dict, keep) -> str:
    """The new manifest.json of `folder`: `described` ({name: describe(...)}) over the entries of
    the old one that `keep(name)` keeps (the files still there after this run)."""
    files = {name: d for name, d in (read_manifest(folder) or {}).items() if keep(name)}
    files.update(described)
    return json.dumps({"version": VERSION, "checksum": "crc32c", "files": dict(sorted(files.items()))}) + "\n"


def _size_problem(path: Path, d: dict) -> str | None:
    """The file is missing or of another size than the converter wrote (None: neither)."""
    if not path.exists():
        return f"{path}: missing"
    if path.stat().st_size != d["size"]:
        return f"{path}: {path.stat().st_size} bytes, the converter wrote {d['size']}"
    return None


def size_problems(folder: Path) -> list[str]:
    """Cheap: files of the manifest that are missing or of another size."""
    found = (_size_problem(Path(folder) / name, d) for name, d in (read_manifest(folder) or {}).items())
    return [p for p in found if p]


def chunk_problems(path: Path, d: dict) -> list[str]:
    """Full check of one file against its description: each damaged chunk's byte range."""
    path = Path(path)
    if problem := _size_problem(path, d):
        return [problem]
    problems, step = [], d["chunk_bytes"]
    with open(path, "rb") as f:
        for i, expected in enumerate(d["crc32c"]):
            if google_crc32c.value(f.read(step)) != expected:
                problems.append(f"{path}: bytes {i * step}-{min((i + 1) * step, d['size']) - 1} are damaged "
                                f"(checksum differs from the converter's)")
    return problems


def sample_crc_text(crcs: list[tuple[int, int]]) -> str:
    return "".join(f"{jpg:08x} {cls:08x}\n" for jpg, cls in crcs)


def read_sample_crcs(path: Path) -> np.ndarray:
    """N x 2 uint32: the .jpg and .cls checksums of each sample of a shard, in index order."""
    rows = [line.split() for line in Path(path).read_text().splitlines()]
    return np.array([[int(a, 16), int(b, 16)] for a, b in rows], dtype=np.uint32).reshape(-1, 2)
