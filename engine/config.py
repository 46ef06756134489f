"""The trainer's configuration: every flag with its default, in one place.

Two stages, as in timm: `--config recipe.yaml` sets defaults, flags on the command line
override them. The reference recipe's flags keep their spellings (`--batch_size`,
`--learning-rate`, `--apex-opt-level`, ...) and each has its hyphen/underscore twin.
"""
import argparse
import json
from pathlib import Path

import yaml

from core.errors import ConfigError
from engine.resolution import ResolutionSchedule
from engine.optim import IMPLS, OPTIMIZERS, SCHEDULES, OptimizerConfig, ScheduleConfig
from loaders import LOADERS, DALIOptions, FFCVOptions
from loaders.common import SHUFFLES, VAL_CROP_RATIO
from loaders.options import DECODES

OPT, SCHED = OptimizerConfig(), ScheduleConfig()  # the recipe's defaults live there
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")


def _twin(flag: str) -> list[str]:
    """'--batch_size' -> ['--batch_size', '--batch-size'] (the other spelling accepted too)."""
    other = "--" + (flag[2:].replace("_", "-") if "_" in flag else flag[2:].replace("-", "_"))
    return [flag] if other == flag else [flag, other]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train MobileNetV3 on an ImageNet-layout dataset. One process: python train.py ...; "
                    "N devices: torchrun --nproc_per_node=N train.py ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(flag, *more, **kw):
        p.add_argument(*_twin(flag), *more, **kw)

    add("--config", default=None, help="YAML recipe: its keys set defaults (see configs/); flags override")
    # -- the reference recipe's flags -------------------------------------------------------
    add("--arch", default="mobilenetv3_large_100",
        help="model: mobilenetv3_{large,small}_{100,075,050} or mobilenet_v3_large / mobilenet_v3_small")
    add("--data", default=None,
        help="ImageNet-layout folder (train/, val/), or a published remote one: s3://BUCKET/PREFIX, gs://, az://, "
             "https:// (with --cache-dir and --cache-size); default: the built-in sample dataset")
    add("--batch_size", "-b", type=int, default=128,
        help="GLOBAL batch size over all devices, as in the reference (1024 on 8 devices = 128 each)")
    add("--learning-rate", "--lr", dest="learning_rate", type=float, default=OPT.lr,
        help="peak learning rate for the global batch; scale it linearly with the global batch, as the reference "
             "does (0.008 for 128, 0.064 for 1024 = 8 x 128)")
    add("--print-freq", type=int, default=10, help="log every N steps")
    add("--epochs", type=int, default=SCHED.epochs, help="number of epochs")
    add("--apex", action="store_true", help="mixed precision (torch.amp; NVIDIA apex is not needed)")
    add("--apex-opt-level", default="O1", choices=["O0", "O1", "O2"],
        help="with --apex: O0 = fp32, O1/O2 = autocast in --amp-dtype (fp16 adds a dynamic loss scaler)")
    add("--loss-scale", type=float, default=2.0 ** 16,
        help="float16: the dynamic loss scaler's initial scale (apex's loss_scale; halves on overflow)")
    add("--lr-step-size", type=float, default=SCHED.step_size,
        help="step schedule: decay every N epochs, counted in whole epochs (fractional: timm's 2.4)")
    add("--lr-gamma", type=float, default=SCHED.gamma, help="step schedule: decay factor")
    add("--wd", "--weight-decay", dest="wd", type=float, default=OPT.weight_decay,
        help="weight decay (not applied to norm layers and biases)")
    add("--device_id", type=int, default=None, help="device index for a single process (torchrun sets LOCAL_RANK)")
    add("--workers", "-j", type=int, default=4, help="loader workers / threads per process")
    add("--max_steps", type=int, default=None,
        help="performance mode: at most N steps per epoch, then the img/s summary")
    # -- what torchvision's and timm's trainers also offer --------------------------------
    add("--loader", default="ffcv", choices=list(LOADERS), help="input pipeline")
    add("--output-dir", default=".", help="checkpoints, metrics.jsonl, summary.json and the plot go here")
    add("--resume", default="auto",
        help="checkpoint to continue from; auto: OUTPUT_DIR/checkpoint.pth when it is this run's (the same "
             "arch, classes, global batch and recipe), so a restarted command continues; another run's "
             "checkpoint there is an error (see --overwrite)")
    add("--overwrite", action="store_true",
        help="start afresh in an OUTPUT_DIR that holds another run's checkpoint, replacing it")
    add("--checkpoint-every", default="10min",
        help="also save checkpoint.pth mid-epoch: every N steps ('500') or minutes ('10min'); 0: epoch ends only")
    add("--dist-timeout", type=float, default=30.0, metavar="MINUTES",
        help="under torchrun: the process group's collective timeout, and the step watchdog's: a rank on which "
             "no step has completed for this long writes every thread's stack to stderr, names its rank and step, "
             "and exits 124, so torchrun --max-restarts restarts the group from the last checkpoint")
    add("--verify-data", action="store_true",
        help="check every converted file against its converter's checksums before training "
             "(sizes are always checked)")
    add("--max-bad-samples", type=int, default=0,
        help="torchvision loader on record shards: damaged samples (checksum mismatch) to count and get past "
             "before stopping (train: the next good sample takes the slot, so every rank runs every step; "
             "val: left out); 0 stops at the first, naming it")
    add("--evaluate", action="store_true", help="only evaluate (weights from --resume or --pretrained)")
    add("--pretrained", default=None,
        help="MobileNetV3 weights file, torchvision's or timm's format (found from its keys; .pth, .bin or "
             ".safetensors; you download it, nothing is downloaded)")
    add("--opt", default=OPT.name, choices=OPTIMIZERS, help="optimizer")
    add("--optimizer-impl", default=OPT.impl, choices=IMPLS,
        help="optimizer kernels: fused (one kernel for all parameters; SGD on CPU/CUDA), foreach (one launch per "
             "op over all parameters) or for-loop; auto: fused where torch has it for --opt, else foreach")
    add("--momentum", type=float, default=OPT.momentum, help="optimizer momentum")
    add("--rmsprop-alpha", type=float, default=OPT.rmsprop_alpha, help="RMSprop smoothing constant (reference: 0.9)")
    add("--rmsprop-eps", type=float, default=OPT.rmsprop_eps, help="RMSprop epsilon (reference: 0.0316)")
    add("--warmup-epochs", type=float, default=SCHED.warmup_epochs, help="linear LR warm-up length, in epochs")
    add("--lr-scheduler", default=SCHED.name, choices=SCHEDULES, help="LR schedule after warm-up")
    add("--warmup-lr", type=float, default=SCHED.warmup_lr,
        help="LR the warm-up starts from (timm's recipe: 1e-6); default: 0.01 x --learning-rate")
    add("--label-smoothing", type=float, default=0.0, help="label smoothing for the loss")
    add("--model-ema", action="store_true", help="keep and evaluate an exponential moving average of the weights")
    add("--model-ema-decay", type=float, default=0.9999, help="EMA decay per step")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--compile-mode", default="default", choices=COMPILE_MODES,
        help="with --compile: torch.compile's mode; reduce-overhead adds inductor's own CUDA graphs (and then "
             "--cuda-graphs runs eagerly; under DDP, BatchNorm's buffer updates make it skip them: pytorch "
             "issue 139207)")
    add("--cuda-graphs", action="store_true",
        help="capture the whole training step (forward, loss, backward, optimizer step, EMA) in a CUDA graph per "
             "input shape and replay it: less host time per step. fp16 keeps the scaler's step outside the graph. "
             "Off CUDA (or where capture cannot work) one line says why and the step runs eagerly")
    add("--tensorboard", action="store_true",
        help="also write TensorBoard scalars (loss, LR, Acc@1/5, img/s, data-wait) to OUTPUT_DIR/tensorboard")
    add("--seed", type=int, default=0, help="seed for weights, shuffling and augmentation")
    add("--deterministic", action="store_true", help="deterministic algorithms (slower; bitwise repeatable on CPU)")
    add("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"], help="accelerator kind")
    add("--amp-dtype", default="auto", choices=["auto", "float16", "bfloat16"],
        help="autocast dtype with --apex: auto = the device's fast one: bfloat16 on CUDA from Ampere on, float16 "
             "(with a loss scaler) on Volta/Turing and NPUs, bfloat16 on CPUs with AMX, else fp32 (one line says "
             "so); an explicit dtype is used even where it is slower than fp32")
    add("--image-size", type=int, default=224,
        help="train crop size in pixels (the fixed resolution; see --min-res for a schedule) and the val crop size")
    add("--min-res", type=int, default=None,
        help="progressive resizing, FFCV's schedule: train at this many px until --start-ramp, then ramp linearly "
             "to --max-res at --end-ramp (rounded down to multiples of 32); unset: --image-size throughout")
    add("--max-res", type=int, default=None, help="with --min-res: the final train resolution (default --image-size)")
    add("--start-ramp", type=int, default=None,
        help="with --min-res: the last epoch (counted from 0) at --min-res (default: 3/4 of --epochs, and "
             "before the last)")
    add("--end-ramp", type=int, default=None,
        help="with --min-res: the first epoch at --max-res (default: the last epoch)")
    add("--val-res", type=_int_list, default=None,
        help="val crop size(s) in px: the crop of an image whose shorter side is resized to res / --val-crop-ratio. "
             "Several (224,256) with --evaluate: one Acc@1 line each; in training the first is used. "
             "Default: the final train resolution")
    add("--val-crop-ratio", type=float, default=VAL_CROP_RATIO, help="val crop / resized shorter side (224 of 256)")
    add("--eval-flip", action="store_true", help="evaluate on the mean logits of each image and its mirror image")
    add("--dropout", type=float, default=0.2, help="dropout before the classifier")
    add("--drop-path", type=float, default=0.0,
        help="stochastic depth rate, as timm's drop_path_rate: block i of n drops its residual "
             "branch with rate x i / n (timm's recipe: 0.2)")
    add("--bn-eps", type=float, default=None,
        help="BatchNorm eps; default: that of the --pretrained file's format (timm 1e-5, "
             "torchvision 1e-3), else 1e-3; a resumed or evaluated checkpoint brings the eps it was trained with")
    add("--ra-magnitude-std", type=float, default=0.0,
        help="RandAugment: draw each op's magnitude bin from N(--ra-magnitude, this), clipped to "
             "0..30; timm's mstd x 3 (timm's mstd0.5 = 1.5); inf: uniform in 0..--ra-magnitude")
    add("--random-erase-mode", default="const", choices=["const", "pixel"],
        help="random erasing fill: const (the mean) or pixel (per-pixel normal noise, timm's recipe)")
    add("--bn-momentum", default="auto",  # checked in parse_config, a recipe's value too
        help="BatchNorm momentum: how fast the running statistics that evaluation uses follow the batches. "
             "auto: from the run's total steps (--epochs x steps per epoch, --max_steps honoured), so they "
             "settle within the first 5%% of the run: 0.1 up to ~870 steps, the model's own 0.01 (TF's "
             "decay 0.99, the reference's) from ~9,200; a resumed run keeps its checkpoint's. A number "
             "in (0, 1] is used as given. config.json records the value used")
    # -- device-side augmentation ---------------------------------------------------------
    add("--auto-augment", default="none", choices=["imagenet", "randaugment", "trivialaugment", "none"],
        help="per-sample policy applied on the device to the uint8 batch")
    add("--ra-num-ops", type=int, default=2, help="RandAugment: ops per sample")
    add("--ra-magnitude", type=int, default=9, help="RandAugment: magnitude bin 0..30 (torchvision's scale)")
    add("--random-erase", type=float, default=0.0, help="random erasing probability per sample")
    add("--mixup-alpha", type=float, default=0.0, help="mixup alpha (0 = off)")
    add("--cutmix-alpha", type=float, default=0.0, help="cutmix alpha (0 = off)")
    # -- loader options -------------------------------------------------------------------
    add("--ffcv-order", default=FFCVOptions.order, choices=["random", "quasi_random"], help="FFCV traversal order")
    add("--os-cache", action=argparse.BooleanOptionalAction, default=FFCVOptions.os_cache,
        help="FFCV: let the OS page cache hold the .beton (best when it fits in RAM)")
    add("--decode", default=DALIOptions.decode, choices=list(DECODES),
        help="where JPEGs are decoded: cpu (the loader's host threads), device (where the batch trains: "
             "--loader torchvision reads bytes and decodes the batch with nvJPEG on CUDA, or on the CPU when "
             "that trains; --loader dali uses its mixed nvJPEG decoder, CUDA only), auto (device on CUDA "
             "where the loader can; FFCV always decodes on the CPU)")
    # -- remote data (storage/) and the train order -----------------------------------------
    add("--cache-dir", default=None,
        help="with a remote --data (s3://, gs://, az://, https://): a folder on this node's local disk for its "
             "cache, shared by the node's ranks (one fetcher per node downloads each shard once)")
    add("--cache-size", default=None,
        help="with a remote --data: the cache's bound (e.g. 200G, 500M); the folder never holds more. Smaller than "
             "the split: use --shuffle shards")
    add("--shuffle", default="global", choices=list(SHUFFLES),
        help="train order: global (one permutation of all samples), or shards (the shards shuffled, then samples "
             "within windows of --shuffle-window shards: what a cache smaller than the split needs). Either "
             "depends only on the seed, epoch, these settings and the global batch, so a resume on another "
             "world size is exact")
    add("--shuffle-window", type=int, default=8,
        help="--shuffle shards: shards whose samples are mixed together; keep two windows within --cache-size")
    add("--warmup-steps-timing", type=int, default=5,
        help="steps at the start of each epoch left out of the img/s figure")
    return p


