"""Train MobileNetV3 with a pluggable input pipeline; the same command on 1 CPU or N devices.

    python train.py --config configs/sample_cpu.yaml                  # the built-in sample dataset
    python train.py --loader ffcv --data ImageNet/ --arch mobilenetv3_large_100
    torchrun --nproc_per_node=8 train.py --config configs/mobilenetv3_large_8p.yaml --data ImageNet/

Writes to --output-dir: checkpoint.pth (every epoch, atomic), model_best.pth, metrics.jsonl (one
line per epoch), summary.json, history.png and config.json; ends with `Acc@1 X  Acc@5 Y  FPS Z`.
"""
import time
from pathlib import Path

import torch
import torch.distributed as dist

from convert.make_sample import default_sample_dir, ensure_sample
from core.dataset import CONVERTED_DIRS
from core.errors import (CheckpointError, ConfigError, DatasetError, ExitStatus, LoaderError, TrainingDiverged,
                         run_command)
from core.manifest import MANIFEST, size_problems
from engine import checkpoint as ckpt
from engine import distributed
from engine.config import get_args_parser, optimizer_config, parse_config, resolution_schedule, schedule_config, to_dict
from engine.faults import LoaderFailed
from engine.loop import EpochPlan, evaluate, train_one_epoch
from engine.metrics import (append_jsonl, hardware, keep_jsonl, per_class_report, plot_history, read_jsonl,
                            write_json_atomic)
from engine.optim import build_optimizer, current_lr, portable_state_dict
from engine.precision import Precision
from engine.step import DeviceInput, TrainStep, capture_stream
from engine.stop import EXIT_INTERRUPTED, StepWatchdog, StopRequest
from engine.tensorboard import ScalarWriter
from loaders import build_loader, loader_options
from model import create_model, load_pretrained
from storage.cache import attach, is_remote, node_cache, parse_size
from model.mobilenetv3 import BN_MOMENTUM, auto_bn_momentum, get_bn_eps, set_bn_eps, set_bn_momentum


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


def evaluate_only(args, model, val_loader, inputs, precision, runtime, val_res: list[int], log) -> dict:
    """--evaluate: one Acc@1 line per val resolution; the result of the first, with the others
    under "by_resolution" and its confusion matrix."""
    results = []
    for px in val_res:
        val_loader.set_resolution(px)
        result = evaluate(model, val_loader, inputs, precision, runtime, num_classes=len(val_loader.classes),
                          flip=args.eval_flip)
        log(f"Acc@1 {result['acc1']:.3f}  Acc@5 {result['acc5']:.3f}  ({result['val_images']} images at {px} px"
            f"{', with flips' if args.eval_flip else ''})")
        results.append({"val_res": px, "eval_flip": args.eval_flip, **result})
    return {**results[0], "by_resolution": [{k: v for k, v in r.items() if k != "confusion"} for r in results]}


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


def bn_momentum_for(args, total_steps: int, state: dict | None, log) -> float:
    """The BatchNorm momentum this run trains with: --bn-momentum's number, else (auto) the one a
    resumed run was trained with, so that it continues exactly as it began (a checkpoint from before
    auto ran with the model's own), else auto_bn_momentum of the run's total steps."""
    if args.bn_momentum != "auto":
        return args.bn_momentum
    if state is not None:
        saved = (state.get("config") or {}).get("bn_momentum")
        momentum, why = (BN_MOMENTUM if saved in (None, "auto") else saved), "the resumed run's"
    else:
        momentum, why = auto_bn_momentum(total_steps), f"for this run's {total_steps} steps"
    if momentum != BN_MOMENTUM:
        log(f"train.py: BatchNorm momentum {momentum:g} (--bn-momentum auto, {why}; the model's own "
            f"{BN_MOMENTUM:g} is for long runs)")
    return momentum


def chance_note(history: list[dict], num_classes: int, bn_momentum: float, total_steps: int) -> str | None:
    """One line when the last epoch evaluates near chance although the train loss fell clearly
    since the first: the mark of running statistics that lag the weights."""
    chance = 100.0 / num_classes
    if len(history) < 2 or history[-1]["acc1"] > 1.5 * chance:
        return None
    first_loss, loss = history[0]["train_loss"], history[-1]["train_loss"]
    if not loss <= 0.8 * first_loss:
        return None
    return (f"train.py: val accuracy {history[-1]['acc1']:.1f}% is near chance ({chance:.1f}% for {num_classes} "
            f"classes) although the train loss fell from {first_loss:.3f} to {loss:.3f}: likely cause: BatchNorm "
            f"running statistics not settled (momentum {bn_momentum:g} for this run's {total_steps} steps): raise "
            f"--bn-momentum (e.g. 0.1)")


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


