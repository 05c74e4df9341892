"""Per-forward state of a reducer: sizes, sources and the position in the schedule."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .schedule import CountRule, ResolvedSchedule, RSpec, resolve_schedule

__all__ = ["ReductionState"]


@dataclasses.dataclass
class ReductionState:
    """Everything one forward pass accumulates. Create one per forward pass.

    Keeping it in one object (never on the model or in globals) means two models,
    two threads or a re-entrant call each have their own, and nothing leaks from
    one forward into the next.

    The r schedule is resolved lazily, from the first token count the state sees
    (:meth:`resolve`), because a :class:`~turbo_core.Ratio` or a
    :class:`~turbo_core.Target` depends on it.

    Attributes:
        num_blocks: blocks that reduce in this forward pass.
        rule: the adapter's :class:`~turbo_core.CountRule` for the final count, if any.
        schedule: tokens each block removes (``resolved.r``); None until resolved.
        resolved: the full :class:`~turbo_core.ResolvedSchedule`; None until resolved.
        size: ``(B, N, 1)`` float32, original tokens each current token stands for;
            ``None`` until the first merge (all ones).
        source: ``(B, N_original)`` int64, current slot of every original token;
            ``None`` unless source tracking is on.
        block_index: blocks that have called :meth:`TokenReducer.step` so far.
        token_counts: sequence length after each step, for inspection.
        r_applied: tokens actually removed in each step (after clipping).
        padded: whether the sequence has padding (size-0 tokens) that must stay apart.
        extras: scratch space for an adapter within one forward pass (e.g. the
            attention sub-layer hands its metric to the block that merges).
    """

    num_blocks: int
    rule: CountRule | None = None
    schedule: tuple[int, ...] | None = None
    resolved: ResolvedSchedule | None = None
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    block_index: int = 0
    token_counts: list[int] = dataclasses.field(default_factory=list)
    r_applied: list[int] = dataclasses.field(default_factory=list)
    padded: bool = False
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def token_mask(self) -> torch.Tensor | None:
        """``(B, N)`` bool, True for real tokens; None when there is no padding."""
        if not self.padded or self.size is None:
            return None
        return self.size[..., 0] > 0

    def resolve(
        self, r: RSpec, num_tokens: int, *, protected: int, min_tokens: int = 0
    ) -> ResolvedSchedule:
        """Resolve the schedule for ``num_tokens`` tokens entering the first block.

        Idempotent: once resolved, later calls return the same schedule whatever
        their arguments (the sequence has shrunk by then, that is expected). Silent:
        a clip is in ``resolved.clipped``; :meth:`TokenReducer.resolve` warns about it.
        """
        if self.resolved is None:
            self.resolved = resolve_schedule(
                r,
                num_tokens,
                self.num_blocks,
                protected=protected,
                min_tokens=min_tokens,
                rule=self.rule,
                warn=False,
            )
            self.schedule = self.resolved.r
        return self.resolved

    def r_for_current_block(self) -> int:
        """Resolved r of the block about to run (0 past the end of the schedule)."""
        if self.schedule is None:
            raise RuntimeError(
                "the r schedule is not resolved yet: it depends on the token count; call "
                "TokenReducer.resolve(state, num_tokens) (step and r_now do it themselves)"
            )
        if self.block_index < len(self.schedule):
            return self.schedule[self.block_index]
        return 0

    def sizes_for(self, x: torch.Tensor) -> torch.Tensor:
        """Current sizes, materialised as ones when nothing has merged yet."""
        if self.size is not None:
            return self.size
        return torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
