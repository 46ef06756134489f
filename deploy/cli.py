"""What export.py and predict.py share: the flags that choose the weights, and loading them."""
import argparse

from deploy.weights import Trained, load_trained


def add_weights_args(p: argparse.ArgumentParser):
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the checkpoint's EMA weights (default: when it has them); --no-ema: the trained ones")
    p.add_argument("--arch", default=None, help="model name, for a bare weights file (a checkpoint knows its own)")
    p.add_argument("--image-size", type=int, default=None,
                   help="val crop in px (default: the checkpoint's --image-size, else 224)")
    p.add_argument("--bn-eps", type=float, default=None,
                   help="BatchNorm eps (default: the checkpoint's own, else the run's --bn-eps, else that of "
                        "the --pretrained file it started from: timm's 1e-5, torchvision's 1e-3)")
    p.add_argument("--classes", default=None,
                   help="JSON list of class names in label order (the converters' classes.json), for weights "
                        "saved without them")


def load_weights(path, args) -> Trained:
    """The weights the flags choose, with a line that says what was loaded."""
    trained = load_trained(path, ema=args.ema, arch=args.arch, image_size=args.image_size,
                           classes_file=args.classes, bn_eps=args.bn_eps)
    print(f"{trained.source}: {trained.arch}, {trained.weights} weights, {len(trained.classes)} classes, "
          f"{trained.image_size} px", flush=True)
    if not trained.classes_from:
        print(f"no class names in {trained.source}: they are numbered; pass --classes FILE (classes.json) "
              f"to name them", flush=True)
    return trained
