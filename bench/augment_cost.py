"""Per-image cost of augment.DeviceAugment's batched policy against torchvision v2 applied image by
image, on the same uint8 images; then op by op, to show where the time goes; on CUDA also its GPU
cost and share of a training step.

    python bench/augment_cost.py [--batch 64] [--image-size 224] [--policy imagenet] [--threads N]
                                 [--no-per-op] [--json PATH]                        (--help: all)

Ours gets the batch as loaders deliver it (uint8, channels_last); torchvision gets each image as
a contiguous C x H x W tensor, prepared outside the timed window. Per op, every image gets the op
at AutoAugment's middle magnitude bin (5 of 10, positive sign) through augment.autoaugment.apply_op,
the path a policy slot takes, against torchvision's own per-op mapping. Each side is a row of the
bench harness: warmed up, then timed in rounds with the order rotating; medians are reported.
"""
import argparse
import statistics

import torch
from torchvision.transforms import v2

from augment import OPS, DeviceAugment
from augment.autoaugment import apply_op
from augment.policies import magnitude_table
from bench.harness import Report, Row, add_output_flags, measure
from core.errors import run_command


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--image-size", type=int, default=224, help="square image side in pixels")
    p.add_argument("--policy", default="imagenet", choices=["imagenet", "randaugment", "trivialaugment"],
                   help="auto-augment policy on both sides")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per side; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per side first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both sides (default: torch's own choice)")
    p.add_argument("--no-per-op", action="store_true", help="skip the op-by-op comparison")
    add_output_flags(p, "augment_cost")
    return p


class Call(Row):
    """fn(step) on a batch of `images` images, one call per unit of work."""

    def __init__(self, name: str, fn, images: int, sync=None):
        self.name, self.fn, self.images, self.step = name, fn, images, 0
        self.sync = sync or (lambda: None)

    def work(self) -> dict:
        self.fn(self.step)
        self.step += 1
        return {"images": self.images}


def ms_per_image(args, calls: list[Call]) -> list[float]:
    results = measure(calls, rounds=args.repeats, warmups=args.warmup, who="augment_cost")
    return [1e3 * statistics.median(r["wall_s"] for r in results[c.name]["runs"]) / c.images for c in calls]


def sample_images(batch: int, size: int) -> torch.Tensor:
    """Smooth colour blobs plus grain, so histogram ops see photo-like rather than flat histograms."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 3, 8, 8, generator=g) * 255
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    img += 12 * torch.randn(img.shape, generator=g)
    return img.clamp_(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)


def torchvision_transform(policy: str):
    if policy == "imagenet":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    if policy == "randaugment":
        return v2.RandAugment(num_ops=2, magnitude=9)
    return v2.TrivialAugmentWide()


def policy_calls(args, images) -> list[Call]:
    aug = DeviceAugment(num_classes=1000, auto_augment=args.policy)
    tv = torchvision_transform(args.policy)
    per_image = [img.contiguous() for img in images]

    def theirs(step):
        torch.manual_seed(step)
        for img in per_image:
            tv(img)
    return [Call("ours", lambda step: aug.before_normalize(images, step), len(images)),
            Call("torchvision", theirs, len(images))]


def op_calls(images) -> tuple[dict, list[Call]]:
    """Every op but Identity at a fixed magnitude, ours batched and torchvision image by image."""
    n, _, h, w = images.shape
    per_image = [img.contiguous() for img in images]
    tv = v2.AutoAugment()  # its per-op mapping (signed magnitude -> F.*), as tests/test_augment.py uses
    magnitudes, calls = {}, []
    for op in OPS[1:]:
        bins = magnitude_table(op, 10, h, w, wide=False)
        magnitudes[op] = m = 0.0 if bins is None else float(bins[5])
        mags = torch.full((n,), m, dtype=torch.float64)

        def theirs(step, op=op, m=m):
            for img in per_image:
                tv._apply_image_or_video_transform(img, op, m, interpolation=tv.interpolation, fill=tv._fill)
        calls += [Call(f"{op}: ours", lambda step, op=op, mags=mags: apply_op(images, op, mags), n),
                  Call(f"{op}: torchvision", theirs, n)]
    return magnitudes, calls


def gpu_numbers(args, images: torch.Tensor) -> dict:
    """The policy alone and the whole recipe on the GPU, against one step of the trainer on
    mobilenetv3_large_100 (bf16 autocast) at the same batch."""
    from engine.optim import OptimizerConfig, build_optimizer
    from engine.precision import Precision
    from engine.step import DeviceInput, TrainStep, sync
    from model import create_model
    dev = torch.device("cuda", torch.cuda.current_device())
    x_u8 = images.to(dev)
    labels = torch.randint(1000, (args.batch,), device=dev)
    policy = DeviceAugment(num_classes=1000, auto_augment=args.policy)
    recipe = DeviceInput(DeviceAugment(num_classes=1000, auto_augment=args.policy, random_erase=0.2,
                                       mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1))
    model = create_model("mobilenetv3_large_100").to(dev, memory_format=torch.channels_last)
    step = TrainStep(model, build_optimizer(model, OptimizerConfig()), Precision(True, torch.bfloat16), dev)
    x, _ = DeviceInput()(x_u8, labels, 0)
    calls = [Call("policy", lambda i: policy.before_normalize(x_u8, i), args.batch, lambda: sync(dev)),
             Call("full recipe", lambda i: recipe(x_u8, labels, i), args.batch, lambda: sync(dev)),
             Call("train step", lambda i: step(x, labels), args.batch, lambda: sync(dev))]
    policy_ms, full_ms, step_ms = (v * args.batch for v in ms_per_image(args, calls))
    return {"device": torch.cuda.get_device_name(dev), "policy_ms_per_batch": policy_ms,
            "policy_ms_per_image": policy_ms / args.batch, "full_recipe_ms_per_batch": full_ms,
            "train_step_ms": step_ms, "train_step_arch": "mobilenetv3_large_100",
            "full_recipe_share_of_step": full_ms / (full_ms + step_ms)}


def cost_row(name: str, magnitude, ours_ms: float, tv_ms: float) -> dict:
    return {"name": name, "magnitude": magnitude, "ours_ms_per_image": ours_ms, "torchvision_ms_per_image": tv_ms,
            "torchvision_over_ours": tv_ms / ours_ms}


COLUMNS = [("CPU, ms per image", "name", ""), ("magnitude", "magnitude", ".3f"), ("ours", "ours_ms_per_image", ".3f"),
           ("torchvision", "torchvision_ms_per_image", ".3f"), ("tv / ours", "torchvision_over_ours", ".2f")]


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report("augment_cost", argv)
    images = sample_images(args.batch, args.image_size)
    ours_ms, tv_ms = ms_per_image(args, policy_calls(args, images))
    rows = [cost_row(f"{args.policy} policy", None, ours_ms, tv_ms)]
    result = {"policy": args.policy, "batch": args.batch, "image_size_px": args.image_size,
              "cpu_ours_ms_per_image": ours_ms, "cpu_torchvision_ms_per_image": tv_ms, "cpu_speedup": tv_ms / ours_ms}
    if not args.no_per_op:
        magnitudes, calls = op_calls(images)
        ms = ms_per_image(args, calls)
        rows += [cost_row(op, m, ms[2 * i], ms[2 * i + 1]) for i, (op, m) in enumerate(magnitudes.items())]
        result["cpu_per_op"] = {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows[1:]}
    if torch.cuda.is_available():
        result["gpu"] = gpu = gpu_numbers(args, images)
        print(f"GPU  ours (batched) {gpu['policy_ms_per_image']:.4f} ms/image ({gpu['policy_ms_per_batch']:.2f} "
              f"ms/batch, {gpu['device']}); full recipe (policy + erase + mixup/cutmix) "
              f"{gpu['full_recipe_ms_per_batch']:.2f} ms/batch = {gpu['full_recipe_share_of_step']:.1%} of a "
              f"{gpu['train_step_arch']} step ({gpu['train_step_ms']:.2f} ms)")
    else:
        print("GPU  not available: CPU numbers only")
    bars = []
    for r in rows:
        o, t = r["ours_ms_per_image"], r["torchvision_ms_per_image"]
        note = f"{t / o:.2f}x cheaper" if o < t else f"{o / t:.2f}x dearer"
        bars += [(f"{r['name']}: ours", o, o, o, "#1f77b4", note),
                 (f"{r['name']}: torchvision", t, t, t, "#7f7f7f", "")]
    setting = (f"{args.batch} images of {args.image_size} px, uint8 channels_last, {torch.get_num_threads()} CPU "
               f"threads, median of {args.repeats}; ours batched vs torchvision v2 image by image")
    settings = {"policy": args.policy, "batch": args.batch, "image_size_px": args.image_size,
                "repeats": args.repeats, "warmup": args.warmup, "torch_threads": torch.get_num_threads()}
    return report.write(args, setting, settings, rows, COLUMNS, bars, "CPU ms per image (median)", **result)


if __name__ == "__main__":
    run_command(main)
