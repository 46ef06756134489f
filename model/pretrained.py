"""Start from a weights file the user already has (the project never downloads).

Our module names are torchvision's, so torchvision's published MobileNetV3 files
(e.g. mobilenet_v3_large-8738ca79.pth) load as they are: the key mapping is the identity.
"""
from pathlib import Path

import torch
from torch import nn

from .mobilenetv3 import init_weights

_CLASSIFIER = "classifier.3"  # the last Linear: the only layer whose shape depends on the classes
# Wrappers add these in front of every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
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


def load_pretrained(model: nn.Module, path: str | Path, num_classes: int) -> str:
    """Load a MobileNetV3 state_dict from `path` into `model` and say what was loaded.

    Everything must match the model exactly except the final classifier layer: when the
    file has another number of classes, that layer keeps a fresh initialisation, for
    fine-tuning. Raises ValueError naming the file when it holds some other network.
    """
    ours = model.state_dict()
    head_w, head_b = f"{_CLASSIFIER}.weight", f"{_CLASSIFIER}.bias"
    if head_w not in ours or ours[head_w].shape[0] != num_classes:
        raise ValueError(f"model is not a MobileNetV3 built for num_classes={num_classes}")
    theirs = _read_state_dict(path)

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
        raise ValueError(f"{path} does not hold weights for this network: {'; '.join(problems)}. "
                         "Pass torchvision's file for the same variant (mobilenet_v3_large for "
                         "mobilenetv3_large_100, mobilenet_v3_small for mobilenetv3_small_100).")

    file_classes = theirs[head_w].shape[0]
    if file_classes == num_classes:
        model.load_state_dict(theirs, strict=True)
        return f"loaded {len(theirs)} tensors from {path}"
    body = {k: v for k, v in theirs.items() if k not in (head_w, head_b)}
    result = model.load_state_dict(body, strict=False)
    assert sorted(result.missing_keys) == [head_b, head_w] and not result.unexpected_keys, result
    init_weights(model.get_submodule(_CLASSIFIER))  # fresh even if `model` was trained before
    return (f"loaded {len(body)} tensors from {path}; classifier re-initialised for "
            f"{num_classes} classes (file has {file_classes})")
