"""An ImageNet-layout folder as lists of files and labels, and the class map that fixes the labels.

    DATASET/train/<class>/<image>   DATASET/val/<class>/<image>

Class order is torchvision's ImageFolder order (sorted folder names); the converters write it to
classes.json, and every loader checks the folders against it so labels never shift silently.
"""
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import DatasetError

SPLITS = ("train", "val")
# torchvision's ImageFolder list, so a converted split holds exactly the files ImageFolder would load.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CONVERTED_DIRS = ("ffcv", "shards")  # where the converters leave classes.json


@dataclass
class Split:
    name: str
    root: Path
    # Relative paths as one numpy bytes array, not a list of str: forked workers read it without
    # touching refcounts, so it is never copied into each worker (1.28 M paths ~ 50 MB once).
    files: np.ndarray
    labels: np.ndarray  # int32, index into Dataset.classes

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.files[i])

    def rel(self, i: int) -> str:
        """The file as a user finds it under the dataset root, e.g. train/n01440764/x.JPEG."""
        return f"{self.name}/{os.fsdecode(self.files[i])}"


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    splits: dict[str, Split]
    ignored: Counter  # non-image files left out, by extension (or by name for dotfiles like .DS_Store)


def class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())  # ImageFolder.find_classes


def _kind(name: str) -> str:
    return os.path.splitext(name)[1].lower() or name


def scan(root, splits=SPLITS, limit: int | None = None) -> Dataset:
    """List every image of `splits` in ImageFolder order (sorted classes, then sorted paths), with labels.

    Raises DatasetError for a missing or empty folder, a missing split, class folders that differ
    between splits, and class folders without images. `limit` keeps the first N images per split.
    """
    root = Path(root)
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (ImageNet layout)"
    if not root.exists():
        raise DatasetError(f"no such folder: {root}: pass the dataset root, the folder that holds train/ and val/")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder: pass the dataset root that holds train/ and val/")
    if not any(root.iterdir()):
        raise DatasetError(f"{root} is empty: {layout}; try `python convert/make_sample.py {root}` for a sample")
    if not (root / "train").is_dir():
        raise DatasetError(f"no train/ folder in {root}: {layout}")
    classes = class_dirs(root / "train")
    if not classes:
        raise DatasetError(f"{root}/train has no class folders: {layout}")
    # val/ is checked whenever it exists, so labels mean the same in every split ever converted.
    for name in dict.fromkeys([*splits, "val"]):
        split_dir = root / name
        if not split_dir.is_dir():
            if name in splits:
                raise DatasetError(f"no {name}/ folder in {root}: add it, or pass --splits "
                                   f"{','.join(s for s in splits if s != name) or 'train'}")
            continue
        theirs = class_dirs(split_dir)
        if theirs != classes:
            only_train = sorted(set(classes) - set(theirs))
            only_other = sorted(set(theirs) - set(classes))
            raise DatasetError(f"train/ and {name}/ must have the same class folders: "
                               f"only in train/: {', '.join(only_train) or '-'}; "
                               f"only in {name}/: {', '.join(only_other) or '-'}")

    ignored, empty, out = Counter(), [], {}
    for name in splits:
        split_dir = root / name
        ignored.update(_kind(e.name) for e in os.scandir(split_dir) if not e.is_dir())
        files, labels = [], []
        for label, cls in enumerate(classes):
            before = len(files)
            for folder, _, names in sorted(os.walk(split_dir / cls, followlinks=True)):  # ImageFolder's walk
                for fname in sorted(names):
                    if fname.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(os.fsencode(os.path.relpath(os.path.join(folder, fname), split_dir)))
                    else:
                        ignored[_kind(fname)] += 1
            if len(files) == before:
                empty.append(f"{name}/{cls}")
            labels += [label] * (len(files) - before)
        if limit is not None:
            files, labels = files[:limit], labels[:limit]
        out[name] = Split(name, split_dir, np.array(files, dtype=bytes), np.array(labels, dtype=np.int32))
    if empty:
        raise DatasetError(f"class folders with no images in {root}: {', '.join(empty)}: "
                           f"add images or remove the folder (from every split)")
    return Dataset(root, classes, out, ignored)


def read_class_map(path: Path) -> list[str]:
    return json.loads(Path(path).read_text())


def check_class_map(classes: list[str], split_dir: Path, source: Path) -> list[str]:
    """Fail loudly when the class folders of `split_dir` disagree with the class map `source`."""
    split_dir = Path(split_dir)
    if split_dir.is_dir():
        found = class_dirs(split_dir)
        if found != classes:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            detail = (f"only in {source}: {missing[:5]}; only in {split_dir}: {extra[:5]}"
                      if missing or extra else "same names in a different order")
            raise DatasetError(f"class map {source} disagrees with the class folders of {split_dir} "
                               f"({detail}): labels would shift. Re-run the converter on {split_dir.parent}.")
    return classes


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
