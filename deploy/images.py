"""Image files -> the model's input, through the loaders' own val preprocessing.

Decoding is the torchvision loader's (loaders/device_decode.py: TorchCodec, libjpeg-turbo; PNG,
grayscale and CMYK come out RGB), the resize and center crop are its val transform (loaders/torchvision_loader.py
`transforms_for`), and normalisation is `loaders.normalize`: a prediction sees the pixels that
evaluation saw. A file that does not decode is reported with its reason; the others go on.
"""
from pathlib import Path

import torch

from core.dataset import IMAGE_EXTENSIONS
from loaders.common import VAL_CROP_RATIO, LoaderSpec
from loaders.device_decode import decode_error, decode_image
from loaders.torchvision_loader import transforms_for


def find_images(paths) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files as given (whatever their extension), folders walked in sorted order for image files;
    and (path, why) for each path that does not exist."""
    files, missing = [], []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            missing.append((path, "no such file or folder"))
    return files, missing


def read_images(files, image_size: int, crop_ratio: float = VAL_CROP_RATIO
                ) -> tuple[torch.Tensor | None, list[Path], list[tuple[Path, str]]]:
    """uint8 N x 3 x S x S (the val crops of the files that decode, or None), those files, and
    (file, why) for each file that does not."""
    transform = transforms_for(LoaderSpec(split="val", data=Path("."), batch_size=1, image_size=image_size,
                                          val_crop_ratio=crop_ratio))
    crops, good, bad = [], [], []
    for path in files:
        try:
            image = decode_image(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8))
        except Exception as e:  # every way a file can fail to decode: reported, and the rest answered
            bad.append((path, decode_error(e)))
            continue
        crops.append(transform(image))
        good.append(Path(path))
    return (torch.stack(crops) if crops else None), good, bad
