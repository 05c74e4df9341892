"""Data-parallel evaluation on torch.distributed (``torchrun`` or ``accelerate launch``).

Work is sharded by whole batches: rank k computes batches k, k + W, k + 2W, ...
exactly as a single process would form them, so every item sees the same batch
(and, for text, the same padding) and the gathered result equals the
single-process run. Rank 0 writes the results.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["barrier", "init_from_env", "is_main", "map_batches", "rank", "world_size"]

T = TypeVar("T")


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return True
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def map_batches(
    items: Sequence[Any],
    batch_size: int,
    fn: Callable[[Sequence[Any]], torch.Tensor],
    progress: Callable[[Any, str], Any] | None = None,
    label: str = "",
) -> torch.Tensor:
    """``cat([fn(batch) for batch in batches(items)])``, the batches spread over ranks."""
    starts = list(range(0, len(items), batch_size))
    mine = starts[rank() :: world_size()]
    iterator = progress(mine, label) if progress is not None else mine
    local = [(start, fn(items[start : start + batch_size]).cpu()) for start in iterator]
    if world_size() > 1:
        gathered: list[Any] = [None] * world_size()
        dist.all_gather_object(gathered, local)
        local = [pair for part in gathered for pair in part]
    local.sort(key=lambda pair: pair[0])
    if not local:
        return torch.empty(0)
    return torch.cat([tensor for _, tensor in local])
