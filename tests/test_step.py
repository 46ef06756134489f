"""engine/step.py, optim.py, precision.py: the step at the device's speed, tested on the CPU.

    .venv/bin/python -m pytest -q tests/test_step.py

Mixed precision only where it is faster (the device's capabilities faked where this machine has
none), each optimizer kernel choice against the for-loop, the LR held in a device tensor against a
float LR, the graph-safe step body against the step as it was before, and --cuda-graphs falling
back on the CPU with one line and bitwise the same run. CUDA-only tests are skipped here.
"""
import contextlib
import gc
import json
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from core.errors import ConfigError
from engine import precision as precision_module
from engine.config import parse_config
from engine.optim import (OptimizerConfig, build_optimizer, current_lr, hold_lr_on_device, portable_state_dict,
                          resolve_impl, set_lr)
from engine.precision import Precision
from engine.step import DDP_WARMUP_STEPS, WARMUP_STEPS, DeviceInput, TrainStep, capture_stream, graph_blocker, unwrap
from loaders.common import IMAGENET_MEAN, IMAGENET_STD, normalize
from loaders.device_decode import DEVICE_WORK
from model import create_model
from test_train import REPO, ok, records, run_train

CPU = torch.device("cpu")


def cuda_only(test):
    """Skipped without CUDA; `pytest -m cuda` selects these on a GPU (bench/accelerator.sh)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="needs a CUDA device (graph capture)")(test))


IMPLS = [("sgd", "fused"), ("sgd", "foreach"), ("rmsprop", "foreach")]  # each against its for-loop


def batch(n: int = 4, px: int = 32, classes: int = 4, seed: int = 0, device=CPU):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, px, px, generator=g).contiguous(memory_format=torch.channels_last)
    return x.to(device), torch.randint(0, classes, (n,), generator=g).to(device)


def small_model(device=CPU, dropout: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mobilenetv3_small_100", num_classes=4, dropout=dropout).to(
        device, memory_format=torch.channels_last).train()


def lrs(steps: int) -> list[float]:
    return [0.05 * (1 - i / (2 * steps)) for i in range(steps)]  # a changing LR, as a schedule's


def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], bitwise: bool = True):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if bitwise:
            assert torch.equal(x, y), i
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=f"tensor {i}")


# -- mixed precision only where it is faster -------------------------------------------------------
def test_auto_on_a_cpu_without_amx_trains_fp32_and_says_why_in_one_line(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_capabilities", lambda: {"avx512_bf16": True})
    p = Precision.resolve(True, "auto", CPU)
    assert (p.enabled, p.name, p.needs_scaler) == (False, "fp32", False)
    assert "AMX" in p.note and "--amp-dtype bfloat16" in p.note and "\n" not in p.note
    monkeypatch.setattr(precision_module, "cpu_capabilities", lambda: {"amx_bf16": True})
    p = Precision.resolve(True, "auto", CPU)
    assert (p.enabled, p.name, p.note) == (True, "bf16", None)


def test_an_explicit_dtype_is_honoured_where_it_is_slow_with_a_note(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_capabilities", lambda: {})
    p = Precision.resolve(True, "float16", CPU)  # what the scaler tests run on the CPU
    assert (p.enabled, p.name, p.needs_scaler) == (True, "fp16", True)
    assert "slower than fp32" in p.note and "--amp-dtype auto" in p.note
    monkeypatch.setattr(precision_module, "cpu_capabilities", lambda: {"amx_bf16": True})
    assert Precision.resolve(True, "bfloat16", CPU).note is None
    assert Precision.resolve(False, "float16", CPU) == Precision(False) and Precision(False).note is None


@pytest.mark.parametrize("capability,name", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp16"), ((6, 1), "fp32")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, name):
    monkeypatch.setattr(precision_module, "cuda_capability", lambda device: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    p = Precision.resolve(True, "auto", torch.device("cuda", 0))
    assert p.name == name
    assert (p.note is None) == (name != "fp32")
    if name == "fp32":
        assert "compute capability 6.1" in p.note


def test_auto_on_an_npu_is_float16_and_an_unknown_dtype_is_an_error():
    npu = SimpleNamespace(type="npu")  # torch.device("npu") needs torch_npu installed; only the type is read
    assert Precision.resolve(True, "auto", npu).name == "fp16"
    with pytest.raises(ConfigError, match="--amp-dtype half: choose auto, float16, bfloat16"):
        Precision.resolve(True, "half", CPU)


# -- optimizer kernels and the LR in a device tensor ----------------------------------------------
def test_each_optimizer_impl_resolves_per_device_and_an_unknown_one_names_the_choices():
    assert resolve_impl("sgd", "auto", "cpu") == resolve_impl("sgd", "auto", "cuda") == "fused"
    assert resolve_impl("sgd", "auto", "npu") == resolve_impl("rmsprop", "auto", "cuda") == "foreach"
    assert resolve_impl("rmsprop", "for-loop", "cuda") == "for-loop"
    with pytest.raises(ConfigError, match="--optimizer-impl fused: torch has no fused rmsprop: use foreach or auto"):
        resolve_impl("rmsprop", "fused", "cuda")
    with pytest.raises(ConfigError, match="--optimizer-impl fast: choose one of auto, fused, foreach, for-loop"):
        OptimizerConfig(impl="fast")
    assert parse_config(["--optimizer-impl", "for-loop"]).optimizer_impl == "for-loop"
    model = small_model()
    flags = {impl: build_optimizer(model, OptimizerConfig(name="sgd", impl=impl)).param_groups[0]
             for impl in ("auto", "fused", "foreach", "for-loop")}
    assert flags["auto"]["fused"] and flags["fused"]["fused"] and flags["foreach"]["foreach"]
    assert not flags["for-loop"]["foreach"] and not flags["for-loop"]["fused"]


def train_optimizer(name: str, impl: str, steps: int = 4, tensor_lr: bool = False) -> list[torch.Tensor]:
    """`steps` steps of a plain loop (no TrainStep) with optimizer `name` in kernels `impl`."""
    model = small_model(dropout=0.0)
    optimizer = build_optimizer(model, OptimizerConfig(name=name, impl=impl, lr=0.05))
    if tensor_lr:
        hold_lr_on_device(optimizer, CPU)
    for i, lr in enumerate(lrs(steps)):
        x, y = batch(seed=i)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return tensors(model)


@pytest.mark.parametrize("name,impl", IMPLS)
def test_each_optimizer_impl_gives_the_for_loops_parameters(name, impl):
    assert_same(train_optimizer(name, impl), train_optimizer(name, "for-loop"), bitwise=False)


@pytest.mark.parametrize("name,impl", IMPLS + [("sgd", "for-loop"), ("rmsprop", "for-loop")])
def test_the_lr_in_a_device_tensor_gives_the_float_lrs_parameters(name, impl):
    assert_same(train_optimizer(name, impl, tensor_lr=True), train_optimizer(name, impl), bitwise=False)


def test_set_lr_fills_the_tensor_in_place_and_checkpoints_keep_floats():
    model = small_model()
    optimizer = build_optimizer(model, OptimizerConfig(name="rmsprop", lr=0.1))
    hold_lr_on_device(optimizer, CPU)
    held = [group["lr"] for group in optimizer.param_groups]
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in held)
    set_lr(optimizer, 0.25)
    assert [group["lr"] for group in optimizer.param_groups] == held  # the same tensors: what a graph reads
    assert current_lr(optimizer) == 0.25 and all(t.item() == 0.25 for t in held)
    for group in optimizer.param_groups:
        group["capturable"] = True  # as on CUDA
    state = portable_state_dict(optimizer)
    assert all(g["lr"] == 0.25 and g["capturable"] is False for g in state["param_groups"])
    assert optimizer.param_groups[0]["capturable"] is True  # the optimizer itself is untouched


# -- the graph-safe step body against the step as it was -------------------------------------------
class StepBefore:
    """engine.step.TrainStep before the body was made graph-safe, verbatim: the reference."""

    def __init__(self, model, optimizer, precision, device, label_smoothing=0.0, ema=None, loss_scale=2.0 ** 16):
        self.model, self.optimizer, self.precision, self.device = model, optimizer, precision, device
        self.label_smoothing, self.ema = label_smoothing, ema
        self.scaler = torch.amp.GradScaler(device.type, init_scale=loss_scale, enabled=precision.needs_scaler)
        self.skipped = torch.zeros((), device=device, dtype=torch.int64)

    def __call__(self, x, targets, lr=None):
        if lr is not None:
            set_lr(self.optimizer, lr)
        with self.precision.autocast(self.device):
            logits = self.model(x)
            smoothing = self.label_smoothing if targets.dtype == torch.int64 else 0.0
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.skipped += (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).to(torch.int64)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.model))
        return loss.detach()


def run_steps(make_step, precision: Precision, steps: int = 4, opt: str = "sgd", loss_scale: float = 2.0 ** 16,
              **kw) -> dict:
    model = small_model()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = build_optimizer(model, OptimizerConfig(name=opt, impl="for-loop", lr=0.05))
    step = make_step(model, optimizer, precision, CPU, label_smoothing=0.1, ema=ema, loss_scale=loss_scale, **kw)
    torch.manual_seed(1)  # dropout's draws
    losses = [step(*batch(seed=i), lr=lr) for i, lr in enumerate(lrs(steps))]
    return {"model": tensors(model), "ema": tensors(ema), "losses": losses, "skipped": int(step.skipped),
            "scale": step.scaler.get_scale() if step.scaler.is_enabled() else None, "note": getattr(step, "note", None),
            "tensor_lr": isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)}


FP16 = Precision(True, torch.float16)


@pytest.mark.parametrize("precision,loss_scale", [(Precision(False), 2.0 ** 16), (FP16, 2.0 ** 16), (FP16, 1e30)],
                         ids=["fp32", "fp16-scaler", "fp16-every-step-skipped"])
@pytest.mark.parametrize("opt", ["sgd", "rmsprop"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_the_graph_safe_body_gives_the_steps_results_as_before(precision, loss_scale, opt, tensor_lr):
    before = run_steps(StepBefore, precision, opt=opt, loss_scale=loss_scale)
    now = run_steps(TrainStep, precision, opt=opt, loss_scale=loss_scale, tensor_lr=tensor_lr)
    assert_same(now["model"], before["model"])
    assert_same(now["ema"], before["ema"])  # incl. n_averaged, counted on the host
    assert_same(now["losses"], before["losses"])
    assert (now["skipped"], now["scale"]) == (before["skipped"], before["scale"])
    assert now["tensor_lr"] == tensor_lr and not before["tensor_lr"]
    if loss_scale == 1e30:
        assert now["skipped"] == 4


def test_graph_capture_asked_on_the_cpu_says_why_in_one_line_and_changes_nothing():
    graphed = run_steps(TrainStep, Precision(False), cuda_graphs=True)
    eager = run_steps(TrainStep, Precision(False))
    assert graphed["note"] == ("--cuda-graphs: capture needs a CUDA device and this run is on cpu: running the step "
                               "eagerly (the same results as without)")
    assert eager["note"] is None
    assert_same(graphed["model"], eager["model"])
    assert_same(graphed["ema"], eager["ema"])


def test_what_blocks_capture_is_named_with_the_fix():
    cuda = torch.device("cuda", 0)  # only its type is read, before any CUDA call
    model = small_model()

    def blocker(opt, impl, **kw):
        return graph_blocker(model, build_optimizer(model, OptimizerConfig(name=opt, impl=impl)), cuda, **kw)

    assert blocker("sgd", "fused") is None and blocker("rmsprop", "foreach") is None
    assert "--optimizer-impl fused or auto" in blocker("sgd", "foreach")
    assert "--optimizer-impl foreach or auto" in blocker("rmsprop", "for-loop")
    assert "reduce-overhead already captures" in blocker("sgd", "fused", compile_mode="reduce-overhead")
    assert blocker("sgd", "fused", compile_mode="max-autotune-no-cudagraphs") is None
    assert "on cpu" in graph_blocker(model, build_optimizer(model, OptimizerConfig()), CPU)


def test_compile_mode_needs_compile():
    assert parse_config(["--compile", "--compile-mode", "reduce-overhead"]).compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="--compile-mode max-autotune-no-cudagraphs: .* add --compile"):
        parse_config(["--compile-mode", "max-autotune-no-cudagraphs"])


# -- train.py on the CPU --------------------------------------------------------------------------
def _final(out: Path) -> tuple[dict, list[dict]]:
    weights = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    keep = ("epoch", "train_loss", "acc1", "acc5", "val_loss", "lr", "skipped_steps", "nonfinite_steps", "steps")
    return weights, [{k: r[k] for k in keep} for r in records(out)]


def test_train_py_with_cuda_graphs_on_the_cpu_says_so_once_and_trains_bitwise_the_same(tiny_sample, tmp_path):
    args = ["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "2", "--deterministic", "--model-ema",
            "--opt", "rmsprop"]
    plain = ok(run_train(args, tmp_path / "plain"))
    graphed = ok(run_train(args + ["--cuda-graphs"], tmp_path / "graphed"))
    lines = [line for line in graphed.stdout.splitlines() if "--cuda-graphs" in line]
    assert lines == ["train.py: --cuda-graphs: capture needs a CUDA device and this run is on cpu: running the step "
                     "eagerly (the same results as without)"]
    assert "--cuda-graphs" not in plain.stdout
    (w_plain, r_plain), (w_graphed, r_graphed) = _final(tmp_path / "plain"), _final(tmp_path / "graphed")
    assert r_plain == r_graphed
    assert w_plain.keys() == w_graphed.keys()
    for k in w_plain:
        assert torch.equal(w_plain[k], w_graphed[k]), k
    assert json.loads((tmp_path / "graphed" / "summary.json").read_text())["cuda_graphs"] is False


@pytest.mark.skipif(Precision.resolve(True, "auto", CPU).enabled, reason="this CPU has a fast autocast path (AMX)")
def test_train_py_with_apex_on_a_cpu_without_amx_trains_fp32_and_says_so(tiny_sample, tmp_path):
    proc = ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "1", "--max_steps", "1",
                         "--apex"], tmp_path))
    note = Precision.resolve(True, "auto", CPU).note
    assert [line for line in proc.stdout.splitlines() if note in line] == [f"train.py: {note}"]
    assert "fp32" in note and "AMX" in note
    assert json.loads((tmp_path / "summary.json").read_text())["precision"] == "fp32"


def test_train_fps_adds_a_row_per_batch_size_and_leaves_the_graphed_rows_out_on_the_cpu(tiny_sample, tmp_path):
    out = tmp_path / "train_fps.json"
    cmd = [sys.executable, "bench/train_fps.py", "--data", str(tiny_sample), "--loaders", "", "--device", "cpu",
           "--arch", "mobilenetv3_small_050", "--image-size", "32", "--batch-size", "4", "--batch-sizes", "4,8",
           "--steps", "2", "--rounds", "1", "--warmup-steps", "1", "--no-augment", "--cuda-graphs", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_fps: no graphed rows: capture needs a CUDA device and this run is on cpu" in proc.stderr
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]] == ["model only", "model only, batch 8"]
    assert result["best_model_only"]["row"] in ("model only", "model only, batch 8")
    assert result["settings"]["cuda_graphs"] is False and result["targets"] == []  # the graphed target: no row
    bad = subprocess.run(cmd[:2] + ["--compile-modes", "fastest"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "fastest: choose from default,max-autotune-no-cudagraphs,reduce-overhead" in bad.stderr


# -- no host synchronisation in a step ---------------------------------------------------------------
# What a host sync is made of, as the dispatcher sees it on any device: a tensor made from host
# data (torch.tensor(list, device=...): on CUDA a blocking copy from pageable memory) and a value
# read back (.item(), bool(t), float(t)). On the CPU nothing blocks, but the same ops show.
HOST_OPS = ("aten.lift_fresh.default", "aten._local_scalar_dense.default")


class HostOps(TorchDispatchMode):
    """Records each HOST_OPS op: the innermost of our frames that led to it, and whether it came from
    inside torch's optimizer."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_OPS:
            stack = traceback.extract_stack()[:-1]  # without this frame
            ours = [f for f in stack if "site-packages" not in f.filename and f.filename != __file__]
            in_torch_optimizer = any("/torch/optim/" in f.filename for f in stack)
            self.seen.append((str(func), f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?",
                              in_torch_optimizer))
        return func(*args, **(kwargs or {}))


