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
        assignment = plan.assignment()
        return y.gather(1, assignment.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
