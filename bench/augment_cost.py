"""Per-image cost of augment.DeviceAugment's batched policy against torchvision v2 applied image by
image, on the same uint8 images, side by side in one run; then the same comparison op by op, to
show where the time goes; plus its GPU cost when CUDA is present.

    python bench/augment_cost.py [--batch 64] [--image-size 224] [--policy imagenet] [--threads N]
                                 [--no-per-op] [--json PATH]

CPU: ours gets the batch as loaders deliver it (uint8, channels_last); torchvision gets each image
as a contiguous C x H x W tensor, prepared outside the timed window. Both sides are warmed up,
then timed alternately (ours, torchvision, ours, ...) so that load from other processes hits both
alike, and the median of --repeats runs of each is reported. Per op: every image gets the op at
AutoAugment's middle magnitude bin (5 of 10, positive sign) through `augment.autoaugment.apply_op`,
the path a policy slot takes, against torchvision's own per-op mapping applied image by image,
all ops on both sides in turn within each repeat. GPU: the same batch on the device, with a
synchronize on each side of the timed window; for scale it also times one training step of
torchvision's mobilenet_v3_large (bf16 autocast, SGD) at the same batch and reports
augmentation's share.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from augment import DeviceAugment, OPS  # noqa: E402
from augment.autoaugment import apply_op  # noqa: E402
from augment.policies import magnitude_table  # noqa: E402
from bench.common import bar_chart, write_json  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--image-size", type=int, default=224, help="square image side in pixels")
    p.add_argument("--policy", default="imagenet", choices=["imagenet", "randaugment", "trivialaugment"],
                   help="auto-augment policy on both sides")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per side; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per side first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both sides (default: torch's own choice)")
    p.add_argument("--no-per-op", action="store_true", help="skip the op-by-op comparison")
    p.add_argument("--json", default=None, help="also write the results to this path")
    return p


def sample_images(batch: int, size: int) -> torch.Tensor:
    """Smooth colour blobs plus grain, so histogram ops see photo-like rather than flat histograms."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 3, 8, 8, generator=g) * 255
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    img += 12 * torch.randn(img.shape, generator=g)
    return img.clamp_(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)


def median_s(fns, repeats: int, warmup: int, sync=lambda: None) -> list[float]:
    """Median seconds per call of each of `fns(step)`, timed in turn within every repeat."""
    for i in range(warmup):
        for fn in fns:
            fn(i)
    times = [[] for _ in fns]
    for i in range(repeats):
        for fn, ts in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn(warmup + i)
            sync()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def torchvision_transform(policy: str):
    if policy == "imagenet":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    if policy == "randaugment":
        return v2.RandAugment(num_ops=2, magnitude=9)
    return v2.TrivialAugmentWide()


def per_op_numbers(args, images: torch.Tensor) -> dict:
    """ours vs torchvision, ms per image, for every op at a fixed magnitude (see the docstring).
    Every repeat runs all ops on both sides in turn, so a burst of load from another process
    lands on many ops a little rather than on one op entirely."""
    n, _, h, w = images.shape
    per_image = [img.contiguous() for img in images]
    tv = v2.AutoAugment()  # its per-op mapping (signed magnitude -> F.*), as tests/test_augment.py uses
    magnitudes, fns = {}, []
    for op in OPS[1:]:
        bins = magnitude_table(op, 10, h, w, wide=False)
        magnitudes[op] = m = 0.0 if bins is None else float(bins[5])
        mags = torch.full((n,), m, dtype=torch.float64)

        def ours(step, op=op, mags=mags):
            apply_op(images, op, mags)

        def theirs(step, op=op, m=m):
            for img in per_image:
                tv._apply_image_or_video_transform(img, op, m, interpolation=tv.interpolation, fill=tv._fill)

        fns += [ours, theirs]
    seconds = median_s(fns, args.repeats, args.warmup)
    rows = {}
    for i, (op, m) in enumerate(magnitudes.items()):
        ours_s, tv_s = seconds[2 * i], seconds[2 * i + 1]
        rows[op] = {"magnitude": m, "ours_ms_per_image": ours_s * 1e3 / n,
                    "torchvision_ms_per_image": tv_s * 1e3 / n, "torchvision_over_ours": tv_s / ours_s}
    return rows


