"""The pixels a converter stores: decode any image file to RGB, shrink it to the max resolution.

Both converters use this, so a .beton and the record shards hold the same pixels.
"""
import ctypes
import multiprocessing
import os
import signal
import sys

import cv2
import numpy as np
from PIL import Image, ImageFile

# Defaults shared by both converters (and the benchmark), so .beton files and shards hold the same pixels.
MAX_RES_PX = 512
JPEG_QUALITY = 90

MAX_RES_HELP = (
    f"longest image side kept, in px (default {MAX_RES_PX}); larger images are shrunk (cv2 INTER_AREA, "
    "the filter FFCV uses), smaller ones are kept as they are. Why 512: most ImageNet photos are "
    "500x375 or 500x333, so 512 keeps them at native resolution (FFCV's ImageNet recipe used 500). "
    "Training at 224 px crops boxes down to 8%% of the image area (RandomResizedCrop) and scales "
    "them up to 224: at 512x384 such a box is still ~125 px wide; at 256 it would be ~60 px and blurry."
)


class BadImage(Exception):
    """An image file that cannot be decoded completely."""


def load_rgb(path) -> np.ndarray:
    """Decode any image file to H x W x 3 uint8 RGB, the way ImageFolder does (PIL, .convert('RGB')).

    PIL reads the file's content, not its name, so a PNG named .JPEG decodes as PNG; CMYK
    (Adobe-inverted too) and grayscale JPEGs become RGB. Anything incomplete raises BadImage.
    """
    # Another import may have set this; with it True, PIL pads a truncated JPEG with grey and
    # returns it as a valid image. The converters must reject such files instead.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # every way a file can fail to decode is a bad file, reported with its reason
        raise BadImage(f"{type(e).__name__}: {e}") from None


def resize_max(img: np.ndarray, max_res_px: int) -> np.ndarray:
    """Shrink so the longest side is max_res_px; never enlarge. The rule and filter of FFCV's
    RGBImageField (size truncated to int, cv2 INTER_AREA), so a .beton and the shards agree."""
    h, w = img.shape[:2]
    scale = max_res_px / max(h, w)
    if scale >= 1:
        return img
    size = (max(1, int(w * scale)), max(1, int(h * scale)))  # (width, height), as cv2 wants
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def load_image(path, max_res_px: int) -> np.ndarray:
    """The pixels a converter stores for `path`: decoded to RGB, then shrunk to max_res_px."""
    return resize_max(load_rgb(path), max_res_px)


def worker_setup():
    """Run once in each worker process: one OpenCV thread (the parallelism is the processes), and
    die with the parent, so a SIGKILLed converter (OOM killer, kill -9) leaves no orphans behind."""
    cv2.setNumThreads(1)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        # The parent died before prctl took effect, and we were reparented to init or a subreaper.
        parent = multiprocessing.parent_process()
        if os.getppid() == 1 or (parent is not None and os.getppid() != parent.pid):
            os._exit(1)
