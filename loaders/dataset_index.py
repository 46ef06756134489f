"""The ImageFolder as a list: class names in label order, image paths and their labels."""
from dataclasses import dataclass
from pathlib import Path

from loaders.common import check_class_map, folder_classes, read_class_map

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
CONVERTED_DIRS = ("ffcv", "shards")  # where the converters leave classes.json


@dataclass
class SplitIndex:
    classes: list
    paths: list
    labels: list


def split_index(data: Path, split: str) -> SplitIndex:
    """Scan data/split; labels follow any converter's classes.json found beside it."""
    data = Path(data)
    split_dir = data / split
    if not split_dir.is_dir():
        raise SystemExit(f"no {split}/ folder under {data}: expected the ImageNet layout "
                         f"{data}/{split}/<class>/<image>")
    classes = folder_classes(split_dir)
    for sub in CONVERTED_DIRS:
        class_map = data / sub / "classes.json"
        if class_map.exists():
            check_class_map(read_class_map(class_map), split_dir, class_map)
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise SystemExit(f"no images under {split_dir}")
    return SplitIndex(classes, paths, labels)