def test_normalize_makes_its_constants_once_per_device_and_dtype():
    """A step's normalisation made its mean and std from Python lists every call: on CUDA two
    blocking host copies per step. Made once per (device, dtype), later calls only compute."""
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    for dtype in (torch.float32, torch.float64):
        normalize(images, dtype)  # the first call per dtype may make them
        with HostOps() as ops:
            out = normalize(images, dtype)
        assert ops.seen == [], ops.seen
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1) * 255
        torch.testing.assert_close(out, (images.to(dtype) - mean) / std)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("opt", ["sgd", "rmsprop"])
def test_a_steady_state_step_makes_no_tensor_from_host_data_and_reads_nothing_back(opt):
    """The trainer's step (DeviceInput + TrainStep, LR in a device tensor as under capture) on the
    CPU: fused SGD issues neither op at all; RMSprop only inside torch's CPU path (its step counter
    is a host tensor off CUDA, where capturable mode keeps it on the device: the CUDA test below)."""
    model = small_model()
    step = TrainStep(model, build_optimizer(model, OptimizerConfig(name=opt)), Precision(False), CPU, tensor_lr=True)
    inputs = DeviceInput()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (4,))
    for i in range(3):
        step(*inputs(images, labels, i), lr=0.01)
    with HostOps() as ops:
        step(*inputs(images, labels, 3), lr=0.01)
    ours = [(op, where) for op, where, in_optimizer in ops.seen if not in_optimizer]
    assert ours == [], ours
    if opt == "sgd":
        assert ops.seen == [], ops.seen


