"""Start from a weights file the user already has (the project never downloads).

Two formats load, told apart by their keys:
- torchvision's (e.g. mobilenet_v3_large-8738ca79.pth) and this project's checkpoints: our module
  names are torchvision's, so the key mapping is the identity. BatchNorm eps 1e-3.
- timm's mobilenetv3_large_100 / mobilenetv3_small_100 (e.g. the `model.safetensors` or
  `pytorch_model.bin` of timm/mobilenetv3_large_100.ra_in1k on the Hugging Face hub): the same
  network under timm's names, mapped by `timm_to_ours`. timm trains with PyTorch's BatchNorm eps
  1e-5, so the model takes that eps with the weights.
"""
import re
from pathlib import Path

import torch
from torch import nn

from .mobilenetv3 import BN_EPS, init_weights, set_bn_eps

_CLASSIFIER = "classifier.3"  # the last Linear: the only layer whose shape depends on the classes
# Wrappers add these in front of every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
FORMAT_BN_EPS = {"torchvision": BN_EPS, "timm": 1e-5}  # the eps each format's weights were trained with

# timm's names outside the blocks; its head conv is a 1x1 conv on the pooled vector, ours a Linear.
_TIMM_OUTER = {"conv_stem": "features.0.0", "bn1": "features.0.1",
               "conv_head": "classifier.0", "classifier": "classifier.3"}
# timm names a block's layers by role; each role is one ConvBNAct of ours (0 conv, 1 BN). "ds" is
# timm's DepthwiseSeparableConv (a block without expansion), "ir" its InvertedResidual, "cn" the
# last 1x1 conv (ConvBnAct).
_TIMM_BLOCK = {
    "ds": {"conv_dw": ("dw", 0), "bn1": ("dw", 1), "conv_pw": ("project", 0), "bn2": ("project", 1)},
    "ir": {"conv_pw": ("expand", 0), "bn1": ("expand", 1), "conv_dw": ("dw", 0), "bn2": ("dw", 1),
           "conv_pwl": ("project", 0), "bn3": ("project", 1)},
    "cn": {"conv": ("conv", 0), "bn1": ("conv", 1)},
}
_TIMM_SE = {"conv_reduce": "fc1", "conv_expand": "fc2"}
_ROLE_ORDER = ("expand", "dw", "se", "project")  # positions in our InvertedResidual.block


def weights_format(state: dict[str, torch.Tensor]) -> str:
    return "timm" if "conv_stem.weight" in state else "torchvision"


def _timm_block_names(keys: list[str]) -> dict[str, str | None]:
    """Our name (below features.I.) for each key of one timm block (below blocks.S.B.), or None
    for a key that is no MobileNetV3 layer."""
    present = {k.partition(".")[0] for k in keys}
    kind = "ir" if "conv_pwl" in present else "cn" if "conv" in present else "ds"
    layers = _TIMM_BLOCK[kind]
    roles = {layers[n][0] for n in present if n in layers} | ({"se"} & present)
    position = {role: i for i, role in enumerate(r for r in _ROLE_ORDER if r in roles)}
    ours: dict[str, str | None] = {}
    for key in keys:
        name, _, rest = key.partition(".")
        se_layer, _, se_rest = rest.partition(".")
        if name in layers:
            role, index = layers[name]
            ours[key] = f"{index}.{rest}" if kind == "cn" else f"block.{position[role]}.{index}.{rest}"
        elif name == "se" and se_layer in _TIMM_SE:
            ours[key] = f"block.{position['se']}.{_TIMM_SE[se_layer]}.{se_rest}"
        else:
            ours[key] = None
    return ours


