"""Train MobileNetV3 with a pluggable input pipeline; the same command on 1 CPU or N devices.

    python train.py --config configs/sample_cpu.yaml                  # the built-in sample dataset
    python train.py --loader ffcv --data ImageNet/ --arch mobilenetv3_large_100
    torchrun --nproc_per_node=8 train.py --config configs/mobilenetv3_large_8p.yaml --data ImageNet/

Writes to --output-dir: checkpoint.pth (every epoch, atomic), model_best.pth, metrics.jsonl (one
line per epoch), summary.json, history.png and config.json; ends with `Acc@1 X  Acc@5 Y  FPS Z`.
"""
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from convert.make_sample import default_sample_dir, ensure_sample
from core.errors import CheckpointError, ConfigError, DatasetError, TrainingDiverged, run_command
from engine import checkpoint as ckpt
from engine import distributed
from engine.config import optimizer_config, parse_config, schedule_config, to_dict
from engine.loop import EpochPlan, evaluate, train_one_epoch
from engine.metrics import append_jsonl, hardware, plot_history, read_jsonl, write_json_atomic
from engine.optim import build_optimizer
from engine.precision import Precision
from engine.step import DeviceInput, TrainStep
from loaders import build_loader, loader_options
from model import create_model, load_pretrained


def prepare_data(args, runtime) -> Path:
    """The dataset folder; with no --data, the built-in sample, converted (by rank 0) for the loader."""
    if args.data:
        data = Path(args.data)
        if not (data / "train").is_dir() and not (data / "ffcv").is_dir() and not (data / "shards").is_dir():
            raise DatasetError(f"--data {data}: no train/ folder there (expected ImageNet layout "
                               f"{data}/train/<class>/<image> and {data}/val/...)")
        return data
    if runtime.is_main:
        ensure_sample(None, who="train.py", loaders=(args.loader,))
    if runtime.distributed:
        dist.barrier()
    return default_sample_dir()


def build_loaders(args, data: Path, runtime, per_device: int):
    common = dict(data=data, workers=args.workers, image_size=args.image_size, seed=args.seed,
                  device=runtime.device, rank=runtime.rank, world_size=runtime.world_size,
                  options=loader_options(args.loader, args), batch_size=per_device)
    val = build_loader(args.loader, split="val", **common)
    train = None if args.evaluate else build_loader(args.loader, split="train", **common)
    return train, val


def build_model(args, num_classes: int, device: torch.device, log):
    model = create_model(args.arch, num_classes=num_classes, dropout=args.dropout)
    if args.pretrained:
        log(load_pretrained(model, args.pretrained, num_classes=num_classes))
    if args.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = args.bn_momentum
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format)


def build_augment(args, num_classes: int):
    wanted = (args.auto_augment != "none" or args.random_erase > 0 or args.mixup_alpha > 0
              or args.cutmix_alpha > 0)
    if not wanted:
        return None
    from augment import DeviceAugment
    return DeviceAugment(num_classes=num_classes, auto_augment=args.auto_augment,
                         randaugment_num_ops=args.ra_num_ops, randaugment_magnitude=args.ra_magnitude,
                         random_erase=args.random_erase, mixup_alpha=args.mixup_alpha,
                         cutmix_alpha=args.cutmix_alpha, label_smoothing=args.label_smoothing, seed=args.seed)


