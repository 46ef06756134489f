"""Train MobileNetV3 with a pluggable input pipeline; the same command on 1 CPU or N devices.

    python train.py --config configs/sample_cpu.yaml                  # the built-in sample dataset
    python train.py --loader ffcv --data ImageNet/ --arch mobilenetv3_large_100
    torchrun --nproc_per_node=8 train.py --config configs/mobilenetv3_large_8p.yaml --data ImageNet/

Writes to --output-dir: checkpoint.pth (every epoch, atomic), model_best.pth, metrics.jsonl (one
line per epoch), summary.json, history.png and config.json; ends with `Acc@1 X  Acc@5 Y  FPS Z`.
A stop (SIGTERM, SIGUSR1) at any point ends the run at a checkpoint that holds every step trained,
exit status 75: the same command continues it.
"""
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from core.errors import CheckpointError, ConfigError, ExitStatus, LoaderError, TrainingDiverged, run_command
from engine import checkpoint as ckpt
from engine import distributed
from engine.build import (build_augment, build_loaders, build_model, check_data, prepare_data,
                          take_network_from_checkpoint)
from engine.config import optimizer_config, parse_config, resolution_schedule, schedule_config, to_dict
from engine.distributed import Runtime
from engine.faults import LoaderFailed
from engine.loop import EpochPlan, evaluate, same_buffers, train_one_epoch
from engine.metrics import hardware, keep_jsonl, per_class_report, write_json_atomic
from engine.optim import build_optimizer, current_lr, portable_state_dict
from engine.precision import Precision
from engine.records import EpochRecords
from engine.step import DeviceInput, TrainStep, capture_stream
from engine.stop import EXIT_INTERRUPTED, StepWatchdog, StopRequest
from model.mobilenetv3 import BN_MOMENTUM, auto_bn_momentum, get_bn_eps, set_bn_eps, set_bn_momentum


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


def main(argv=None):
    """The story of a run. Each epoch: its steps, its checkpoint, then evaluation and its records;
    a stop (SIGTERM, SIGUSR1) leaves any phase at a checkpoint with EXIT_INTERRUPTED (train_epochs)."""
    args = parse_config(argv)
    run = prepare(args, argv)  # device and process group, data, loaders, network, optimizer
    resume(run)  # a checkpoint's weights, position and each rank's generator states
    if args.evaluate:
        return evaluate_weights(run)
    if not start_training(run):  # the output folder holds this run, finished
        close(run)
        return {}
    left = train_epochs(run)  # each epoch: steps, its checkpoint, evaluation, records; or a stop

    return left if left is not None else finish(run)


@dataclass
class Run:
    """One run's state: built by `prepare`, carried through the phases below."""
    args: Namespace
    runtime: Runtime
    log: Callable[[str], None]
    data: Path
    out_dir: Path
    config: dict
    classes: list
    resolution: object  # engine.resolution.ResolutionSchedule: the train resolution of each epoch
    val_res: list[int]
    train_loader: object
    val_loader: object
    precision: Precision
    model: torch.nn.Module  # the bare network: evaluation (ranks may see different val batch counts), checkpoints
    ema: object
    optimizer: torch.optim.Optimizer
    inputs: DeviceInput
    watchdog: StepWatchdog
    resumed: Path | None = None
    state: dict | None = None  # the checkpoint resumed from, until the step has taken its scaler state
    start_epoch: int = 0
    skip: int = 0  # batches of start_epoch trained before the checkpoint
    pending: dict | None = None  # the record of an epoch saved whose evaluation a stop interrupted
    best_acc1: float = 0.0
    steps_per_epoch: int = 0
    step: TrainStep | None = None
    noted: str | None = None  # why the step is not captured, as last logged (it may change mid-run)
    stop: StopRequest | None = None
    records: EpochRecords | None = None
    timed_images: int = 0
    timed_s: float = 0.0
    result: dict = field(default_factory=dict)


