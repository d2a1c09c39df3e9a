"""Small helpers over torch.distributed that are no-ops in a single process.

The quantizer uses them to keep its codebook identical on every rank (EMA statistics, k-means init, dead-code
restarts); the trainer uses them for setup and logging.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (and return it)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s value (in place)."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env() -> torch.device:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); return this rank's device.

    NCCL on CUDA, gloo on CPU. Without torchrun this does nothing and returns cuda:0 or cpu.
    """
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    if ws > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_process_first(build: Callable[[], T]) -> T:
    """``build()`` on rank 0 first, then on the other ranks: whatever it caches on disk (a classifier trained for a
    perceptual loss) is made once and read by the others. If rank 0 fails, every rank raises instead of waiting."""
    if not is_distributed():
        return build()
    result, error = None, None
    if is_main_process():
        try:
            result = build()
        except Exception as e:  # re-raised below, after telling the other ranks
            error = e
    if any_flag(error is not None):
        if error is not None:
            raise error
        raise RuntimeError("rank 0 failed while building what the other ranks wait for; see its error above")
    return build() if not is_main_process() else result


def any_flag(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not is_distributed():
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
