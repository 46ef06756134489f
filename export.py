"""Export a trained MobileNetV3 to ONNX (and TorchScript), checked against PyTorch on real images.

    python export.py runs/x/model_best.pth --onnx model.onnx
    python export.py runs/x/model_best.pth --onnx model_fp16.onnx --fp16 --torchscript model.pt
    python export.py mobilenet_v3_large-8738ca79.pth --arch mobilenet_v3_large --classes imagenet.json --onnx m.onnx

WEIGHTS is train.py's checkpoint (its EMA weights when it has them; --no-ema for the trained ones) or
a --pretrained file. The ONNX file has a dynamic batch axis, BatchNorm folded into the convs, and the
class names and val preprocessing in its metadata (deploy/onnx_model.py). Before a file is put in
place, onnxruntime runs it on real images (the val images of the checkpoint's dataset, or --images):
logits within 1e-4 of PyTorch's (1e-5 of the largest logit when that is more) and the same
top-1, or nothing is written. Then it prints onnxruntime's CPU latency at batch 1 and 32.
"""
import argparse
import os
import warnings
from pathlib import Path

import torch

from core.errors import ConfigError, UserError, run_command
from deploy.cli import add_weights_args, load_weights
from deploy.images import find_images, read_images
from deploy.onnx_model import OnnxModel, write_onnx
from deploy.weights import Trained, fold_batchnorm
from loaders import normalize

# The file must give PyTorch's logits to within max(atol, rtol x the largest logit). float32 is itself
# only that exact on large logits: PyTorch's float32 logits of 27 were 1.3e-4 off its float64 ones.
# float16 keeps ~3 significant digits, and top-1 may flip between near ties: reported, not required.
# Its errors add up over the network's ~50 layers: 1.3% of the largest logit on a 2-epoch test model.
TOLERANCE = {"float32": (1e-4, 1e-5), "float16": (1e-2, 2e-2)}  # (atol, rtol)
LATENCY_BATCHES = (1, 32)


class ExportMismatch(UserError):
    """The exported file does not compute what PyTorch computes; nothing was written."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a trained MobileNetV3 to ONNX / TorchScript, checked by "
                                            "onnxruntime against PyTorch on real images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("weights", metavar="WEIGHTS", help="train.py's checkpoint (model_best.pth) or a --pretrained file")
    p.add_argument("--onnx", default=None, help="write the ONNX model here")
    p.add_argument("--torchscript", default=None,
                   help="write a traced TorchScript module here (torch.jit is deprecated upstream; for LibTorch)")
    p.add_argument("--fp16", action="store_true", help="float16 weights, input and output (ONNX and TorchScript)")
    add_weights_args(p)
    p.add_argument("--images", nargs="+", default=None,
                   help="images or folders to check the export on (default: the val/ images of the "
                        "checkpoint's dataset)")
    p.add_argument("--check-images", type=int, default=32, help="at most this many images, spread over the set")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help=f"time onnxruntime on the CPU at batch {' and '.join(map(str, LATENCY_BATCHES))}")
    return p


def check_images(args, trained: Trained) -> torch.Tensor:
    """uint8 crops of up to --check-images real images, through the loaders' val preprocessing."""
    where = args.images or ([trained.data / "val"] if trained.data and (trained.data / "val").is_dir() else None)
    if not where:
        raise ConfigError(f"no images to check the export on ({trained.source} names no dataset with a val/ "
                          f"folder here): pass --images FILE_OR_FOLDER...")
    files, missing = find_images(where)
    files = files[::max(1, len(files) // args.check_images)][:args.check_images]  # spread over the classes
    images, _, bad = read_images(files, trained.image_size, trained.crop_ratio)
    for path, why in missing + bad:
        print(f"{path}: left out of the check: {why}")
    if images is None:
        raise ConfigError(f"no image to check the export on in {', '.join(map(str, where))}: pass --images")
    return images


def compare(what: str, reference: torch.Tensor, logits: torch.Tensor, fp16: bool) -> dict:
    """Max abs logit difference and top-1 agreement; raises ExportMismatch past the tolerance."""
    diff = (reference - logits).abs().max().item()
    same_top1 = int((reference.argmax(1) == logits.argmax(1)).sum())
    atol, rtol = TOLERANCE["float16" if fp16 else "float32"]
    limit = max(atol, rtol * reference.abs().max().item())
    print(f"{what} vs PyTorch on {len(reference)} images: max abs logit diff {diff:.2e} (limit {limit:.1e}), "
          f"top-1 equal on {same_top1}/{len(reference)}")
    if diff > limit or (not fp16 and same_top1 != len(reference)):
        raise ExportMismatch(f"{what} does not match PyTorch (max abs logit diff {diff:.2e}, top-1 equal on "
                             f"{same_top1}/{len(reference)}): nothing written")
    return {"max_abs_diff": diff, "top1_equal": same_top1}


def publish(tmp: Path, path: Path, check) -> dict:
    """check() the temporary file, then rename it into place; a failed check removes it."""
    try:
        result = check()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return result


def export_torchscript(trained: Trained, path: Path, x: torch.Tensor, reference: torch.Tensor, fp16: bool) -> dict:
    """Trace the folded network at batch 2 and check it on all of `x` (any batch size runs)."""
    model = fold_batchnorm(trained.model)
    if fp16:
        model, x = model.half(), x.half()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")

    def check() -> dict:
        with torch.no_grad():
            return compare("TorchScript", reference, torch.jit.load(str(tmp))(x).float(), fp16)

    with warnings.catch_warnings():  # torch.jit's deprecation notices (trace, save, load)
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(model, x[:2]), str(tmp))
        return publish(tmp, path, check)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not (args.onnx or args.torchscript):
        raise ConfigError("nothing to write: pass --onnx FILE and/or --torchscript FILE")
    if args.check_images < 1:
        raise ConfigError(f"--check-images {args.check_images}: use 1 or more")
    trained = load_weights(args.weights, args)
    x = normalize(check_images(args, trained))
    for out in filter(None, (args.onnx, args.torchscript)):  # created once the inputs are known to be good
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        reference = trained.model(x)
    result = {}
    if args.onnx:
        path = Path(args.onnx)
        tmp = write_onnx(trained, path, fp16=args.fp16)
        result["onnx"] = publish(tmp, path, lambda: compare("onnxruntime", reference, OnnxModel(tmp)(x), args.fp16))
        if args.latency:
            onnx_model = OnnxModel(path)
            result["onnx"]["latency_ms"] = {b: onnx_model.latency_ms(b) for b in LATENCY_BATCHES}
            print(f"onnxruntime CPU latency at {trained.image_size} px ({os.cpu_count()} cores): " + ", ".join(
                f"batch {b} {ms:.2f} ms ({1000 * b / ms:.0f} img/s)" for b, ms in result["onnx"]["latency_ms"].items()))
    if args.torchscript:
        result["torchscript"] = export_torchscript(trained, Path(args.torchscript), x, reference, args.fp16)
    return result


if __name__ == "__main__":
    run_command(main)
