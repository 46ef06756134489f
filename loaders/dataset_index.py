"""The ImageFolder as a list, from the converters' own scan: the same files, classes and labels
that convert/to_ffcv.py and convert/to_shards.py would write."""
from dataclasses import dataclass
from pathlib import Path

from convert.scan import scan
from loaders.common import check_class_map, read_class_map

CONVERTED_DIRS = ("ffcv", "shards")  # where the converters leave classes.json


@dataclass
class SplitIndex:
    classes: list
    paths: list
    labels: list


def split_index(data: Path, split: str) -> SplitIndex:
    """Scan data/split; a converter's classes.json beside it must agree with the class folders."""
    data = Path(data)
    dataset = scan(data, splits=(split,))
    for sub in CONVERTED_DIRS:
        class_map = data / sub / "classes.json"
        if class_map.exists():
            check_class_map(read_class_map(class_map), data / split, class_map)
    found = dataset.splits[split]
    return SplitIndex(dataset.classes, [found.path(i) for i in range(len(found))], found.labels.tolist())
