"""Device and process-group set-up in one function: torchrun's environment decides.

The same command runs on one CPU, one GPU/NPU, or N of them under torchrun.
"""
import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import ConfigError

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    cpu_group: object = None  # a gloo group for host-side flags (engine/stop.py); the default group on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
    except ImportError:
        return False
    return torch.npu.is_available()


def resolve_kind(requested: str) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "npu" if _npu_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible (check CUDA_VISIBLE_DEVICES / the driver), "
                          "or use --device cpu")
    if requested == "npu" and not _npu_available():
        raise ConfigError("--device npu: torch_npu is not installed or sees no NPU: install Ascend's torch_npu "
                          "matching torch 2.14 (pip install torch-npu) and its CANN toolkit, or use --device cpu")
    return requested


def setup(requested: str = "auto", device_id: int | None = None, deterministic: bool = False,
          cuda_graphs: bool = False, timeout_min: float | None = None) -> Runtime:
    """The device (always with an index on an accelerator) and, under torchrun, the process group.

    deterministic: deterministic algorithms (bitwise repeatable on the CPU); otherwise cudnn picks
    the fastest convolution algorithms for the shapes it sees. cuda_graphs: the step will be
    captured, DDP's all-reduces with it, which PyTorch's CUDA graphs notes say needs NCCL's async
    error handling off before the process group starts. timeout_min: the collectives' timeout
    (--dist-timeout; None: the backend's default, 30 min for gloo, 10 for NCCL)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    kind = resolve_kind(requested)
    if kind == "cpu":
        device = torch.device("cpu")
    else:
        index = local_rank if world_size > 1 else (device_id or 0)
        device = torch.device(kind, index)
        getattr(torch, kind).set_device(device)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif kind == "cuda":
        torch.backends.cudnn.benchmark = True
    cpu_group = None
    if world_size > 1 and not dist.is_initialized():
        if cuda_graphs and kind == "cuda":
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
        timeout = datetime.timedelta(minutes=timeout_min) if timeout_min else None
        dist.init_process_group(BACKENDS[kind], device_id=device if kind != "cpu" else None, timeout=timeout,
                                store=_attempt_store(rank, world_size, timeout), rank=rank, world_size=world_size)
        # NCCL's collectives are the device's: a host flag goes through gloo beside it
        cpu_group = None if kind == "cpu" else dist.new_group(backend="gloo", timeout=timeout)
    return Runtime(device, rank, world_size, local_rank, cpu_group)


def _attempt_store(rank: int, world_size: int, timeout) -> dist.Store:
    """torchrun's store, its keys prefixed by the attempt. torchrun's agents share one store across
    rendezvous rounds: after `--max-restarts` restarts the group, the new ranks would read the
    gloo addresses the dead attempt published under the same keys and fail ('Connection
    refused'). The agents' restart counts differ between nodes (a node whose worker did not fail
    restarts without counting), so the attempt is counted in the store itself: each rank adds 1
    as it starts, and every rank of one attempt gets a count in the same block of world_size
    (one counter per world size: an elastic group that changes size starts a new one)."""
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout or datetime.timedelta(minutes=30)))
    attempt = (store.add(f"train.py/ranks_started/world{world_size}", 1) - 1) // world_size
    return dist.PrefixStore(f"world{world_size}/attempt{attempt}/", store)


def wrap_ddp(model: torch.nn.Module, runtime: Runtime, graph_stream=None) -> torch.nn.Module:
    """DistributedDataParallel around `model` under torchrun (the model itself otherwise). Built on
    `graph_stream` when the step will be captured: PyTorch's recipe for capturing a whole backward
    with DDP's all-reduces in it (engine.step.StepGraph)."""
    if not runtime.distributed:
        return model
    device_ids = [runtime.device.index] if runtime.device.type != "cpu" else None
    with torch.cuda.stream(graph_stream) if graph_stream is not None else contextlib.nullcontext():
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()
