"""Ask a trained model about images: its top classes and their probabilities, one line per image.

    python predict.py photo.jpg holiday/ --weights runs/x/model_best.pth      # PyTorch, CPU or accelerator
    python predict.py holiday/ --onnx model.onnx --topk 3                      # the exported file, onnxruntime

Each image goes through the loaders' val preprocessing (the same decode, resize and center crop as
evaluation). A file that cannot be read gets one line on stderr naming it; every other image is still
answered, and the command then exits with 1 (0 when every image was answered). Output lines:

    holiday/cat.jpg: tabby 0.8123, tiger_cat 0.1011, ...
"""
import argparse
import sys

import torch

from core.errors import ConfigError, DatasetError, run_command
from deploy.cli import add_weights_args, load_weights
from deploy.images import find_images, read_images
from deploy.onnx_model import OnnxModel
from engine.distributed import resolve_kind
from loaders import normalize


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Top-k classes and probabilities for images, from a checkpoint "
                                            "(--weights) or an exported ONNX file (--onnx).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders to search for images")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="train.py's checkpoint (model_best.pth) or a --pretrained file")
    source.add_argument("--onnx", help="a file written by `python export.py WEIGHTS --onnx FILE` (runs on the CPU)")
    p.add_argument("--topk", type=int, default=5, help="classes per image")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"], help="--weights: where to run")
    add_weights_args(p)
    return p


def build_predictor(args):
    """(logits function of uint8 crops, class names, crop size, crop ratio) for --weights or --onnx."""
    if args.onnx:
        if args.classes or args.image_size or args.arch or args.ema is not None or args.bn_eps is not None:
            raise ConfigError("--onnx: the file carries its classes, input size and weights; "
                              "drop --classes / --image-size / --arch / --ema / --bn-eps")
        onnx_model = OnnxModel(args.onnx)
        return ((lambda images: onnx_model(normalize(images))), onnx_model.classes, onnx_model.image_size,
                onnx_model.preprocess.crop_ratio)
    trained = load_weights(args.weights, args)
    kind = resolve_kind(args.device)
    device = torch.device(kind, 0) if kind != "cpu" else torch.device("cpu")
    model = trained.model.to(device)

    @torch.no_grad()
    def logits(images: torch.Tensor) -> torch.Tensor:
        return model(normalize(images.to(device))).float().cpu()
    return logits, trained.classes, trained.image_size, trained.crop_ratio


def main(argv=None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        raise ConfigError(f"--topk {args.topk} / --batch-size {args.batch_size}: use 1 or more")
    logits_of, classes, image_size, crop_ratio = build_predictor(args)
    files, failed = find_images(args.paths)
    if not files and not failed:
        raise DatasetError(f"no image files in {', '.join(args.paths)}")
    for path, why in failed:
        print(f"{path}: {why}", file=sys.stderr, flush=True)
    k = min(args.topk, len(classes))
    answers = []
    for start in range(0, len(files), args.batch_size):
        images, good, bad = read_images(files[start:start + args.batch_size], image_size, crop_ratio)
        for path, why in bad:
            print(f"{path}: cannot read it as an image ({why})", file=sys.stderr, flush=True)
        failed += bad
        if images is None:
            continue
        probs, indices = logits_of(images).softmax(dim=1).topk(k, dim=1)
        for path, p, i in zip(good, probs.tolist(), indices.tolist()):
            top = [(classes[c], prob) for c, prob in zip(i, p)]
            answers.append({"path": str(path), "top": top})
            print(f"{path}: " + ", ".join(f"{name} {prob:.4f}" for name, prob in top), flush=True)
    if failed:
        raise DatasetError(f"{len(failed)} of {len(failed) + len(answers)} inputs could not be read (named above); "
                           f"the other {len(answers)} are answered")
    return answers


if __name__ == "__main__":
    run_command(main)
