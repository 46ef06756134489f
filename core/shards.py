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


@dataclass
class Shards:
    folder: Path
    tars: list[Path]
    classes: list[str]

    @property
    def indexes(self) -> list[Path]:
        return [t.with_suffix(".idx") for t in self.tars]

    def count(self) -> int:
        """Samples in all shards: each index file starts with "v1.2 N"."""
        total = 0
        for index in self.indexes:
            with open(index) as f:
                total += int(f.readline().split()[1])
        return total

    def samples(self) -> np.ndarray:
        """One row per sample: tar number, jpg offset, jpg size, cls offset, cls size."""
        rows = []
        for t, index in enumerate(self.indexes):
            for line in Path(index).read_text().splitlines()[1:]:
                parts = line.split()
                fields = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
                rows.append((t, *fields["jpg"], *fields["cls"]))
        return np.array(rows, dtype=np.int64).reshape(-1, 5)


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
