"""One entry point for torchrun and plain python, CUDA and CPU: a single process is a world of one.

The device comes from LOCAL_RANK (the GPU index on this node), never from the global rank, so the
same code is right on one node and on many. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import UserError


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its global rank, the world size, its node-local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Initialises the process group when launched by torchrun, and picks this process's device.

    Args:
        device: "auto" (CUDA when available), "cuda" or "cpu".
        timeout_minutes: how long collectives wait before failing (a dead rank must not hang forever).
    Raises:
        UserError: "cuda" asked for without a GPU, or a LOCAL_RANK beyond this node's GPUs.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                             "launch at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if use_cuda else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Waits for every rank (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over ranks (a new tensor; the input is unchanged)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def default_num_workers() -> int:
    """Data-loading workers per process when --num-workers is not given: the CPU cores this process may
    use, shared among the processes of the node, one left to the training process itself, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(8, per_process - 1))



def create_logger(env: DistEnv, log_dir: str | os.PathLike | None = None, name: str = "tinyfusion") -> logging.Logger:
    """A logger that writes on rank 0 only (to stdout and log_dir/log.txt); other ranks log warnings."""
    logger = logging.getLogger(f"{name}.rank{env.rank}")
    logger.handlers.clear()
    logger.propagate = False
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    if env.is_main:
        logger.setLevel(logging.INFO)
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(Path(log_dir) / "log.txt")
            file_handler.setFormatter(formatter)
            logger.addHandler(file_handler)
    else:
        logger.setLevel(logging.WARNING)
    return logger
