"""The merge plan: a small value saying which tokens stay and which merge into which."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["MergePlan"]


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """Where every token of a ``(B, N, C)`` sequence goes after one merge.

    The output has ``N - r`` slots. Slot ``k`` is seeded by the input token
    ``kept_idx[:, k]``; each input token ``merged_idx[:, i]`` is merged into slot
    ``merged_into[:, i]``. Every input token appears exactly once in ``kept_idx``
    or ``merged_idx``, so the plan is a partition of the input.

    Attributes:
        kept_idx: ``(B, N - r)`` int64, input index seeding each output slot.
        merged_idx: ``(B, r)`` int64, input index of each merged-away token.
        merged_into: ``(B, r)`` int64, output slot that token merges into.
        num_tokens: ``N``, the input length.
    """

    kept_idx: torch.Tensor
    merged_idx: torch.Tensor
    merged_into: torch.Tensor
    num_tokens: int

    @property
    def r(self) -> int:
        """Number of tokens removed by this plan."""
        return self.merged_idx.shape[-1]

    @property
    def num_out(self) -> int:
        """Length of the merged sequence."""
        return self.kept_idx.shape[-1]

    @property
    def batch_size(self) -> int:
        return self.kept_idx.shape[0]

    def assignment(self) -> torch.Tensor:
        """``(B, N)`` int64: the output slot of every input token."""
        slots = torch.arange(self.num_out, device=self.kept_idx.device)
        out = self.kept_idx.new_empty(self.batch_size, self.num_tokens)
        out.scatter_(1, self.kept_idx, slots.expand_as(self.kept_idx))
        if self.r:
            out.scatter_(1, self.merged_idx, self.merged_into)
        return out

    def slot_sizes(self) -> torch.Tensor:
        """``(B, N - r)`` int64: how many input tokens each output slot holds."""
        ones = torch.ones_like(self.merged_into)
        base = torch.ones_like(self.kept_idx)
        return base.scatter_add(1, self.merged_into, ones) if self.r else base

    @classmethod
    def identity(
        cls, batch_size: int, num_tokens: int, device: torch.device | str | None = None
    ) -> MergePlan:
        """The plan that keeps every token where it is (``r = 0``)."""
        kept = torch.arange(num_tokens, device=device).expand(batch_size, num_tokens)
        empty = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        return cls(kept, empty, empty, num_tokens)
