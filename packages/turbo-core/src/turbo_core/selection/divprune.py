"""DivPrune (Alvar et al., CVPR 2025): max-min diversity selection of the image tokens."""

from __future__ import annotations

import dataclasses

import torch

from ..connector import ConnectorInputs, ReducedTokens
from ._common import check_inputs, keep_all, kept_output, normalized

__all__ = ["DivPrune"]


@dataclasses.dataclass(frozen=True)
class DivPrune:
    """Greedy max-min diversity: keep tokens far (in cosine distance) from those kept.

    With distance ``d(i, j) = 1 - cos(x_i, x_j)`` over the features (the tokens as they
    enter the language model, as DivPrune uses them) or, with ``use_keys=True``, over
    ``inputs.keys``: the first token kept is the one whose nearest other token is farthest;
    each next one maximises its distance to the nearest token already kept. The kept tokens
    are passed on unchanged (size 1); the others are dropped.

    Args:
        use_keys: measure distance on ``inputs.keys`` instead of the features.
    """

    use_keys: bool = False

    def __call__(self, inputs: ConnectorInputs, budget: int) -> ReducedTokens:
        batch, count, kept = check_inputs(inputs, budget, "divprune")
        source = inputs.keys if self.use_keys else inputs.features
        if source is None:
            raise ValueError("divprune with use_keys=True needs inputs.keys (B, N, Dk)")
        if kept == count:
            return keep_all(inputs)
        metric = normalized(source)
        distance = 1.0 - metric @ metric.transpose(-1, -2)  # (B, N, N)
        rows = torch.arange(batch, device=distance.device)
        chosen = torch.zeros(batch, count, dtype=torch.bool, device=distance.device)
        keep = torch.empty(batch, kept, dtype=torch.long, device=distance.device)
        # first: the token whose nearest other token is farthest
        nearest = (
            distance.diagonal_scatter(
                distance.new_full((batch, count), torch.inf), dim1=-2, dim2=-1
            )
            .min(dim=-1)
            .values
        )
        pick = nearest.argmax(dim=-1)
        to_kept = distance[rows, pick]  # (B, N): distance to the nearest kept token so far
        for step in range(kept):
            if step:
                pick = to_kept.masked_fill(chosen, -torch.inf).argmax(dim=-1)
                to_kept = torch.minimum(to_kept, distance[rows, pick])
            keep[:, step] = pick
            chosen[rows, pick] = True
        return kept_output(inputs.features, keep)