class StopFlag:
    """SIGTERM (preemption, torchrun shutting down) asks for a checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def main(argv=None):
    args = parse_config(argv)
    runtime = distributed.setup(args.device, args.device_id, deterministic=args.deterministic)
    log = (lambda msg: print(msg, flush=True)) if runtime.is_main else (lambda msg: None)
    if args.batch_size % runtime.world_size:
        raise ConfigError(f"--batch_size {args.batch_size} is the global batch and must divide by the "
                          f"{runtime.world_size} processes: use e.g. {args.batch_size // runtime.world_size * runtime.world_size}")
    per_device = args.batch_size // runtime.world_size
    torch.manual_seed(args.seed)
    data = prepare_data(args, runtime)
    train_loader, val_loader = build_loaders(args, data, runtime, per_device)
    out_dir = Path(args.output_dir)  # written to only once the inputs are known to be good
    out_dir.mkdir(parents=True, exist_ok=True)
    config = to_dict(args)
    if runtime.is_main:
        write_json_atomic(config, out_dir / "config.json")
    classes = val_loader.classes
    device, precision = runtime.device, Precision.resolve(args.apex and args.apex_opt_level != "O0",
                                                          args.amp_dtype, runtime.device)
    model = build_model(args, len(classes), device, log)
    ema = None
    if args.model_ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.model_ema_decay), use_buffers=True)
    optimizer = build_optimizer(model, optimizer_config(args))
    inputs = DeviceInput(build_augment(args, len(classes)), args.channels_last, runtime.rank)

    start_epoch, skip, best_acc1, state = 0, 0, 0.0, None
    resume = ckpt.resolve_resume(args.resume, out_dir)
    if resume:
        state = ckpt.load(resume)
        model.load_state_dict(state["model"])
        if not args.evaluate:
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            start_epoch, skip = state["epoch"], state["next_batch"]
            best_acc1 = state.get("best_acc1", 0.0)
            ckpt.set_rng_state(state["rng"])
        log(f"resumed from {resume}: epoch {start_epoch + 1}, batch {skip}")

    if args.evaluate:
        if not (resume or args.pretrained):
            raise CheckpointError("--evaluate needs weights: pass --resume CHECKPOINT or --pretrained FILE")
        result = evaluate(model, val_loader, inputs, precision, runtime)
        log(f"Acc@1 {result['acc1']:.3f}  Acc@5 {result['acc5']:.3f}  ({result['val_images']} images)")
        if runtime.is_main:
            write_json_atomic({**result, "weights": str(resume or args.pretrained)}, out_dir / "eval.json")
        distributed.cleanup()
        return result

    eval_model = model  # evaluation runs on the bare model: ranks may see different val batch counts
    if args.compile:
        model = torch.compile(model)
    if runtime.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type != "cpu" else None)
    step = TrainStep(model, optimizer, precision, device, label_smoothing=args.label_smoothing, ema=ema,
                     loss_scale=args.loss_scale)
    if state is not None and not args.evaluate:
        step.scaler.load_state_dict(state["scaler"])
    steps_per_epoch = min(len(train_loader), args.max_steps or len(train_loader))
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch_size {args.batch_size} is larger than the {train_loader.num_samples} "
                          f"training images per process: lower it")
    schedule = schedule_config(args)
    log(f"training {args.arch} on {len(classes)} classes with --loader {args.loader}: {args.epochs} epochs x "
        f"{steps_per_epoch} steps, global batch {args.batch_size} on {runtime.world_size} x {device}, "
        f"{precision.name}, output {out_dir}")
    stop = StopFlag()
    metrics_path = out_dir / "metrics.jsonl"
    timed_images, timed_s = 0, 0.0
    result = {}
    for epoch in range(start_epoch, args.epochs):
        epoch_start_s = time.perf_counter()
        train_loader.set_epoch(epoch)
        plan = EpochPlan(epoch=epoch + 1, first_step=epoch * steps_per_epoch, steps=steps_per_epoch,
                         lr_at=lambda s: schedule.lr_at(s, args.learning_rate, steps_per_epoch), skip=skip,
                         timing_warmup_steps=min(args.warmup_steps_timing, max(0, steps_per_epoch - skip - 1)),
                         print_freq=args.print_freq, log=log, stop_requested=stop)
        stats = train_one_epoch(step, inputs, train_loader, plan, runtime)
        skip = 0
        if stats["first_batch_s"] is not None and epoch == start_epoch:
            log(f"first batch after {stats['first_batch_s']:.1f}s (loader start-up / JIT; not in img/s)")
        state = dict(model=eval_model.state_dict(), optimizer=optimizer.state_dict(), scaler=step.scaler.state_dict(),
                     ema=ema.state_dict() if ema is not None else None, config=config, best_acc1=best_acc1)
        if stats["interrupted"]:
            if runtime.is_main:
                ckpt.save_atomic({**state, "epoch": epoch, "next_batch": stats["next_batch"],
                                  "rng": ckpt.rng_state()}, out_dir / ckpt.CHECKPOINT)
            log(f"SIGTERM: saved {out_dir / ckpt.CHECKPOINT} at epoch {epoch + 1} batch {stats['next_batch']}; "
                f"continue with --resume auto")
            distributed.cleanup()
            return None
        if not all(torch.isfinite(p).all() for p in eval_model.parameters()):
            raise TrainingDiverged("train.py: the weights are no longer finite: stopping; the last good "
                                   "checkpoint is untouched")
        val = evaluate(eval_model, val_loader, inputs, precision, runtime)
        record = {"epoch": epoch + 1, **{k: stats[k] for k in ("train_loss", "imgs_per_s", "data_wait_frac",
                                                                 "skipped_steps", "nonfinite_steps", "steps")},
                  **val, "lr": optimizer.param_groups[0]["lr"], "epoch_wall_s": time.perf_counter() - epoch_start_s}
        if ema is not None:
            record["ema_acc1"] = evaluate(ema.module, val_loader, inputs, precision, runtime)["acc1"]
        timed_images += stats["timed_images"]
        timed_s += stats["timed_wall_s"] if stats["timed_images"] else 0.0
        is_best = val["acc1"] >= best_acc1
        best_acc1 = max(best_acc1, val["acc1"])
        log(f"epoch {epoch + 1}/{args.epochs}  train-loss {stats['train_loss']:.4f}  Acc@1 {val['acc1']:.2f}  "
            f"Acc@5 {val['acc5']:.2f}  img/s {stats['imgs_per_s']:.1f}  "
            f"data-wait {100 * stats['data_wait_frac']:.0f}%  ({record['epoch_wall_s']:.0f}s)")
        if runtime.is_main:
            append_jsonl(record, metrics_path)
            plot_history(read_jsonl(metrics_path), out_dir / "history.png")
            state.update(epoch=epoch + 1, next_batch=0, rng=ckpt.rng_state(), best_acc1=best_acc1,
                         acc1=val["acc1"], acc5=val["acc5"])
            ckpt.save_atomic(state, out_dir / ckpt.CHECKPOINT)
            if is_best:
                ckpt.save_atomic(state, out_dir / ckpt.BEST)
        result = {"acc1": val["acc1"], "acc5": val["acc5"]}

    fps = timed_images / timed_s if timed_s > 0 else float("nan")
    if runtime.is_main and result:
        write_json_atomic({**result, "best_acc1": best_acc1, "imgs_per_s": fps, "epochs": args.epochs,
                           "world_size": runtime.world_size, "loader": args.loader, "arch": args.arch,
                           "precision": precision.name, "global_batch": args.batch_size,
                           "hardware": hardware(device)}, out_dir / "summary.json")
        log(f"Acc@1 {result['acc1']:.3f}  Acc@5 {result['acc5']:.3f}  FPS {fps:.1f}")
    distributed.cleanup()
    return {**result, "imgs_per_s": fps}


if __name__ == "__main__":
    run_command(main)