def timm_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's MobileNetV3 state_dict under our (torchvision's) names. timm's blocks.S.B, in order
    over stages S and blocks B, are our features.1, features.2, ...; a name that is no MobileNetV3
    layer keeps timm's name, so that load_pretrained reports it as unexpected."""
    out, blocks = {}, {}
    for key, v in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", key)
        if m:
            blocks.setdefault((int(m[1]), int(m[2])), {})[m[3]] = v
            continue
        layer, _, rest = key.partition(".")
        out[f"{_TIMM_OUTER[layer]}.{rest}" if layer in _TIMM_OUTER else key] = v
    for i, ((stage, b), layers) in enumerate(sorted(blocks.items()), start=1):
        names = _timm_block_names(list(layers))
        for k, v in layers.items():
            out[f"features.{i}.{names[k]}" if names[k] else f"blocks.{stage}.{b}.{k}"] = v
    head = out.get("classifier.0.weight")
    if head is not None and head.dim() == 4:  # 1x1 conv [out, in, 1, 1] -> Linear [out, in]
        out["classifier.0.weight"] = head.flatten(1)
    return out


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    if Path(path).suffix == ".safetensors":  # how the Hugging Face hub ships timm's weights
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # not a torch file, or one holding more than tensors and plain containers
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: cannot read it as a PyTorch weights file "
                         f"({type(e).__name__}: {first_line})") from e
    for key in ("model", "state_dict"):  # training checkpoints hold the weights under one of these
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (names -> tensors) or a checkpoint "
                         f"holding one under 'model' or 'state_dict', found {type(obj).__name__}")
    for prefix in _WRAPPER_PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ModuleNotFoundError:
        raise ValueError(f"{path}: reading .safetensors files needs the safetensors package: "
                         "pip install safetensors (or pass the .pth / .bin file)") from None
    try:
        return load_file(path, device="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot read it as a safetensors file ({type(e).__name__}: {e})") from e


def load_pretrained(model: nn.Module, path: str | Path, num_classes: int, bn_eps: float | None = None) -> str:
    """Load a MobileNetV3 state_dict (torchvision's or timm's format) from `path` into `model`
    and say what was loaded, in which format.

    Everything must match the model exactly except the final classifier layer: when the
    file has another number of classes, that layer keeps a fresh initialisation, for
    fine-tuning. Every BatchNorm takes `bn_eps`, by default the eps the file's format was
    trained with (FORMAT_BN_EPS). Raises ValueError naming the file when it holds some other
    network.
    """
    ours = model.state_dict()
    head_w, head_b = f"{_CLASSIFIER}.weight", f"{_CLASSIFIER}.bias"
    if head_w not in ours or ours[head_w].shape[0] != num_classes:
        raise ValueError(f"model is not a MobileNetV3 built for num_classes={num_classes}")
    theirs = _read_state_dict(path)
    fmt = weights_format(theirs)
    if fmt == "timm":
        theirs = timm_to_ours(theirs)

    missing = sorted(ours.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - ours.keys())

    # The classifier's shape follows the class count; its input width is checked through classifier.0.
    reshaped = sorted(k for k in ours.keys() & theirs.keys()
                      if k not in (head_w, head_b) and ours[k].shape != theirs[k].shape)

    if missing or unexpected or reshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if reshaped:
            k = reshaped[0]
            problems.append(f"{len(reshaped)} tensors of another shape (e.g. {k}: file "
                            f"{tuple(theirs[k].shape)}, model {tuple(ours[k].shape)})")
        raise ValueError(f"{path} does not hold weights for this network ({fmt} format): "
                         f"{'; '.join(problems)}. Pass torchvision's or timm's file for the same "
                         "variant (torchvision's mobilenet_v3_large or timm's mobilenetv3_large_100 "
                         "for mobilenetv3_large_100; mobilenet_v3_small or mobilenetv3_small_100 for "
                         "mobilenetv3_small_100).")

    eps = FORMAT_BN_EPS[fmt] if bn_eps is None else bn_eps
    set_bn_eps(model, eps)
    loaded = f"from {path} ({fmt} format, BatchNorm eps {eps:g})"
    file_classes = theirs[head_w].shape[0]
    if file_classes == num_classes:
        model.load_state_dict(theirs, strict=True)
        return f"loaded {len(theirs)} tensors {loaded}"
    body = {k: v for k, v in theirs.items() if k not in (head_w, head_b)}
    result = model.load_state_dict(body, strict=False)
    assert sorted(result.missing_keys) == [head_b, head_w] and not result.unexpected_keys, result
    init_weights(model.get_submodule(_CLASSIFIER))  # fresh even if `model` was trained before
    return (f"loaded {len(body)} tensors {loaded}; classifier re-initialised for "
            f"{num_classes} classes (file has {file_classes})")
