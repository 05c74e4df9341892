"""Merger: size-weighted averaging of tokens according to a plan."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .plan import MergePlan

__all__ = ["Merger", "SizeWeightedMerger", "merge_sources"]


@runtime_checkable
class Merger(Protocol):
    """Applies a plan to features and sizes."""

    def merge(
        self, x: torch.Tensor, plan: MergePlan, size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def _flat_index(idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``(B, K)`` per-sequence row indices -> ``(B * K,)`` indices into the flattened batch."""
    offsets = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * num_rows
    return (idx + offsets).reshape(-1)


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b, k]]`` for a ``(B, N, C)`` tensor and ``(B, K)`` indices.

    ``index_select`` on the flattened batch copies whole rows; on the CPU it is
    several times faster than ``gather`` with an expanded index.
    """
    batch, num_rows, channels = t.shape
    flat = t.reshape(batch * num_rows, channels).index_select(0, _flat_index(idx, num_rows))
    return flat.view(batch, idx.shape[1], channels)


def _add_rows_(base: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Add ``rows[b, k]`` to row ``idx[b, k]`` of ``base`` in place (duplicates sum).

    Only for tensors this module just created (fresh ``index_select`` results).
    """
    batch, num_rows, channels = base.shape
    base.view(batch * num_rows, channels).index_add_(
        0, _flat_index(idx, num_rows), rows.reshape(-1, channels)
    )
    return base


class SizeWeightedMerger:
    """``x_slot = sum(size * x) / sum(size)``; sizes add.

    Written as ``x_dst + sum_i (s_i / S) (x_i - x_dst)``: the same average, but a
    slot that receives nothing is copied bit for bit, and merging identical tokens
    returns that token exactly. Only the ``r`` merged rows are touched arithmetically.
    """

    def merge(
        self, x: torch.Tensor, plan: MergePlan, size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if plan.r == 0:
            return x, size
        if size is None:
            size = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
        into = plan.merged_into
        kept = _rows(x, plan.kept_idx)  # (B, N - r, C)
        kept_size = _rows(size, plan.kept_idx)  # (B, N - r, 1)
        merged = _rows(x, plan.merged_idx)  # (B, r, C)
        merged_size = _rows(size, plan.merged_idx)  # (B, r, 1)
        new_size = _add_rows_(kept_size, into, merged_size)
        # clamp: padding has size 0, and padding merged into padding stays size 0
        total = _rows(new_size, into).clamp_min(torch.finfo(new_size.dtype).tiny)
        # float32 sizes, but a float64 model gets float64 weights (no rounding to 1e-7)
        wide = torch.promote_types(x.dtype, new_size.dtype)
        weight = (merged_size.to(wide) / total.to(wide)).to(x.dtype)
        delta = (merged - _rows(kept, into)) * weight  # (B, r, C)
        return _add_rows_(kept, into, delta), new_size


def merge_sources(source: torch.Tensor | None, plan: MergePlan) -> torch.Tensor:
    """Compose source tracking: ``(B, N_original)`` current slot of every original token."""
    assignment = plan.assignment()
    if source is None:
        return assignment
    return assignment.gather(1, source)