def test_captured_is_false_until_a_graph_is_recorded():
    model = small_model()
    step = TrainStep(model, build_optimizer(model, OptimizerConfig(name="sgd")), Precision(False), CPU,
                     cuda_graphs=True)  # the CPU cannot capture: eager throughout
    for i in range(WARMUP_STEPS + 2):
        step(*batch(seed=i), lr=0.01)
    assert step.note and step.captures == 0 and step.captured is False


# -- CUDA only (every name has "cuda": -k test_cuda_) ------------------------------------------------
def cuda_steps(cuda_graphs: bool, precision: Precision, steps: int = 20, loss_scale: float = 2.0 ** 16,
               opt: str = "rmsprop", ddp: bool = False) -> dict:
    """`steps` steps through TrainStep on CUDA, optimizer `opt` in the kernels train.py picks (auto:
    fused SGD, foreach RMSprop, capturable once the LR is a tensor); ddp: the model in
    DistributedDataParallel, over the process group the caller made."""
    device = torch.device("cuda", 0)
    net = small_model(device, dropout=0.0)  # no random draws: graphed and eager see the same numbers
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = build_optimizer(net, OptimizerConfig(name=opt, lr=0.01))
    stream = capture_stream(device) if cuda_graphs else None  # as train.py makes it
    model = net
    if ddp:  # as engine.distributed.wrap_ddp builds it: on the capture stream when the step is captured
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            model = DistributedDataParallel(net, device_ids=[device.index])
    step = TrainStep(model, optimizer, precision, device, ema=ema, loss_scale=loss_scale, cuda_graphs=cuda_graphs,
                     graph_stream=stream)
    assert step.note is None and (step.graph is not None) == cuda_graphs
    losses = [step(*batch(n=16, px=64, seed=i, device=device), lr=0.01 * (1 - i / 40)) for i in range(steps)]
    return {"losses": torch.stack(losses).float().cpu(), "model": tensors(net), "skipped": int(step.skipped),
            "captures": step.graph.captures if step.graph else 0,
            "warmup_steps": step.graph.warmup_steps if step.graph else None}


