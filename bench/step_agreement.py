"""Do the graphed and the eager training step agree? Two copies of the same model, seed and
optimiser train on the same batches for --steps steps, one through TrainStep eagerly, one with
--cuda-graphs; prints the largest relative difference of their losses and plots both curves.

    python bench/step_agreement.py --device cuda --amp-dtype bfloat16 [--steps 200] [--json PATH]

bf16 rounding makes the two drift apart slowly (different kernels, same math); a bug in capture
(a stale input buffer, an LR never updated, gradients not zeroed) makes them part at once. Where
the step cannot be captured (the CPU), the second copy runs eagerly too, says why, and the curves
must be identical. The batches are synthetic (fixed per step, from the seed), so only the step
is compared.
"""
import argparse
import sys

import torch

from bench.harness import add_output_flags, save_result
from core.errors import ConfigError, run_command
from engine.distributed import setup
from engine.optim import OptimizerConfig, ScheduleConfig, build_optimizer
from engine.precision import Precision
from engine.step import DeviceInput, TrainStep
from model import MODEL_NAMES, create_model


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="mobilenetv3_large_100", choices=MODEL_NAMES, help="model")
    p.add_argument("--image-size", type=int, default=224, help="px")
    p.add_argument("--batch-size", type=int, default=256, help="images per step")
    p.add_argument("--steps", type=int, default=200, help="steps compared")
    p.add_argument("--classes", type=int, default=1000, help="classifier outputs")
    p.add_argument("--amp-dtype", default="auto", choices=["auto", "bfloat16", "float16"],
                   help="autocast dtype (auto: the device's fast one, or fp32 where it has none)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("--seed", type=int, default=0, help="weights and batches")
    add_output_flags(p, "step_agreement")
    return p


def losses(args, device, precision: Precision, cuda_graphs: bool) -> tuple[list[float], str | None]:
    torch.manual_seed(args.seed)
    model = create_model(args.arch, num_classes=args.classes).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimizerConfig())
    # tensor_lr on both: the same LR arithmetic, so only capture differs
    step = TrainStep(model, optimizer, precision, device, cuda_graphs=cuda_graphs, tensor_lr=True)
    inputs, schedule = DeviceInput(), ScheduleConfig(epochs=1, warmup_epochs=0.5)
    g = torch.Generator(device).manual_seed(args.seed)  # batches made where they train: no host work
    out = []
    try:
        for i in range(args.steps):
            images = torch.randint(0, 256, (args.batch_size, args.image_size, args.image_size, 3), generator=g,
                                   dtype=torch.uint8, device=device).permute(0, 3, 1, 2)  # channels_last
            labels = torch.randint(0, args.classes, (args.batch_size,), generator=g, device=device)
            out.append(step(*inputs(images, labels, i), lr=schedule.lr_at(i, OptimizerConfig().lr, args.steps)))
    except KeyboardInterrupt:  # a time limit: compare the steps both copies made
        print(f"step_agreement: interrupted after {len(out)} steps", file=sys.stderr)
    return torch.stack(out).float().tolist() if out else [], step.note


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if min(args.steps, args.batch_size, args.image_size, args.classes) < 1:
        raise ConfigError("--steps, --batch-size, --image-size and --classes must be >= 1")
    device = setup(args.device).device
    precision = Precision.resolve(True, args.amp_dtype, device)
    if precision.note:
        print(f"step_agreement: {precision.note}", file=sys.stderr)
    eager, _ = losses(args, device, precision, cuda_graphs=False)
    graphed, note = losses(args, device, precision, cuda_graphs=True) if len(eager) == args.steps else ([], None)
    if note:
        print(f"step_agreement: {note}", file=sys.stderr)
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager, graphed)]
    if not rel:
        raise ConfigError("step_agreement: interrupted before the second copy's first step: nothing to compare")
    worst = max(range(len(rel)), key=rel.__getitem__)
    eager = eager[:len(graphed)]
    result = {"settings": {**vars(args), "precision": precision.name, "device": str(device)},
              "partial": len(graphed) < args.steps,
              "captured": note is None, "note": note, "max_rel_diff": rel[worst], "at_step": worst,
              "final_loss": {"eager": eager[-1], "graphed": graphed[-1]},
              "loss": {"eager": eager, "graphed": graphed}}
    print(f"step_agreement: {args.steps} steps of {args.arch} at {args.image_size} px, batch {args.batch_size}, "
          f"{precision.name} on {device}: {'graphed' if note is None else 'eager (not captured)'} vs eager, "
          f"largest relative loss difference {rel[worst]:.2e} at step {worst + 1}; final loss "
          f"{eager[-1]:.4f} vs {graphed[-1]:.4f}")
    json_path = save_result("step_agreement", args, result)
    png = args.png or json_path.with_suffix(".png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(eager, label="eager")
    ax.plot(graphed, label="graphed" if note is None else "second run (eager: not captured)", linestyle="--")
    ax.set(xlabel="step", ylabel="training loss",
           title=f"{args.arch}, {precision.name}, {device}: max rel diff {rel[worst]:.1e}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {json_path} and {png}")
    return result


if __name__ == "__main__":
    run_command(main)