def prepare(args, argv) -> Run:
    runtime = distributed.setup(args.device, args.device_id, deterministic=args.deterministic,
                                cuda_graphs=args.cuda_graphs, timeout_min=args.dist_timeout)
    log = (lambda msg: print(msg, flush=True)) if runtime.is_main else (lambda msg: None)
    if args.batch_size % runtime.world_size:
        fits = args.batch_size // runtime.world_size * runtime.world_size
        raise ConfigError(f"--batch_size {args.batch_size} is the global batch and must divide by the "
                          f"{runtime.world_size} processes: use e.g. {fits}")
    torch.manual_seed(args.seed)  # the initial weights: the same on every rank
    data = prepare_data(args, runtime)
    check_data(args, data, log)
    resolution = resolution_schedule(args)
    val_res = args.val_res or [resolution.max_px]
    train_loader, val_loader = build_loaders(args, data, runtime, args.batch_size // runtime.world_size,
                                             resolution.min_px, val_res[0])
    out_dir = Path(args.output_dir)  # written to only once the inputs are known to be good
    if args.evaluate and args.resume == "auto":  # evaluation writes no checkpoint: any run's will do
        args.resume = str(out_dir / ckpt.CHECKPOINT) if (out_dir / ckpt.CHECKPOINT).exists() else None
    if args.evaluate and args.resume:
        take_network_from_checkpoint(args, argv)
    precision = Precision.resolve(args.apex and args.apex_opt_level != "O0", args.amp_dtype, runtime.device)
    if precision.note:
        log(f"train.py: {precision.note}")
    classes = val_loader.classes
    model = build_model(args, len(classes), runtime.device, log)
    ema = None
    if args.model_ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.model_ema_decay), use_buffers=True)
    ckpt.seed_rank(args.seed, runtime.rank)  # from here each rank draws its own (dropout masks)
    watchdog = StepWatchdog(60 * args.dist_timeout if runtime.distributed else None, runtime.rank)
    watchdog.phase("start-up (resume, DDP's first broadcast)", long=True)
    return Run(args, runtime, log, data, out_dir, to_dict(args), classes, resolution, val_res, train_loader,
               val_loader, precision, model, ema, build_optimizer(model, optimizer_config(args)),
               DeviceInput(build_augment(args, len(classes)), args.channels_last, runtime.rank), watchdog)


def resume(run: Run):
    """The checkpoint to continue from (--resume; auto: OUTPUT_DIR's), taken into the run; the
    output folder made, config.json written, metrics.jsonl cut back to the epochs it holds evaluated."""
    args = run.args
    run.resumed, state = ckpt.resolve_resume(args.resume, run.out_dir, run.config, run.classes,
                                             overwrite=args.overwrite)
    if not args.evaluate:  # only training moves the running statistics
        run.steps_per_epoch = min(len(run.train_loader), args.max_steps or len(run.train_loader))
        run.config["bn_momentum"] = bn_momentum_for(args, args.epochs * run.steps_per_epoch, state, run.log)
        set_bn_momentum(run.model, run.config["bn_momentum"])
        run.pending = state.get("pending") if state else None
    run.out_dir.mkdir(parents=True, exist_ok=True)
    if run.runtime.is_main:
        write_json_atomic(run.config, run.out_dir / "config.json")
        if not args.evaluate:
            evaluated = state["epoch"] - (run.pending is not None) if state else 0
            keep_jsonl(run.out_dir / "metrics.jsonl", lambda r: r["epoch"] <= evaluated)
    if run.resumed:
        take_checkpoint(run, state)
    run.state = state


def take_checkpoint(run: Run, state: dict):
    args, model = run.args, run.model
    model.load_state_dict(state["model"])
    if args.bn_eps is None and state.get("bn_eps"):  # the eps its weights were trained with (timm's: 1e-5)
        set_bn_eps(model, state["bn_eps"])
    if not args.evaluate:
        run.optimizer.load_state_dict(state["optimizer"])
        if run.ema is not None and state.get("ema"):
            run.ema.load_state_dict(state["ema"])
        run.start_epoch, run.skip = state["epoch"], ckpt.check_position(state, run.resumed, args.batch_size)
        run.best_acc1 = state.get("best_acc1", 0.0)
        global_step = state.get("global_step", run.start_epoch * run.steps_per_epoch + run.skip)
        ckpt.restore_rng_state(state["rng"], run.runtime, args.seed, global_step, run.log)
    run.log(f"resumed from {run.resumed}: epoch {run.start_epoch + 1}, batch {run.skip}"
            + (f" (sample {run.skip * args.batch_size} of the epoch; saved on {state.get('world_size', '?')} "
               f"process(es), continued on {run.runtime.world_size})" if run.skip else "")
            + (f"; epoch {run.start_epoch}'s evaluation first (a stop interrupted it)" if run.pending else ""))


