"""ONNX: a trained network written with its preprocessing in the metadata, read back and run by
onnxruntime on the CPU, and timed.

The file's input `images` is N x 3 x S x S, RGB, normalised as `loaders.normalize` does
((pixel / 255 - mean) / std), float32 (float16 with fp16=True); its output `logits` is N x classes,
float32 or float16 alike. N is a dynamic axis. The metadata holds what a runtime needs to feed it:
classes (JSON list, label order), image_size, resize_size, crop_ratio, interpolation, mean, std.
"""
import contextlib
import io
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import ConfigError
from deploy.weights import Trained, fold_batchnorm
from loaders.common import IMAGENET_MEAN, IMAGENET_STD, VAL_CROP_RATIO, val_resize_px

INPUT, OUTPUT = "images", "logits"
EXAMPLE_BATCH = 2  # torch.export specialises a dimension of size 1: trace at 2, run at any N
INSTALL = "pip install onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2 (in requirements.txt)"


@dataclass(frozen=True)
class Preprocess:
    """The loaders' val preprocessing at one size, as the metadata states it."""
    image_size: int
    resize_size: int  # the shorter side before the center crop
    crop_ratio: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear, antialiased"

    @classmethod
    def of_loaders(cls, image_size: int, crop_ratio: float = VAL_CROP_RATIO) -> "Preprocess":
        return cls(image_size, val_resize_px(image_size, crop_ratio), crop_ratio, IMAGENET_MEAN, IMAGENET_STD)


def metadata(trained: Trained) -> dict[str, str]:
    """The metadata_props written into the file (ONNX metadata values are strings)."""
    pre = {k: json.dumps(v) if isinstance(v, tuple) else str(v)
           for k, v in asdict(Preprocess.of_loaders(trained.image_size, trained.crop_ratio)).items()}
    return {"arch": trained.arch, "classes": json.dumps(trained.classes), **pre,
            "input": f"{INPUT}: N x 3 x {trained.image_size} x {trained.image_size} RGB, (pixel / 255 - mean) / std",
            "weights": trained.weights, "source": trained.source.name}


def _onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export's translator)
    except ImportError as e:
        raise ConfigError(f"--onnx: {e.name} is not installed: {INSTALL}") from None
    return onnx


def write_onnx(trained: Trained, path: Path, fp16: bool = False) -> Path:
    """Export `trained` (BatchNorm folded) to a temporary file beside `path` and return it: the
    caller checks it and renames it into place, so `path` only ever holds a checked file."""
    onnx = _onnx()
    model = fold_batchnorm(trained.model)
    example = torch.zeros(EXAMPLE_BATCH, 3, trained.image_size, trained.image_size)
    if fp16:
        model, example = model.half(), example.half()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = program.model_proto
    unfolded = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if unfolded:
        raise RuntimeError(f"BatchNorm left unfolded in the ONNX graph: {unfolded[:3]}")
    for key, value in metadata(trained).items():
        proto.metadata_props.add(key=key, value=value)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    onnx.save(proto, tmp)  # weights inside the one file (well under ONNX's 2 GB limit)
    return tmp


class OnnxModel:
    """An exported file, run by onnxruntime on the CPU: uint8 crops in, float32 logits out."""

    def __init__(self, path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(f"--onnx: onnxruntime is not installed: {INSTALL}") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"--onnx {self.path}: no such file (write one with "
                              f"`python export.py WEIGHTS --onnx FILE`)")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as e:  # not an ONNX file, or a broken one
            raise ConfigError(f"--onnx {self.path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        self.meta = self.session.get_modelmeta().custom_metadata_map
        if "classes" not in self.meta or "image_size" not in self.meta:
            raise ConfigError(f"--onnx {self.path}: no class names or input size in its metadata: "
                              f"export it with `python export.py WEIGHTS --onnx FILE`")
        self.classes = json.loads(self.meta["classes"])
        self.image_size = int(self.meta["image_size"])
        self.preprocess = Preprocess(self.image_size, int(self.meta["resize_size"]), float(self.meta["crop_ratio"]),
                                     tuple(json.loads(self.meta["mean"])), tuple(json.loads(self.meta["std"])),
                                     self.meta["interpolation"])
        loaders = Preprocess.of_loaders(self.image_size, self.preprocess.crop_ratio)
        if self.preprocess != loaders:
            raise ConfigError(f"--onnx {self.path}: its preprocessing {self.preprocess} is not the loaders' "
                              f"({loaders}): predictions would be off")
        self.dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised N x 3 x S x S -> float32 logits N x classes."""
        (logits,) = self.session.run([OUTPUT], {INPUT: x.detach().cpu().numpy().astype(self.dtype)})
        return torch.from_numpy(logits.astype(np.float32))

    def latency_ms(self, batch: int, runs: int = 10, warmup: int = 3) -> float:
        """Median wall milliseconds of one run at `batch` (after `warmup` runs)."""
        x = np.random.default_rng(0).standard_normal((batch, 3, self.image_size, self.image_size)).astype(self.dtype)
        times_ms = []
        for i in range(warmup + runs):
            start_s = time.perf_counter()
            self.session.run([OUTPUT], {INPUT: x})
            if i >= warmup:
                times_ms.append(1000 * (time.perf_counter() - start_s))
        return statistics.median(times_ms)
