"""Device and process-group set-up in one function: torchrun's environment decides.

The same command runs on one CPU, one GPU/NPU, or N of them under torchrun.
"""
import contextlib
import datetime
import os
import secrets
import socket
import time
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
    """A store of this attempt alone, for the process group: rank 0 hosts a fresh TCPStore on a
    free port and publishes its address and a random nonce in torchrun's store; the other ranks
    connect to it. torchrun's agents keep one store across restarts, so its keys still hold what
    the dead attempt wrote (gloo's addresses: a restarted group reading them fails with 'Connection
    refused'), and no count kept there can tell the attempts apart: a rank that dies before it
    adds (an import error, OOM, killed during the restart) leaves every later attempt split over
    two counts, each waiting --dist-timeout. A fresh store has no old keys, and needs no count.

    The address a rank reads may still be the dead attempt's, until rank 0 of this one has
    published: it is taken only when something listens there and the store there holds the
    nonce read with it (a reused port gives another nonce), else read again. The rank 0 that
    wrote it is gone by then: torchrun stops every worker of a group, on every node, before it
    starts the next. Works for any number of nodes and for an elastic group that changes size:
    whoever is rank 0 now publishes; what was there before is refused the same way. The port is
    a free one on rank 0's node, as gloo's and NCCL's own are."""
    timeout = timeout or datetime.timedelta(minutes=30)
    agent_store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    host = os.environ["MASTER_ADDR"]  # rank 0's node, where torchrun hosts its store (env:// required it)
    if rank == 0:
        store = dist.TCPStore(host, 0, None, is_master=True, timeout=timeout, wait_for_workers=False)
        nonce = secrets.token_hex(8)
        store.set(_NONCE_KEY, nonce)
        agent_store.set(_ADDRESS_KEY, f"{store.port} {nonce}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port, nonce = agent_store.get(_ADDRESS_KEY).decode().split()  # waits for the first attempt's rank 0
        store = _connect(host, int(port), nonce, timeout)
        if store is not None:
            return store
        if time.monotonic() > deadline:
            raise dist.DistStoreError(f"rank {rank}: rank 0 published no store for this attempt within "
                                      f"{timeout.total_seconds():.0f} s (--dist-timeout): it failed to start")
        time.sleep(0.1)


_ADDRESS_KEY = "train.py/attempt_store"  # in torchrun's store: "PORT NONCE" of the latest attempt's
_NONCE_KEY = "train.py/nonce"  # in the attempt's store


def _connect(host: str, port: int, nonce: str, timeout) -> dist.Store | None:
    """A client of the store at host:port when it is the one that `nonce` names; None when that
    store is gone (a dead attempt's) or another's."""
    try:  # a plain socket first: TCPStore would retry a closed port for seconds, logging each try
        socket.create_connection((host, port), timeout=5).close()
        store = dist.TCPStore(host, port, None, is_master=False, timeout=datetime.timedelta(seconds=10))
        if store.check([_NONCE_KEY]) and store.get(_NONCE_KEY).decode() == nonce:
            store.set_timeout(timeout)
            return store
    except (OSError, dist.DistError):
        pass
    return None


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