def evaluate_weights(run: Run) -> dict:
    """--evaluate: the checkpoint's or --pretrained weights, one Acc@1 line per val resolution;
    eval.json holds the first's result, its confusion report, the others under "by_resolution"."""
    args = run.args
    if not (run.resumed or args.pretrained):
        raise CheckpointError("--evaluate needs weights: pass --resume CHECKPOINT or --pretrained FILE")
    results = []
    for px in run.val_res:
        run.val_loader.set_resolution(px)
        result = evaluate(run.model, run.val_loader, run.inputs, run.precision, run.runtime,
                          num_classes=len(run.classes), flip=args.eval_flip, watchdog=run.watchdog)
        run.log(f"Acc@1 {result['acc1']:.3f}  Acc@5 {result['acc5']:.3f}  ({result['val_images']} images at {px} px"
                f"{', with flips' if args.eval_flip else ''})")
        results.append({"val_res": px, "eval_flip": args.eval_flip, **result})
    result = {**results[0], "by_resolution": [{k: v for k, v in r.items() if k != "confusion"} for r in results]}
    if run.runtime.is_main:
        report = per_class_report(result.pop("confusion"), run.classes)
        write_json_atomic({**result, "weights": str(run.resumed or args.pretrained), **report},
                          run.out_dir / "eval.json")
    close(run)
    return result


def start_training(run: Run) -> bool:
    """The step (compiled, wrapped in DDP, captured where asked), the stop and the records. False:
    the output folder holds this run, finished."""
    args, runtime, log = run.args, run.runtime, run.log
    model = torch.compile(run.model, mode=None if args.compile_mode == "default" else args.compile_mode) \
        if args.compile else run.model
    stream = capture_stream(runtime.device) if args.cuda_graphs else None  # DDP is built on it, for capture
    run.step = TrainStep(distributed.wrap_ddp(model, runtime, stream), run.optimizer, run.precision, runtime.device,
                         label_smoothing=args.label_smoothing, ema=run.ema, loss_scale=args.loss_scale,
                         cuda_graphs=args.cuda_graphs, compile_mode=args.compile_mode if args.compile else None,
                         graph_stream=stream)
    run.noted = run.step.note
    if run.noted:
        log(f"train.py: {run.noted}")
    if run.state is not None:
        run.step.scaler.load_state_dict(run.state["scaler"])
    run.state = None
    if run.steps_per_epoch < 1:
        raise ConfigError(f"--batch_size {args.batch_size} is larger than the {run.train_loader.num_samples} "
                          f"training images per process: lower it")
    if run.start_epoch >= args.epochs and run.pending is None:
        log(f"train.py: {run.out_dir} holds this run, finished ({run.start_epoch} epochs): nothing to train; a "
            f"larger --epochs continues it, --overwrite starts it afresh")
        return False
    run.stop = StopRequest(runtime.cpu_group, interval=ckpt.Interval(args.checkpoint_every))
    run.records = EpochRecords(run.out_dir, runtime.is_main, args.tensorboard, log, len(run.classes),
                               run.config["bn_momentum"], args.epochs * run.steps_per_epoch)
    log(f"training {args.arch} on {len(run.classes)} classes with --loader {args.loader}: {args.epochs} epochs x "
        f"{run.steps_per_epoch} steps, global batch {args.batch_size} on {runtime.world_size} x {runtime.device}, "
        f"{run.precision.name}, decoding {run.train_loader.decoding}, output {run.out_dir}")
    return True


def train_epochs(run: Run) -> ExitStatus | None:
    """The epochs, in the order that lets a stop at any point lose no trained step: an epoch's
    checkpoint is written before its evaluation, and a stop agreed by then is honoured there;
    one during evaluation leaves at that checkpoint, whose evaluation a resume runs first."""
    if run.pending is not None and (left := evaluate_epoch(run, run.start_epoch - 1, run.pending)) is not None:
        return left
    for epoch in range(run.start_epoch, run.args.epochs):
        stats = train_epoch(run, epoch)
        if stats["interrupted"] and stats["next_batch"] < run.steps_per_epoch:
            return leave(run, epoch, stats["next_batch"], write=True)
        record = epoch_trained(run, epoch, stats)
        save(run, epoch + 1, 0, pending=record)  # before evaluation: a stop from here on loses nothing
        if stats["interrupted"] or stop_agreed(run):  # agreed on the last steps, or during the checkpoint
            return leave(run, epoch + 1, 0, pending=True)
        if (left := evaluate_epoch(run, epoch, record)) is not None:
            return left
        if epoch + 1 < run.args.epochs and stop_agreed(run):  # during the records, before the next loader starts
            return leave(run, epoch + 1, 0)
    return None


