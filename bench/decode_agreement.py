"""Do batches decoded on the device match the host path's? The torchvision loader reads the same
epoch twice, --decode cpu (its workers decode) and --decode device (the batch is decoded on
--device), from the same seed: the crop boxes are the same, so the pixels differ only by the
decoders' and resize kernels' rounding. Prints the mean and largest absolute pixel difference
(the two epochs read in step, compared on --device; only the sums are read back).

    python bench/decode_agreement.py --device cuda --data DIR [--epochs 2] [--image-size 224] [--json PATH]

On CUDA it reads several epochs, so nvJPEG's buffers are recycled many times: a batch overwritten
while queued kernels still read it (the hazard device_decode.prefetch guards against) would
show up as a large difference.
"""
import argparse
import itertools

import torch

from bench.harness import add_output_flags, cores, save_result
from core.errors import ConfigError, run_command
from loaders import build_loader


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="ImageNet-layout folder; default: the built-in sample dataset")
    p.add_argument("--split", default="train", choices=["train", "val"], help="train: random crops; val: center")
    p.add_argument("--device", default="cpu", help="where the device path decodes (cpu, cuda, cuda:1)")
    p.add_argument("--epochs", type=int, default=2, help="epochs compared")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--image-size", type=int, default=224, help="output px")
    p.add_argument("--workers", type=int, default=cores(), help="loader workers")
    p.add_argument("--seed", type=int, default=0, help="shuffling and crop seed")
    add_output_flags(p, "decode_agreement")
    return p


def epoch_loader(args, data, decode: str, epoch: int):
    loader = build_loader("torchvision", split=args.split, data=data, batch_size=args.batch_size, workers=args.workers,
                          image_size=args.image_size, seed=args.seed, device=torch.device(args.device),
                          options={"decode": decode})
    loader.set_epoch(epoch)
    return loader


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if min(args.epochs, args.batch_size, args.image_size, args.workers) < 1:
        raise ConfigError("--epochs, --batch-size, --image-size and --workers must be >= 1")
    from convert.default_data import ensure_sample
    data = ensure_sample(args.data, "decode_agreement", loaders=("torchvision",))
    sums = torch.zeros(3, dtype=torch.int64, device=args.device)  # |difference|, pixels within 1, labels that differ
    worst, count, images = torch.zeros((), dtype=torch.int16, device=args.device), 0, 0
    for epoch in range(args.epochs):
        host, loader = (epoch_loader(args, data, decode, epoch) for decode in ("cpu", "device"))
        # Both paths in step, both batches on --device: nothing is kept, and only the sums come back.
        for pair in itertools.zip_longest(host, loader):
            if None in pair:
                raise ConfigError(f"the two paths gave {len(host)} and {len(loader)} batches: the loader is broken")
            (a, la), (b, lb) = pair
            diff = (a.to(torch.int16) - b.to(torch.int16)).abs()
            sums += torch.stack([diff.sum(), (diff <= 1).sum(), (la != lb).sum()])
            worst, count, images = torch.maximum(worst, diff.max()), count + diff.numel(), images + len(la)
    (total, within, labels_differ), worst = sums.tolist(), int(worst)
    result = {"settings": {**vars(args), "data": str(data)}, "decoding": loader.decoding,
              "host_decoded": loader.host_decoded, "images": images, "labels_equal": labels_differ == 0,
              "mean_abs_diff": total / count, "max_abs_diff": worst, "share_within_1": within / count}
    print(f"decode_agreement: {images} images over {args.epochs} epoch(s), decoded {loader.decoding} vs by the "
          f"workers: labels {'DIFFER' if labels_differ else 'equal'}, mean |difference| {result['mean_abs_diff']:.3f} "
          f"levels, max {worst}, {100 * within / count:.2f}% of pixels within 1 ({loader.host_decoded} images decoded "
          f"on the host instead)")
    print(f"wrote {save_result('decode_agreement', args, result)}")
    return result


if __name__ == "__main__":
    run_command(main)