def bn_momentum(value) -> float | str:
    """'auto' or a momentum in (0, 1] (a recipe gives a YAML number, the command line text)."""
    if value == "auto":
        return value
    try:
        momentum = float(value)
    except (TypeError, ValueError):
        momentum = float("nan")
    if not 0.0 < momentum <= 1.0:
        raise ConfigError(f"--bn-momentum {value}: give auto or a number in (0, 1], e.g. 0.1")
    return momentum


def _int_list(text) -> list[int]:
    """'224,256' -> [224, 256] (a recipe may give a YAML list or a single number)."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    return [int(v) for v in str(text).split(",") if v.strip()]


def _check_recipe(recipe: dict, path: str, parser: argparse.ArgumentParser) -> dict:
    known = {a.dest for a in parser._actions}
    out = {}
    for key, value in recipe.items():
        dest = key.replace("-", "_")
        dest = {"lr": "learning_rate", "weight_decay": "wd"}.get(dest, dest)
        if dest not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r} (keys are the flags' names, e.g. batch_size)")
        out[dest] = value
    return out


def parse_config(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        path = Path(first.config)
        if not path.exists():
            raise ConfigError(f"--config {path}: no such file (recipes live in configs/)")
        recipe = yaml.safe_load(path.read_text()) or {}
        if not isinstance(recipe, dict):
            raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
        parser.set_defaults(**_check_recipe(recipe, str(path), parser))
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: must be >= 1")
    if args.compile_mode != "default" and not args.compile:
        raise ConfigError(f"--compile-mode {args.compile_mode}: it sets the mode of --compile: add --compile")
    if args.val_res is not None:  # a recipe gives a YAML number or list, not the flag's text
        args.val_res = _int_list(args.val_res)
    args.bn_momentum = bn_momentum(args.bn_momentum)
    return args


def to_dict(args: argparse.Namespace) -> dict:
    """The resolved config as plain JSON types, saved with every checkpoint and log."""
    return json.loads(json.dumps(vars(args), default=str))


def optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(name=args.opt, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.wd,
                           rmsprop_alpha=args.rmsprop_alpha, rmsprop_eps=args.rmsprop_eps, impl=args.optimizer_impl)


def schedule_config(args: argparse.Namespace) -> ScheduleConfig:
    return ScheduleConfig(name=args.lr_scheduler, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                          warmup_lr=args.warmup_lr, step_size=args.lr_step_size, gamma=args.lr_gamma)


def resolution_schedule(args: argparse.Namespace) -> ResolutionSchedule:
    if args.min_res is None:
        return ResolutionSchedule.fixed(args.image_size)
    start = args.start_ramp if args.start_ramp is not None else max(0, min(args.epochs * 3 // 4, args.epochs - 2))
    end = args.end_ramp if args.end_ramp is not None else max(start, args.epochs - 1)
    return ResolutionSchedule(args.min_res, args.max_res or args.image_size, start, end)
