"""Parameters and multiply-adds of a network, counted by torch.utils.flop_counter.

    python -m model mobilenetv3_large_100 [--image-size 224] [--num-classes 1000]

Multiply-adds are FlopCounterMode's FLOPs / 2 for one image in eval mode: convolutions
and linear layers, as the paper counts them (BN, activations and the SE gate's
elementwise products are not counted).
"""
import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import MODEL_NAMES, create_model


def count(name: str, image_size_px: int = 224, num_classes: int = 1000) -> tuple[int, int]:
    """(parameters, multiply-adds) of one forward pass on one image."""
    net = create_model(name, num_classes=num_classes).eval()
    params = sum(p.numel() for p in net.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, image_size_px, image_size_px))
    return params, counter.get_total_flops() // 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=MODEL_NAMES, metavar="NAME", help=f"one of: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    args = parser.parse_args(argv)
    params, madds = count(args.name, args.image_size, args.num_classes)
    print(f"{args.name} at {args.image_size}x{args.image_size}, {args.num_classes} classes")
    print(f"  params         {params:>13,}  ({params / 1e6:.2f} M)")
    print(f"  multiply-adds  {madds:>13,}  ({madds / 1e6:.1f} M)")


if __name__ == "__main__":
    main()