def train_epoch(run: Run, epoch: int) -> dict:
    """One epoch's steps from run.skip; a mid-epoch checkpoint when --checkpoint-every says so (at
    the same step on every rank); a failing loader leaves one at its step and ends the run."""
    args, steps, start_s = run.args, run.steps_per_epoch, time.perf_counter()
    res_px = run.resolution.at(epoch)
    run.train_loader.set_resolution(res_px)
    run.train_loader.set_epoch(epoch, run.skip)  # a mid-epoch resume starts the loader there: nothing skipped is read
    run.watchdog.phase(f"epoch {epoch + 1}'s first step (the loader's start-up)", long=True)
    schedule = schedule_config(args)

    def after_step(next_batch: int) -> bool:
        if not (run.stop.save_due and next_batch < steps):  # the epoch's last step: its own checkpoint follows
            return False
        save(run, epoch, next_batch)
        return True
    plan = EpochPlan(epoch=epoch + 1, first_step=epoch * steps, steps=steps, skip=run.skip,
                     lr_at=lambda s: schedule.lr_at(s, args.learning_rate, steps),
                     timing_warmup_steps=min(args.warmup_steps_timing, max(0, steps - run.skip - 1)),
                     print_freq=args.print_freq, log=run.log, stop_requested=run.stop, watchdog=run.watchdog,
                     on_window=run.records.window, after_step=after_step)
    try:
        stats = train_one_epoch(run.step, run.inputs, run.train_loader, plan, run.runtime)
    except LoaderFailed as e:
        raise loader_failed(run, epoch, e) from None
    if run.step.note != run.noted:
        run.noted = run.step.note
        run.log(f"train.py: {run.noted}")
    if stats["first_batch_s"] is not None and epoch == run.start_epoch:
        run.log(f"first batch after {stats['first_batch_s']:.1f}s (loader start-up / JIT; not in img/s)")
    run.skip = 0
    return {**stats, "res_px": res_px, "wall_s": time.perf_counter() - start_s}


def loader_failed(run: Run, epoch: int, e: LoaderFailed) -> LoaderError:
    """The error that ends the run; rank 0 first saves the checkpoint at the failed step (alone:
    the other ranks wait in a step, so with only its own generator state)."""
    if not run.runtime.is_main:
        return LoaderError(f"--loader {run.args.loader} on rank {run.runtime.rank}: {e}")
    save(run, epoch, e.next_batch, everyone=False)
    return LoaderError(f"--loader {run.args.loader}: {e}. Saved {run.out_dir / ckpt.CHECKPOINT} at that step: run "
                       f"the same command again to continue from there (`python convert/verify.py {run.data}` "
                       f"names damaged files)")


def epoch_trained(run: Run, epoch: int, stats: dict) -> dict:
    """The epoch's record as far as training goes (evaluation adds its part), once the weights are
    known to be finite (a diverged run keeps its last good checkpoint) and every rank holds the
    buffers the checkpoint will."""
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise TrainingDiverged("train.py: the weights are no longer finite: stopping; the last good "
                               "checkpoint is untouched")
    run.watchdog.phase(f"epoch {epoch + 1}'s end (rank 0's buffers to every rank)")
    same_buffers(run.model, *([run.ema] if run.ema is not None else []))
    run.timed_images += stats["timed_images"]
    run.timed_s += stats["timed_wall_s"] if stats["timed_images"] else 0.0
    return {"epoch": epoch + 1, **{k: stats[k] for k in ("train_loss", "imgs_per_s", "data_wait_frac",
                                                          "skipped_steps", "nonfinite_steps", "steps")},
            "lr": current_lr(run.optimizer), "epoch_wall_s": stats["wall_s"],
            "bad_samples": len(getattr(run.train_loader, "bad_samples", [])), "res_px": stats["res_px"],
            "host_decoded": getattr(run.train_loader, "host_decoded", 0), "val_res_px": run.val_res[0]}


