"""The converter's record shards (convert/to_shards.py): where they are, and their DALI index files
read as a table of samples, so any reader can seek straight to a sample's bytes.

Index format v1.2, as DALI's wds2idx writes it: a line `v1.2 <samples>`, then per sample
`<ext> <data offset> <size> <member name>` for each of its files, in tar order.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.dataset import check_class_map, read_class_map
from core.errors import DatasetError
from core.manifest import crc32c, read_sample_crcs


@dataclass
class Shards:
    folder: Path
    tars: list[Path]
    classes: list[str]

    @property
    def indexes(self) -> list[Path]:
        return [t.with_suffix(".idx") for t in self.tars]

    @property
    def checksums(self) -> list[Path]:
        """Per-sample checksums beside each index (core/manifest.py); absent for older conversions."""
        return [t.with_suffix(".crc") for t in self.tars]

    def count(self) -> int:
        """Samples in all shards: each index file starts with "v1.2 N"."""
        total = 0
        for index in self.indexes:
            with open(index) as f:
                total += int(f.readline().split()[1])
        return total

    def _entries(self):
        """(tar number, the index line's fields) for every sample, in order."""
        for t, index in enumerate(self.indexes):
            for line in Path(index).read_text().splitlines()[1:]:
                yield t, line.split()

    def samples(self) -> np.ndarray:
        """One row per sample: tar number, jpg offset, jpg size, cls offset, cls size."""
        rows = []
        for t, parts in self._entries():
            fields = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
            rows.append((t, *fields["jpg"], *fields["cls"]))
        return np.array(rows, dtype=np.int64).reshape(-1, 5)

    def sample_names(self) -> list[str]:
        """Each sample as a user finds it: "DATA/shards/train-000003.tar: 00000012_n01440764_13" (tar, key)."""
        return [f"{self.tars[t]}: {parts[3].rsplit('.', 1)[0]}" for t, parts in self._entries()]

    def sample_checksums(self) -> np.ndarray | None:
        """N x 2 uint32 (.jpg, .cls) checksums in sample order, or None when a shard has none."""
        if not all(p.exists() for p in self.checksums):
            return None
        return np.concatenate([read_sample_crcs(p) for p in self.checksums])


def damaged_samples(tar: Path) -> list[str]:
    """The samples of one shard whose bytes differ from the checksums beside its index, named as
    sample_names() names them ([] when intact or when the shard has no .crc file)."""
    shards = Shards(Path(tar).parent, [Path(tar)], classes=[])
    crcs = shards.sample_checksums()
    if crcs is None:
        return []
    rows, names, damaged = shards.samples(), shards.sample_names(), []
    with open(tar, "rb") as f:
        for row, (jpg_crc, cls_crc), name in zip(rows, crcs, names):
            for (offset, size), expected, ext in (((row[1], row[2]), jpg_crc, "jpg"), ((row[3], row[4]), cls_crc, "cls")):
                f.seek(offset)
                if crc32c(f.read(size)) != expected:
                    damaged.append(f"{name} ({ext} damaged)")
    return damaged


def find_shards(folder: Path, split: str, data: Path, required: bool = True) -> Shards | None:
    """The shards of `split` in `folder`, their class map checked against data/split's folders.

    None when there are none and they are not `required`; the messages name the converter's command."""
    folder, data = Path(folder), Path(data)
    tars = sorted(folder.glob(f"{split}-*.tar"))
    if not tars:
        if required:
            raise DatasetError(f"no {split}-*.tar shards under {folder}: run `python convert/to_shards.py {data}`")
        return None
    missing = [t.with_suffix(".idx") for t in tars if not t.with_suffix(".idx").exists()]
    if missing:
        raise DatasetError(f"missing DALI index {missing[0]}: re-run `python convert/to_shards.py {data}`")
    class_map = folder / "classes.json"
    if not class_map.exists():
        raise DatasetError(f"no classes.json beside the shards in {folder}: re-run `python convert/to_shards.py {data}`")
    classes = check_class_map(read_class_map(class_map), data / split, class_map)
    return Shards(folder, tars, classes)
