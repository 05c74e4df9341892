"""Matcher: bipartite soft matching from scores to an explicit :class:`MergePlan`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .plan import MergePlan
from .schedule import max_removable
from .scoring import TokenScores

__all__ = ["BipartiteMatcher", "Matcher", "max_mergeable"]


def max_mergeable(num_tokens: int, protected: int) -> int:
    """The largest r one bipartite step allows (:func:`~turbo_core.max_removable` without
    a minimum-token threshold); kept for existing callers."""
    return max_removable(num_tokens, protected, 0)


@runtime_checkable
class Matcher(Protocol):
    """Turns scores into a plan removing (up to) ``r`` tokens."""

    def match(self, scores: TokenScores, r: int) -> MergePlan: ...


class BipartiteMatcher:
    """Merge the ``r`` A tokens of highest degree into their most similar B token.

    Output order: the protected tokens in their original order, then the A tokens
    that stay (by position), then the unprotected B tokens (by position). ``r`` is
    clipped by :func:`~turbo_core.max_removable` (a guard: the reducer already clipped
    it); ties in degree go to the earlier token.
    """

    def match(self, scores: TokenScores, r: int) -> MergePlan:
        degree, partner = scores.degree, scores.partner
        batch, num_tokens, protected = degree.shape[0], scores.num_tokens, scores.protected
        device = degree.device
        r = min(r, max_removable(num_tokens, protected, 0))
        if r <= 0:
            return MergePlan.identity(batch, num_tokens, device)

        num_a, num_b = degree.shape[1], num_tokens // 2
        protected_a, protected_b = (protected + 1) // 2, protected // 2
        # Only unprotected A tokens are ranked: whatever the scores (-inf, nan, ties),
        # a protected token can never be chosen to merge.
        candidates = degree[:, protected_a:]
        order = candidates.sort(dim=-1, descending=True, stable=True).indices + protected_a
        src = order[:, :r]
        stay = order[:, r:].sort(dim=-1).values
        dst = partner.gather(1, src)

        lead = torch.arange(protected, device=device).expand(batch, protected)
        b_tokens = torch.arange(protected_b, num_b, device=device) * 2 + 1
        kept_idx = torch.cat([lead, stay * 2, b_tokens.expand(batch, -1)], dim=1)
        first_b_slot = protected + (num_a - protected_a - r)
        merged_into = dst - protected_b + first_b_slot
        return MergePlan(kept_idx, src * 2, merged_into, num_tokens)