def main(argv=None):
    args = parse_config(argv)
    runtime = distributed.setup(args.device, args.device_id, deterministic=args.deterministic,
                                cuda_graphs=args.cuda_graphs, timeout_min=args.dist_timeout)
    log = (lambda msg: print(msg, flush=True)) if runtime.is_main else (lambda msg: None)
    if args.batch_size % runtime.world_size:
        raise ConfigError(f"--batch_size {args.batch_size} is the global batch and must divide by the "
                          f"{runtime.world_size} processes: use e.g. {args.batch_size // runtime.world_size * runtime.world_size}")
    per_device = args.batch_size // runtime.world_size
    torch.manual_seed(args.seed)
    data = prepare_data(args, runtime)
    check_data(args, data, log)
    resolution = resolution_schedule(args)
    val_res = args.val_res or [resolution.max_px]
    train_loader, val_loader = build_loaders(args, data, runtime, per_device, resolution.min_px, val_res[0])
    out_dir = Path(args.output_dir)  # written to only once the inputs are known to be good
    if args.evaluate and args.resume == "auto":  # evaluation writes no checkpoint: any run's will do
        args.resume = str(out_dir / ckpt.CHECKPOINT) if (out_dir / ckpt.CHECKPOINT).exists() else None
    if args.evaluate and args.resume:
        take_network_from_checkpoint(args, argv)
    config, classes = to_dict(args), val_loader.classes
    device, precision = runtime.device, Precision.resolve(args.apex and args.apex_opt_level != "O0",
                                                          args.amp_dtype, runtime.device)
    if precision.note:
        log(f"train.py: {precision.note}")
    model = build_model(args, len(classes), device, log)
    ema = None
    if args.model_ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.model_ema_decay), use_buffers=True)
    optimizer = build_optimizer(model, optimizer_config(args))
    inputs = DeviceInput(build_augment(args, len(classes)), args.channels_last, runtime.rank)

    start_epoch, skip, best_acc1 = 0, 0, 0.0
    resume, state = ckpt.resolve_resume(args.resume, out_dir, config, classes, overwrite=args.overwrite)
    if not args.evaluate:  # only training moves the running statistics
        steps_per_epoch = min(len(train_loader), args.max_steps or len(train_loader))
        total_steps = args.epochs * steps_per_epoch
        config["bn_momentum"] = bn_momentum_for(args, total_steps, state, log)
        set_bn_momentum(model, config["bn_momentum"])
    out_dir.mkdir(parents=True, exist_ok=True)
    if runtime.is_main:
        write_json_atomic(config, out_dir / "config.json")
        if not args.evaluate:  # the log keeps the epochs the checkpoint holds, no more
            keep_jsonl(out_dir / "metrics.jsonl", lambda r: state is not None and r["epoch"] <= state["epoch"])
    if resume:
        model.load_state_dict(state["model"])
        if args.bn_eps is None and state.get("bn_eps"):  # the eps its weights were trained with (timm's: 1e-5)
            set_bn_eps(model, state["bn_eps"])
        if not args.evaluate:
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            start_epoch, skip = state["epoch"], ckpt.check_position(state, resume, args.batch_size)
            best_acc1 = state.get("best_acc1", 0.0)
            ckpt.set_rng_state(state["rng"])
        log(f"resumed from {resume}: epoch {start_epoch + 1}, batch {skip}"
            + (f" (sample {skip * args.batch_size} of the epoch; saved on {state.get('world_size', '?')} "
               f"process(es), continued on {runtime.world_size})" if skip else ""))

    if args.evaluate:
        if not (resume or args.pretrained):
            raise CheckpointError("--evaluate needs weights: pass --resume CHECKPOINT or --pretrained FILE")
        result = evaluate_only(args, model, val_loader, inputs, precision, runtime, val_res, log)
        if runtime.is_main:
            report = per_class_report(result.pop("confusion"), classes)
            write_json_atomic({**result, "weights": str(resume or args.pretrained), **report}, out_dir / "eval.json")
        distributed.cleanup()
        return result

    eval_model = model  # evaluation runs on the bare model: ranks may see different val batch counts
    if args.compile:
        model = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
    stream = capture_stream(device) if args.cuda_graphs else None  # DDP is built on it, for capture
    model = distributed.wrap_ddp(model, runtime, stream)
    step = TrainStep(model, optimizer, precision, device, label_smoothing=args.label_smoothing, ema=ema,
                     loss_scale=args.loss_scale, cuda_graphs=args.cuda_graphs,
                     compile_mode=args.compile_mode if args.compile else None, graph_stream=stream)
    noted = step.note  # why the step is not captured, one line; it may change mid-run (see StepGraph)
    if noted:
        log(f"train.py: {noted}")
    if state is not None and not args.evaluate:
        step.scaler.load_state_dict(state["scaler"])
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch_size {args.batch_size} is larger than the {train_loader.num_samples} "
                          f"training images per process: lower it")
    schedule = schedule_config(args)
    if start_epoch >= args.epochs:
        log(f"train.py: {out_dir} holds this run, finished ({start_epoch} epochs): nothing to train; a larger "
            f"--epochs continues it, --overwrite starts it afresh")
        distributed.cleanup()
        return {}
    log(f"training {args.arch} on {len(classes)} classes with --loader {args.loader}: {args.epochs} epochs x "
        f"{steps_per_epoch} steps, global batch {args.batch_size} on {runtime.world_size} x {device}, "
        f"{precision.name}, decoding {train_loader.decoding}, output {out_dir}")

    def save_checkpoint(epochs_done: int, next_batch: int, **extra) -> dict:
        """checkpoint.pth (rank 0) at a step boundary: `epochs_done` epochs and `next_batch` batches
        of the next one trained, with the RNG state that continues from exactly there."""
        state = dict(model=eval_model.state_dict(), optimizer=portable_state_dict(optimizer),
                     scaler=step.scaler.state_dict(), ema=ema.state_dict() if ema is not None else None,
                     config=config, classes=classes, bn_eps=get_bn_eps(eval_model), best_acc1=best_acc1,
                     epoch=epochs_done, next_batch=next_batch, rng=ckpt.rng_state(),
                     **ckpt.position(epochs_done, next_batch, steps_per_epoch, args.batch_size, runtime.world_size),
                     **extra)
        if runtime.is_main:
            ckpt.save_atomic(state, out_dir / ckpt.CHECKPOINT)
        return state

    stop, interval = StopRequest(runtime.cpu_group), ckpt.Interval(args.checkpoint_every)
    watchdog = StepWatchdog(60 * args.dist_timeout if runtime.distributed else None, runtime.rank)
    metrics_path = out_dir / "metrics.jsonl"
    tensorboard = ScalarWriter(out_dir) if args.tensorboard and runtime.is_main else None
    timed_images, timed_s = 0, 0.0
    result, warned = {}, False
    for epoch in range(start_epoch, args.epochs):
        epoch_start_s = time.perf_counter()
        res_px = resolution.at(epoch)
        train_loader.set_resolution(res_px)
        train_loader.set_epoch(epoch, skip)  # a mid-epoch resume starts the loader there: nothing skipped is read
        plan = EpochPlan(epoch=epoch + 1, first_step=epoch * steps_per_epoch, steps=steps_per_epoch,
                         lr_at=lambda s: schedule.lr_at(s, args.learning_rate, steps_per_epoch), skip=skip,
                         timing_warmup_steps=min(args.warmup_steps_timing, max(0, steps_per_epoch - skip - 1)),
                         print_freq=args.print_freq, log=log, stop_requested=stop, watchdog=watchdog,
                         on_window=tensorboard.window if tensorboard else None,
                         after_step=lambda n: interval.due() and n < steps_per_epoch and save_checkpoint(epoch, n))
        try:
            stats = train_one_epoch(step, inputs, train_loader, plan, runtime)
        except LoaderFailed as e:
            watchdog.pause()
            if not runtime.is_main:
                raise LoaderError(f"--loader {args.loader} on rank {runtime.rank}: {e}") from None
            save_checkpoint(epoch, e.next_batch)
            raise LoaderError(f"--loader {args.loader}: {e}. Saved {out_dir / ckpt.CHECKPOINT} at that step: run "
                              f"the same command again to continue from there (`python convert/verify.py {data}` "
                              f"names damaged files)") from None
        skip = 0
        if step.note != noted:
            noted = step.note
            log(f"train.py: {noted}")
        if stats["first_batch_s"] is not None and epoch == start_epoch:
            log(f"first batch after {stats['first_batch_s']:.1f}s (loader start-up / JIT; not in img/s)")
        if stats["interrupted"] and stats["next_batch"] < steps_per_epoch:  # else: the epoch ends first
            return stopped(stop, save_checkpoint, epoch, stats["next_batch"], out_dir, log)
        if not all(torch.isfinite(p).all() for p in eval_model.parameters()):
            raise TrainingDiverged("train.py: the weights are no longer finite: stopping; the last good "
                                   "checkpoint is untouched")
        val = evaluate(eval_model, val_loader, inputs, precision, runtime, flip=args.eval_flip)
        record = {"epoch": epoch + 1, **{k: stats[k] for k in ("train_loss", "imgs_per_s", "data_wait_frac",
                                                                 "skipped_steps", "nonfinite_steps", "steps")},
                  **val, "lr": current_lr(optimizer), "epoch_wall_s": time.perf_counter() - epoch_start_s,
                  "bad_samples": len(getattr(train_loader, "bad_samples", [])), "res_px": res_px,
                  "host_decoded": getattr(train_loader, "host_decoded", 0),
                  "val_res_px": val_res[0]}
        if ema is not None:
            record["ema_acc1"] = evaluate(ema.module, val_loader, inputs, precision, runtime,
                                          flip=args.eval_flip)["acc1"]
        timed_images += stats["timed_images"]
        timed_s += stats["timed_wall_s"] if stats["timed_images"] else 0.0
        is_best = val["acc1"] >= best_acc1
        best_acc1 = max(best_acc1, val["acc1"])
        log(f"epoch {epoch + 1}/{args.epochs}  train-loss {stats['train_loss']:.4f}  Acc@1 {val['acc1']:.2f}  "
            f"Acc@5 {val['acc5']:.2f}  img/s {stats['imgs_per_s']:.1f}  "
            f"data-wait {100 * stats['data_wait_frac']:.0f}%  {res_px} px  ({record['epoch_wall_s']:.0f}s)")
        if runtime.is_main:
            append_jsonl(record, metrics_path)
            history = read_jsonl(metrics_path)
            plot_history(history, out_dir / "history.png")
            note = None if warned else chance_note(history, len(classes), config["bn_momentum"], total_steps)
            if note:
                log(note)
                warned = True
            if tensorboard:
                tensorboard.epoch(record)
            state = save_checkpoint(epoch + 1, 0, acc1=val["acc1"], acc5=val["acc5"])
            if is_best:
                ckpt.save_atomic(state, out_dir / ckpt.BEST)
        interval.restart()
        result = {"acc1": val["acc1"], "acc5": val["acc5"]}
        if stats["interrupted"] and epoch + 1 < args.epochs:
            return stopped(stop, None, epoch + 1, 0, out_dir, log)

    fps = timed_images / timed_s if timed_s > 0 else float("nan")
    if runtime.is_main and result:
        write_json_atomic({**result, "best_acc1": best_acc1, "imgs_per_s": fps, "epochs": args.epochs,
                           "world_size": runtime.world_size, "loader": args.loader, "arch": args.arch,
                           "precision": precision.name, "global_batch": args.batch_size,
                           "cuda_graphs": step.graph is not None,
                           "hardware": hardware(device)}, out_dir / "summary.json")
        log(f"Acc@1 {result['acc1']:.3f}  Acc@5 {result['acc5']:.3f}  FPS {fps:.1f}")
    if tensorboard:
        tensorboard.close()
    distributed.cleanup()
    return {**result, "imgs_per_s": fps}


def stopped(stop: StopRequest, save_checkpoint, epochs_done: int, next_batch: int, out_dir: Path, log):
    """Every rank at the same step boundary: one checkpoint there (save_checkpoint None: the epoch
    end's is written), one line; main returns EXIT_INTERRUPTED, the command's exit status."""
    if save_checkpoint is not None:
        save_checkpoint(epochs_done, next_batch)
    distributed.barrier()  # no rank leaves (torchrun would take it for a failure) before it is written
    log(f"{stop.signal_name}: saved {out_dir / ckpt.CHECKPOINT} at epoch {epochs_done + 1} batch {next_batch}; "
        f"run the same command again to continue (exit status {EXIT_INTERRUPTED}: interrupted, resumable)")
    distributed.cleanup()
    return ExitStatus(EXIT_INTERRUPTED)


if __name__ == "__main__":
    run_command(main)
