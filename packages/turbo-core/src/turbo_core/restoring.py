"""Restorer: bring a merged sequence back to full length and original order."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .plan import MergePlan

__all__ = ["CopyRestorer", "Restorer"]


@runtime_checkable
class Restorer(Protocol):
    """Inverse of a merge, for merge-and-restore (generation)."""

    def restore(self, y: torch.Tensor, plan: MergePlan) -> torch.Tensor: ...


class CopyRestorer:
    """Every input token takes the value of the slot it was merged into."""

    def restore(self, y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
        if y.dim() != 3 or y.shape[1] != plan.num_out:
            raise ValueError(
                f"y must be (B, {plan.num_out}, C) to match the plan, got {tuple(y.shape)}"
            )
        if plan.r == 0:
            return y
        # index_select over the flattened batch copies whole rows: several times faster
        # on the CPU than gather with an index expanded over the channels
        batch, slots, channels = y.shape
        offsets = torch.arange(batch, device=y.device).unsqueeze(1) * slots
        index = (plan.assignment() + offsets).reshape(-1)
        rows = y.reshape(batch * slots, channels).index_select(0, index)
        return rows.view(batch, plan.num_tokens, channels)  # no -1: the batch may be empty
