"""Networks by name. The rest of the project needs only these three names:

    from model import MODEL_NAMES, create_model, load_pretrained
    net = create_model("mobilenetv3_large_100", num_classes=10)
    print(load_pretrained(net, "mobilenet_v3_large-8738ca79.pth", num_classes=10))  # or timm's file
"""
from functools import partial
from typing import Callable

from torch import nn

from .mobilenetv3 import BN_EPS, MobileNetV3, mobilenetv3_large, mobilenetv3_small
from .pretrained import load_pretrained

_BUILDERS: dict[str, Callable[..., MobileNetV3]] = {
    "mobilenetv3_large_100": partial(mobilenetv3_large, 1.0),
    "mobilenetv3_large_075": partial(mobilenetv3_large, 0.75),
    "mobilenetv3_large_050": partial(mobilenetv3_large, 0.5),
    "mobilenetv3_small_100": partial(mobilenetv3_small, 1.0),
    "mobilenetv3_small_075": partial(mobilenetv3_small, 0.75),
    "mobilenetv3_small_050": partial(mobilenetv3_small, 0.5),
    # torchvision's spellings, so its commands and weight files carry over
    "mobilenet_v3_large": partial(mobilenetv3_large, 1.0),
    "mobilenet_v3_small": partial(mobilenetv3_small, 1.0),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def create_model(name: str, num_classes: int = 1000, dropout: float = 0.2, drop_path: float = 0.0,
                 bn_eps: float | None = None) -> nn.Module:
    """A freshly initialised network. `dropout`: probability before the classifier; `drop_path`:
    stochastic depth rate of the deepest block (timm's schedule); `bn_eps`: None keeps
    torchvision's 1e-3 (load_pretrained sets the eps of the weights it loads)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](num_classes=num_classes, dropout=dropout, drop_path=drop_path,
                           bn_eps=BN_EPS if bn_eps is None else bn_eps)


__all__ = ["MODEL_NAMES", "create_model", "load_pretrained", "MobileNetV3"]