def assert_graphed_agrees_with_eager(graphed: dict, eager: dict, precision: Precision):
    # cudnn's backward may sum in another order from run to run: noise, but no drift
    loss_rel = ((graphed["losses"] - eager["losses"]).abs() / eager["losses"].abs()).max().item()
    a, b = (torch.cat([t.float().flatten().cpu() for t in run["model"]]) for run in (graphed, eager))
    weights_rel = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()
    assert loss_rel < (2e-2 if precision.enabled else 1e-3), loss_rel
    assert weights_rel < (1e-2 if precision.enabled else 1e-4), weights_rel


@cuda_only
@pytest.mark.parametrize("opt", ["rmsprop", "sgd"])  # capturable foreach RMSprop; fused SGD
@pytest.mark.parametrize("precision", [Precision(True, torch.bfloat16), Precision(False)], ids=["bf16", "fp32"])
def test_cuda_graphed_and_eager_steps_agree_over_20_steps(precision, opt):
    graphed, eager = cuda_steps(True, precision, opt=opt), cuda_steps(False, precision, opt=opt)
    assert graphed["captures"] == 1 and graphed["warmup_steps"] == WARMUP_STEPS
    assert_graphed_agrees_with_eager(graphed, eager, precision)


@cuda_only
@pytest.mark.parametrize("opt", ["rmsprop", "sgd"])  # fused SGD takes the scaler's overflow flag in its kernel
def test_cuda_graphed_fp16_keeps_the_scaler_counting_skipped_steps(opt):
    graphed = cuda_steps(True, Precision(True, torch.float16), steps=6, loss_scale=1e30, opt=opt)
    assert graphed["skipped"] == 6 and graphed["captures"] == 1
    assert all(torch.isfinite(t).all() for t in graphed["model"])
    graphed, eager = (cuda_steps(graphs, Precision(True, torch.float16), steps=6, opt=opt) for graphs in (True, False))
    assert graphed["skipped"] == eager["skipped"] and torch.isfinite(graphed["losses"]).all()