def gpu_numbers(args, images: torch.Tensor, aug: DeviceAugment) -> dict:
    dev = torch.device("cuda")
    x_u8 = images.to(dev)
    labels = torch.randint(1000, (args.batch,), device=dev)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255
    recipe = DeviceAugment(num_classes=1000, auto_augment=args.policy, random_erase=0.2,
                           mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1)
    sync = torch.cuda.synchronize

    def policy_only(step):
        aug.before_normalize(x_u8, step)

    def full_recipe(step):  # policy + normalise + erasing + mixup/cutmix, as the trainer runs it
        x = (recipe.before_normalize(x_u8, step).float() - mean) / std
        recipe.after_normalize(x, labels, step)

    model = torchvision.models.mobilenet_v3_large().to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x_norm = ((x_u8.float() - mean) / std).contiguous(memory_format=torch.channels_last)

    def train_step(step):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x_norm), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    policy_s, full_s, step_s = median_s([policy_only, full_recipe, train_step], args.repeats, args.warmup, sync)
    return {"device": torch.cuda.get_device_name(), "policy_ms_per_batch": policy_s * 1e3,
            "policy_ms_per_image": policy_s * 1e3 / args.batch, "full_recipe_ms_per_batch": full_s * 1e3,
            "mobilenet_v3_large_step_ms": step_s * 1e3,
            "full_recipe_share_of_step": full_s / (full_s + step_s)}


def main() -> None:
    args = get_args_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = sample_images(args.batch, args.image_size)
    aug = DeviceAugment(num_classes=1000, auto_augment=args.policy)
    tv = torchvision_transform(args.policy)
    per_image = [img.contiguous() for img in images]

    def ours(step):
        aug.before_normalize(images, step)

    def theirs(step):
        torch.manual_seed(step)
        for img in per_image:
            tv(img)

    ours_s, tv_s = median_s([ours, theirs], args.repeats, args.warmup)
    result = {
        "policy": args.policy, "batch": args.batch, "image_size_px": args.image_size,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()],
        "cpu": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "cpu_ours_ms_per_image": ours_s * 1e3 / args.batch,
        "cpu_torchvision_ms_per_image": tv_s * 1e3 / args.batch,
        "cpu_speedup": tv_s / ours_s,
    }
    print(f"{args.policy}, batch {args.batch}, {args.image_size} px, {result['torch_threads']} CPU threads, "
          f"median of {args.repeats}")
    print(f"CPU  ours (batched)          {result['cpu_ours_ms_per_image']:8.3f} ms/image")
    print(f"CPU  torchvision v2 per image {result['cpu_torchvision_ms_per_image']:8.3f} ms/image")
    print(f"CPU  torchvision / ours       {result['cpu_speedup']:8.2f}x")
    if not args.no_per_op:
        result["cpu_per_op"] = per_op = per_op_numbers(args, images)
        print(f"\nCPU per op, every image the same op (ms/image)\n{'op':13s} {'magnitude':>9s} {'ours':>7s} "
              f"{'torchvision':>11s} {'tv/ours':>7s}")
        for op, r in per_op.items():
            print(f"{op:13s} {r['magnitude']:9.3f} {r['ours_ms_per_image']:7.3f} {r['torchvision_ms_per_image']:11.3f} "
                  f"{r['torchvision_over_ours']:7.2f}")
    if torch.cuda.is_available():
        result["gpu"] = gpu = gpu_numbers(args, images, aug)
        print(f"GPU  ours (batched)          {gpu['policy_ms_per_image']:8.4f} ms/image "
              f"({gpu['policy_ms_per_batch']:.2f} ms/batch, {gpu['device']})")
        print(f"GPU  full recipe (policy + erase + mixup/cutmix) {gpu['full_recipe_ms_per_batch']:.2f} ms/batch = "
              f"{100 * gpu['full_recipe_share_of_step']:.1f}% of a mobilenet_v3_large step "
              f"({gpu['mobilenet_v3_large_step_ms']:.2f} ms)")
    else:
        print("GPU  not available: CPU numbers only")
    if args.json:
        json_path = write_json(result, args.json)
        png_path = plot(json_path.with_suffix(".png"), result)
        print(f"\nwrote {json_path} and {png_path}")


def plot(path, result: dict) -> Path:
    """ms per image, ours against torchvision: the whole policy first, then each op."""
    labels, values, colors, notes = [], [], [], []
    pairs = [(f"{result['policy']} policy", result["cpu_ours_ms_per_image"], result["cpu_torchvision_ms_per_image"])]
    pairs += [(op, r["ours_ms_per_image"], r["torchvision_ms_per_image"]) for op, r in result.get("cpu_per_op", {}).items()]
    for name, ours_ms, tv_ms in pairs:
        labels += [f"{name}: ours", f"{name}: torchvision"]
        values += [ours_ms, tv_ms]
        colors += ["#1f77b4", "#7f7f7f"]
        notes += [f"{tv_ms / ours_ms:.2f}x cheaper" if ours_ms < tv_ms else f"{ours_ms / tv_ms:.2f}x dearer", ""]
    title = (f"augment_cost: {result['batch']} images of {result['image_size_px']} px, uint8 channels_last, "
             f"{result['torch_threads']} CPU threads; ours batched vs torchvision v2 image by image")
    return bar_chart(path, labels, values, values, values, colors, title, "CPU ms per image (median)", notes=notes)


if __name__ == "__main__":
    main()
