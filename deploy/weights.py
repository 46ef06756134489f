"""A trained network out of the file it was saved in, ready for inference on the CPU.

    trained = load_trained("runs/x/model_best.pth")                 # its EMA weights when it has them
    trained = load_trained("mobilenet_v3_small-047dcff4.pth", arch="mobilenet_v3_small",
                           classes_file="imagenet_classes.json")    # a --pretrained file
"""
import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from convert.make_sample import default_sample_dir
from core.dataset import read_class_map
from core.errors import CheckpointError, ConfigError
from loaders.common import VAL_CROP_RATIO
from model import MODEL_NAMES, create_model, load_pretrained

DEFAULT_IMAGE_SIZE = 224
# the last Linear, one row per class: ours and torchvision's (under a DDP / compile prefix), timm's
_HEAD = re.compile(r"(module\.|_orig_mod\.)?classifier(\.3)?\.weight")
_EMA_PREFIX = "module."  # AveragedModel's keys: module.<name>, plus its counter n_averaged


@dataclass
class Trained:
    model: nn.Module  # eval mode, float32, on the CPU
    arch: str
    classes: list[str]
    classes_from: str  # "the checkpoint", the --classes file, or "" (unnamed: "0", "1", ...)
    image_size: int  # the val crop, px
    crop_ratio: float  # the val crop / the shorter side it is cut from (--val-crop-ratio)
    weights: str  # "ema" or "model" (train.py's checkpoint), "state_dict" (a bare weights file)
    source: Path
    data: Path | None  # the dataset the checkpoint was trained on, when known


def load_trained(path, ema: bool | None = None, arch: str | None = None, image_size: int | None = None,
                 classes_file=None, bn_eps: float | None = None) -> Trained:
    """train.py's checkpoint (model_best.pth, checkpoint.pth) or a bare state_dict (torchvision's or
    timm's file, as --pretrained takes).

    ema: None = the EMA weights when the checkpoint has them, True = they must be there, False = the
    trained weights themselves. A bare state_dict carries no config: it needs `arch`. bn_eps: None =
    the eps the weights were trained with (see `_build`).
    """
    path = Path(path)
    obj = _read(path)
    if isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict):  # train.py's
        config = obj["config"]
        if arch and arch != config["arch"]:
            raise ConfigError(f"--arch {arch}: {path} holds a {config['arch']}; drop --arch")
        state, weights = _choose(obj, ema, path)
        bn_eps = bn_eps if bn_eps is not None else obj.get("bn_eps")  # train.py saves the eps it ran with
        # the run's evaluation resolution: its first --val-res, else its final train resolution
        val_res = config.get("val_res") or [config.get("max_res") or config.get("image_size")]
        saved_classes, image_size = obj.get("classes"), image_size or val_res[0]
        data = Path(config["data"]) if config.get("data") else default_sample_dir()
    else:
        if ema:
            raise ConfigError(f"--ema: {path} is a bare state_dict, which has no EMA weights: drop --ema")
        if not arch:
            raise ConfigError(f"{path} is a bare state_dict with no training config: pass --arch "
                              f"(one of {', '.join(MODEL_NAMES)})")
        config = {"arch": arch, "pretrained": str(path), "bn_eps": bn_eps}
        state, weights, saved_classes, data = None, "state_dict", None, None
    if config["arch"] not in MODEL_NAMES:
        raise ConfigError(f"--arch {config['arch']!r} is not one of {', '.join(MODEL_NAMES)}")

    # a bare file may hold its state_dict under "model" or "state_dict" (model/pretrained.py reads both)
    flat = state or next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), obj)
    head = next((v for k, v in flat.items() if _HEAD.fullmatch(k)), None)
    if not isinstance(head, torch.Tensor):
        raise CheckpointError(f"{path}: no classifier weights in it: not a MobileNetV3's weights")
    num_classes = head.shape[0]
    model = _build(config, num_classes, state, bn_eps, path)

    if classes_file:
        classes, classes_from = _read_classes(Path(classes_file)), str(classes_file)
    elif saved_classes:
        classes, classes_from = list(saved_classes), "the checkpoint"
    else:
        classes, classes_from = [str(i) for i in range(num_classes)], ""
    if len(classes) != num_classes:
        raise ConfigError(f"{classes_from}: {len(classes)} class names for a model with {num_classes} classes")
    return Trained(model.eval(), config["arch"], classes, classes_from, int(image_size or DEFAULT_IMAGE_SIZE),
                   float(config.get("val_crop_ratio") or VAL_CROP_RATIO), weights, path, data)


def _build(config: dict, num_classes: int, state: dict | None, bn_eps: float | None, path: Path) -> nn.Module:
    """The network as train.py built it, then `state` loaded over it. BatchNorm's eps is not among
    the weights: it is --bn-eps or the checkpoint's own, else the run's --bn-eps, else that of the
    run's --pretrained file's format (timm's 1e-5, torchvision's 1e-3), as load_pretrained set it."""
    eps = bn_eps if bn_eps is not None else config.get("bn_eps")
    pretrained = config.get("pretrained")
    start_from = pretrained if pretrained and (state is None or eps is None) else None
    if start_from and not Path(start_from).is_file():
        raise ConfigError(f"{path} was trained from --pretrained {start_from}, which is not here, and "
                          f"BatchNorm's eps depends on its format: pass --bn-eps (1e-5 for timm's "
                          f"weights, 1e-3 for torchvision's)")
    model = create_model(config["arch"], num_classes=num_classes, bn_eps=eps)
    try:
        if start_from:
            load_pretrained(model, start_from, num_classes=num_classes, bn_eps=eps)
        if state is not None:
            model.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its weights do not fit {config['arch']}: {str(e).splitlines()[0]}") from None
    return model


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a checkpoint such as OUTPUT_DIR/model_best.pth, "
                              f"or a --pretrained weights file)")
    try:
        if path.suffix == ".safetensors":  # timm's weights as the Hugging Face hub ships them
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"{path}: cannot load it as PyTorch weights ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint or a state_dict")
    return obj


def _choose(checkpoint: dict, ema: bool | None, path: Path) -> tuple[dict, str]:
    """The state_dict to load: the EMA's (without AveragedModel's prefix and counter) or the model's."""
    averaged = checkpoint.get("ema")
    if ema and not averaged:
        raise ConfigError(f"--ema: {path} has no EMA weights (trained without --model-ema): drop --ema")
    if ema is False or not averaged:
        return checkpoint["model"], "model"
    return {k[len(_EMA_PREFIX):]: v for k, v in averaged.items() if k.startswith(_EMA_PREFIX)}, "ema"


def _read_classes(path: Path) -> list[str]:
    try:
        classes = read_class_map(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--classes {path}: cannot read it ({type(e).__name__}: {e}); expected a JSON list "
                          f"of names in label order, like the converters' classes.json") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"--classes {path}: expected a JSON list of names in label order (classes.json)")
    return classes


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every BatchNorm folded into the conv before it: the same
    function, one op fewer per conv (the form inference runtimes run)."""
    folded = copy.deepcopy(model).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), nn.Identity()
    return folded