def evaluate_epoch(run: Run, epoch: int, record: dict) -> ExitStatus | None:
    """A trained, saved epoch: evaluation (and the EMA weights'), then its records, then its
    checkpoint again with the accuracy (model_best.pth too when it is the best)."""
    args, start_s = run.args, time.perf_counter()
    for prefix, model in [("", run.model)] + ([("EMA ", run.ema.module)] if run.ema is not None else []):
        val = evaluate(model, run.val_loader, run.inputs, run.precision, run.runtime, flip=args.eval_flip,
                       leave=run.stop.poll, watchdog=run.watchdog, name=f"epoch {epoch + 1}'s {prefix}evaluation")
        if val.get("interrupted"):
            stop_agreed(run)  # every rank learns the signal: a rank that left had it or set the store's key
            return leave(run, epoch + 1, 0, pending=True)
        record = {**record, **({"ema_acc1": val["acc1"]} if prefix else val)}
    record["epoch_wall_s"] += time.perf_counter() - start_s
    is_best, run.best_acc1 = record["acc1"] >= run.best_acc1, max(run.best_acc1, record["acc1"])
    run.log(f"epoch {epoch + 1}/{args.epochs}  train-loss {record['train_loss']:.4f}  Acc@1 {record['acc1']:.2f}  "
            f"Acc@5 {record['acc5']:.2f}  img/s {record['imgs_per_s']:.1f}  "
            f"data-wait {100 * record['data_wait_frac']:.0f}%  {record['res_px']} px  ({record['epoch_wall_s']:.0f}s)")
    run.records.epoch(record)
    state = save(run, epoch + 1, 0, acc1=record["acc1"], acc5=record["acc5"])
    if state is not None and is_best:
        ckpt.save_atomic(state, run.out_dir / ckpt.BEST)
    run.result = {"acc1": record["acc1"], "acc5": record["acc5"]}
    return None


def save(run: Run, epochs_done: int, next_batch: int, everyone: bool = True, **extra) -> dict | None:
    """checkpoint.pth at a step boundary: `epochs_done` epochs and `next_batch` batches of the next
    trained, with every rank's generator states that continue from exactly there. Every rank calls
    it at the same step (the states are gathered; everyone=False: one rank alone); rank 0 writes
    and gets the state back."""
    run.watchdog.phase(f"the checkpoint at epoch {epochs_done + 1} batch {next_batch} (gathering generator states)")
    rng = ckpt.gather_rng_state(run.runtime, everyone)
    run.stop.interval.restart()
    state = None
    if run.runtime.is_main:
        state = dict(model=run.model.state_dict(), optimizer=portable_state_dict(run.optimizer),
                     scaler=run.step.scaler.state_dict(), ema=run.ema.state_dict() if run.ema is not None else None,
                     config=run.config, classes=run.classes, bn_eps=get_bn_eps(run.model), best_acc1=run.best_acc1,
                     epoch=epochs_done, next_batch=next_batch, rng=rng, **extra,
                     **ckpt.position(epochs_done, next_batch, run.steps_per_epoch, run.args.batch_size,
                                     run.runtime.world_size))
        run.watchdog.phase(f"the checkpoint at epoch {epochs_done + 1} batch {next_batch} (writing it)", long=True)
        ckpt.save_atomic(state, run.out_dir / ckpt.CHECKPOINT)
    return state


def stop_agreed(run: Run) -> bool:
    run.watchdog.phase("the stop agreement (waiting for every rank)")
    return run.stop.now()


def leave(run: Run, epochs_done: int, next_batch: int, write: bool = False, pending: bool = False) -> ExitStatus:
    """A stop, every rank at the same point: the checkpoint there (write; else it is written), one
    line; EXIT_INTERRUPTED, the command's exit status."""
    if write:
        save(run, epochs_done, next_batch)
    run.watchdog.phase("the stop (waiting for every rank at the checkpoint)")
    distributed.barrier()  # no rank leaves (torchrun would take it for a failure) before it is written
    run.log(f"{run.stop.signal_name}: saved {run.out_dir / ckpt.CHECKPOINT} at epoch {epochs_done + 1} batch "
            f"{next_batch}{f' (epoch {epochs_done} evaluates when it continues)' if pending else ''}; run the same "
            f"command again to continue (exit status {EXIT_INTERRUPTED}: interrupted, resumable)")
    close(run)
    return ExitStatus(EXIT_INTERRUPTED)


def finish(run: Run) -> dict:
    """summary.json and the last line: Acc@1, Acc@5 and the images per second of the timed steps."""
    fps = run.timed_images / run.timed_s if run.timed_s > 0 else float("nan")
    if run.result:
        run.records.summary({**run.result, "best_acc1": run.best_acc1, "imgs_per_s": fps, "epochs": run.args.epochs,
                             "world_size": run.runtime.world_size, "loader": run.args.loader, "arch": run.args.arch,
                             "precision": run.precision.name, "global_batch": run.args.batch_size,
                             "cuda_graphs": run.step.captured, "hardware": hardware(run.runtime.device)})
        run.log(f"Acc@1 {run.result['acc1']:.3f}  Acc@5 {run.result['acc5']:.3f}  FPS {fps:.1f}")
    close(run)
    return {**run.result, "imgs_per_s": fps}


def close(run: Run):
    if run.records is not None:
        run.records.close()
    run.watchdog.close()
    distributed.cleanup()


if __name__ == "__main__":
    run_command(main)
