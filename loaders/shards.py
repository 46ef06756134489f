"""The converter's record shards (convert/to_shards.py): where they are, and their DALI index files
read as a list of samples, so any loader can seek straight to a sample's bytes."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loaders.common import LoaderSpec, check_class_map, read_class_map


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


def find_shards(spec: LoaderSpec, required: bool) -> Shards | None:
    """The shards of spec.split (option shards_dir, default DATA/shards), checked against the folders."""
    folder = Path(spec.options.get("shards_dir") or spec.data / "shards")
    tars = sorted(folder.glob(f"{spec.split}-*.tar"))
    if not tars:
        if required:
            raise SystemExit(f"no {spec.split}-*.tar shards under {folder}: "
                             f"run `python convert/to_shards.py {spec.data}`")
        return None
    missing = [t.with_suffix(".idx") for t in tars if not t.with_suffix(".idx").exists()]
    if missing:
        raise SystemExit(f"missing DALI index {missing[0]}: re-run `python convert/to_shards.py {spec.data}`")
    class_map = folder / "classes.json"
    if not class_map.exists():
        raise SystemExit(f"no classes.json beside the shards in {folder}: re-run `python convert/to_shards.py {spec.data}`")
    classes = check_class_map(read_class_map(class_map), spec.data / spec.split, class_map)
    return Shards(folder, tars, classes)


def use_shards(spec: LoaderSpec) -> Shards | None:
    """Option source: "auto" (shards when present, else the folder), "shards" or "folder"."""
    source = spec.options.get("source", "auto")
    if source not in ("auto", "shards", "folder"):
        raise SystemExit(f"source {source!r}: choose auto, shards or folder")
    return None if source == "folder" else find_shards(spec, required=source == "shards")
