"""Turbo at the connector: keep the most informative tokens, merge the rest into them."""

from __future__ import annotations

import dataclasses
import math

from .._checks import check_float
from ..connector import ConnectorInputs, ReducedTokens
from ._common import (
    check_inputs,
    keep_all,
    kept_output,
    merge_into_kept,
    normalized,
    work_float,
)

__all__ = ["TurboSelection"]


@dataclasses.dataclass(frozen=True)
class TurboSelection:
    """Turbo's information degree ``E = R - alpha * A`` ranked once over each image's tokens.

    ``R_i = max_{j != i} cos(k_i, k_j)`` is the mutual redundancy (``k`` = ``inputs.keys``,
    or the features without keys) and ``A`` the guide, normalised to sum to ``N`` over
    each image's tokens (mean 1, the core's ``semantic_norm="length"``), so one ``alpha``
    fits any token count and any guide scale. As in the tower, the highest E is the least
    informative: the ``budget`` tokens with the LOWEST E are kept, every other token merges
    into its most similar kept token (size-weighted mean, sizes returned). Without a guide
    (or with ``alpha=0``) it ranks by redundancy alone (ToMe's criterion).

    Args:
        alpha: weight of the semantic value, >= 0.
        merge: merge the dropped tokens into the kept ones (True) or just drop them.
    """

    alpha: float = 1.0
    merge: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_float(self.alpha, "alpha", 0.0))

    def __call__(self, inputs: ConnectorInputs, budget: int) -> ReducedTokens:
        _, count, kept = check_inputs(inputs, budget, "turbo")
        if kept == count:
            return keep_all(inputs)
        metric = normalized(inputs.keys if inputs.keys is not None else inputs.features)
        similarity = metric @ metric.transpose(-1, -2)  # (B, N, N)
        off_diagonal = similarity.diagonal(dim1=-2, dim2=-1)
        saved = off_diagonal.clone()
        off_diagonal.fill_(-math.inf)
        degree = similarity.max(dim=-1).values  # R
        off_diagonal.copy_(saved)
        if inputs.guide is not None and self.alpha > 0:
            guide = work_float(inputs.guide)
            guide = guide / guide.sum(dim=-1, keepdim=True).clamp_min(1e-30) * count
            degree = degree - self.alpha * guide
        keep = (-degree).topk(kept, dim=-1).indices
        if not self.merge:
            return kept_output(inputs.features, keep)
        to_kept = similarity.gather(2, keep.unsqueeze(1).expand(-1, count, -1))  # (B, N, K)
        return merge_into_kept(inputs.features, to_kept, keep)