@cuda_only
def test_cuda_graphed_ddp_in_a_one_process_nccl_group_agrees_with_eager(monkeypatch):
    """DDP under capture, its bucketed all-reduces and buffer broadcasts in the graph. train.py
    makes no process group at world size 1, so this makes one: NCCL, one process, a store in memory."""
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # what distributed.setup sets for capture
    device = torch.device("cuda", 0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    try:
        graphed = cuda_steps(True, Precision(False), ddp=True)
        eager = cuda_steps(False, Precision(False), ddp=True)
    finally:
        gc.collect()  # the graphs (held in a TrainStep <-> StepGraph cycle) go before the communicator
        dist.destroy_process_group()
    assert graphed["captures"] == 1 and graphed["warmup_steps"] == DDP_WARMUP_STEPS
    assert_graphed_agrees_with_eager(graphed, eager, Precision(False))


@cuda_only
@pytest.mark.parametrize("graphs", [True, False], ids=["graphed", "eager"])
@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augment"])
def test_cuda_steady_state_steps_never_synchronise_the_host(graphs, augment):
    """train.py's step as it runs once warm (DeviceInput with or without the recipe's device
    augmentation, TrainStep in bf16 with its RMSprop, the LR set every step) under
    torch.cuda.set_sync_debug_mode("error"): any call that waits for the device raises."""
    device = torch.device("cuda", 0)
    model = small_model(device)
    step = TrainStep(model, build_optimizer(model, OptimizerConfig()), Precision(True, torch.bfloat16), device,
                     cuda_graphs=graphs, tensor_lr=True)
    if augment:
        from augment import DeviceAugment
        inputs = DeviceInput(DeviceAugment(num_classes=4, auto_augment="imagenet", random_erase=0.2, seed=0))
    else:
        inputs = DeviceInput()
    g = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (8, 32, 32, 3), generator=g, dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    labels = torch.randint(0, 4, (8,), generator=g, device=device)
    for i in range(WARMUP_STEPS + 2):  # warm-up, capture, a replay: the steady state from here
        step(*inputs(images, labels, i), lr=0.01)
    assert step.captured == graphs
    losses = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(WARMUP_STEPS + 2, WARMUP_STEPS + 7):
            losses.append(step(*inputs(images, labels, i), lr=0.01 * (1 - i / 20)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(losses)).all()


@cuda_only
def test_cuda_captured_turns_true_at_the_capture():
    device = torch.device("cuda", 0)
    model = small_model(device, dropout=0.0)
    step = TrainStep(model, build_optimizer(model, OptimizerConfig(name="sgd", lr=0.01)), Precision(False), device,
                     cuda_graphs=True)
    seen = []
    for i in range(WARMUP_STEPS + 2):
        step(*batch(n=8, px=32, seed=i, device=device))
        seen.append(step.captured)
    assert seen == [False] * WARMUP_STEPS + [True, True] and step.captures == 1


@cuda_only
def test_cuda_capture_holds_the_device_decode_lock():
    """StepGraph captures holding DEVICE_WORK, the lock each device-decode batch's work holds
    (the decode thread's side is tested on the CPU in test_device_decode.py): the forward sees it
    held in the capture and only there (warm-up steps run eagerly; replays run no Python)."""
    device = torch.device("cuda", 0)
    model, held = small_model(device, dropout=0.0), []
    model.register_forward_pre_hook(lambda module, args: held.append(DEVICE_WORK.locked()))
    step = TrainStep(model, build_optimizer(model, OptimizerConfig(name="sgd", lr=0.01)), Precision(False), device,
                     cuda_graphs=True)
    for i in range(WARMUP_STEPS + 3):
        step(*batch(n=8, px=32, seed=i, device=device))
    assert step.graph.captures == 1 and held == [False] * WARMUP_STEPS + [True]
    assert not DEVICE_WORK.locked()


@cuda_only
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_train_py_under_torchrun_with_cuda_graphs(tiny_sample, tmp_path, dtype):
    proc = ok(run_train(["--data", str(tiny_sample), "--loader", "torchvision", "--epochs", "2", "--device", "cuda",
                         "--apex", "--amp-dtype", dtype, "--cuda-graphs", "--opt", "rmsprop"], tmp_path,
                        torchrun_nproc=1))
    assert "--cuda-graphs" not in proc.stdout  # captured, nothing to say
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cuda_graphs"] is True and summary["precision"] == {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    assert len(records(tmp_path)) == 2 and (tmp_path / "checkpoint.pth").exists()
