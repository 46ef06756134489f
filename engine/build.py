"""What a training run is built from, by the flags: its data (converted for the loader where it is
the built-in sample, and checked against its manifests), its loaders, network and augmentation."""
from pathlib import Path

import torch
import torch.distributed as dist

from core.dataset import CONVERTED_DIRS
from core.errors import ConfigError, DatasetError
from core.manifest import MANIFEST, size_problems
from engine import checkpoint as ckpt
from engine.config import get_args_parser
from loaders import build_loader, loader_options
from model import create_model, load_pretrained
from storage.cache import attach, is_remote, node_cache, parse_size


def prepare_data(args, runtime) -> Path:
    """The dataset folder; with no --data, the built-in sample, converted (by rank 0) for the loader;
    a remote --data (s3://, gs://, az://, https://), its mirror in the node's cache (storage/)."""
    if is_remote(args.data):
        return attach(args.data, args.cache_dir, parse_size(args.cache_size) if args.cache_size else 0)
    if args.data:
        data = Path(args.data)
        if not (data / "train").is_dir() and not (data / "ffcv").is_dir() and not (data / "shards").is_dir():
            raise DatasetError(f"--data {data}: no train/ folder there (expected ImageNet layout "
                               f"{data}/train/<class>/<image> and {data}/val/...)")
        return data
    from convert.default_data import default_sample_dir, ensure_sample  # here: the sample builder loads PIL
    if runtime.is_main:
        ensure_sample(None, who="train.py", loaders=(args.loader,))
    if runtime.distributed:
        dist.barrier()
    return default_sample_dir()


def check_data(args, data: Path, log):
    """Converted files against their converters' manifests: sizes always (cheap), every byte with
    --verify-data. Damaged data stops the run before it trains on it."""
    if node_cache(data) is not None:  # remote: the fetcher checks every part against the manifest as it arrives
        return
    folders = [data / sub for sub in CONVERTED_DIRS if (data / sub / MANIFEST).exists()]
    problems = [p for folder in folders for p in size_problems(folder)]
    if args.verify_data and not problems:
        from convert.verify import verify
        log(f"train.py: checking every converted file in {data} against its checksums (--verify-data)")
        problems = verify(data, progress=False)[0] if folders else []
    if problems:
        raise DatasetError(f"{len(problems)} damaged in {data}: {problems[0]}{' ...' if len(problems) > 1 else ''}: "
                           f"run `python convert/verify.py {data}` for the list, then re-run the converter")


def build_loaders(args, data: Path, runtime, per_device: int, train_px: int, val_px: int):
    common = dict(data=data, workers=args.workers, seed=args.seed, device=runtime.device, rank=runtime.rank,
                  world_size=runtime.world_size, options=loader_options(args.loader, args), batch_size=per_device,
                  val_crop_ratio=args.val_crop_ratio, shuffle=args.shuffle, shuffle_window=args.shuffle_window)
    val = build_loader(args.loader, split="val", image_size=val_px, **common)
    train = None if args.evaluate else build_loader(args.loader, split="train", image_size=train_px, **common)
    return train, val


def build_model(args, num_classes: int, device: torch.device, log):
    model = create_model(args.arch, num_classes=num_classes, dropout=args.dropout, drop_path=args.drop_path,
                         bn_eps=args.bn_eps)
    if args.pretrained:  # torchvision's or timm's format; the model takes the eps of the weights
        log(load_pretrained(model, args.pretrained, num_classes=num_classes, bn_eps=args.bn_eps))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format)


def take_network_from_checkpoint(args, argv):
    """--evaluate --resume CKPT: the network is the checkpoint's (its arch here; its classes and
    BatchNorm eps are checked and set where it is loaded), as export.py and predict.py read it."""
    saved = (ckpt.load(args.resume).get("config") or {}).get("arch")
    if not saved or saved == args.arch:
        return
    explicit = get_args_parser()  # the command line's own --arch, not a default or a recipe's
    explicit.set_defaults(arch=None)
    if explicit.parse_args(argv).arch is not None:
        raise ConfigError(f"--arch {args.arch}: {args.resume} holds a {saved}; drop --arch to evaluate it")
    args.arch = saved


def build_augment(args, num_classes: int):
    wanted = (args.auto_augment != "none" or args.random_erase > 0 or args.mixup_alpha > 0
              or args.cutmix_alpha > 0)
    if not wanted:
        return None
    from augment import DeviceAugment
    return DeviceAugment(num_classes=num_classes, auto_augment=args.auto_augment,
                         randaugment_num_ops=args.ra_num_ops, randaugment_magnitude=args.ra_magnitude,
                         randaugment_magnitude_std=args.ra_magnitude_std,
                         random_erase=args.random_erase, erase_mode=args.random_erase_mode,
                         mixup_alpha=args.mixup_alpha,
                         cutmix_alpha=args.cutmix_alpha, label_smoothing=args.label_smoothing, seed=args.seed)

