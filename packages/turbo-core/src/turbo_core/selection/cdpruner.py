"""CDPruner (Zhang et al., 2025): conditional DPP MAP over the image tokens."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .._checks import check_float
from ..connector import ConnectorInputs, ReducedTokens
from ._common import check_inputs, keep_all, kept_output, normalized

__all__ = ["CDPruner", "dpp_greedy_map", "instruction_relevance"]


def instruction_relevance(
    features: Tensor, text: Tensor, text_mask: Tensor | None, negate: bool = False
) -> Tensor:
    """Each token's mean cosine to the real text tokens, min-max scaled per image: ``(B, N)``.

    As CDPruner's code: ``(r - min + 1e-6) / (max - min)``, positive everywhere. ``negate``
    uses ``-cos`` (CDPruner does so with CLIP's patch and text embeddings).
    """
    cosine = normalized(features) @ normalized(text).transpose(-1, -2)  # (B, N, T)
    if negate:
        cosine = -cosine
    if text_mask is None:
        relevance = cosine.mean(dim=-1)
    else:
        weight = text_mask.to(cosine.dtype).unsqueeze(1)
        relevance = (cosine * weight).sum(dim=-1) / weight.sum(dim=-1).clamp_min(1)
    low = relevance.min(dim=-1, keepdim=True).values
    high = relevance.max(dim=-1, keepdim=True).values
    return (relevance - low + 1e-6) / (high - low).clamp_min(1e-6)


def dpp_greedy_map(kernel: Tensor, count: int) -> Tensor:
    """Greedy MAP of a DPP with ``kernel`` (B, N, N), by incremental Cholesky (Chen et al. 2018).

    Each step adds the item that most increases ``log det kernel[S, S]``: the one with the
    largest residual ``d_i^2``; the residuals update with the new Cholesky row. Returns
    ``(B, count)`` indices in the order picked, all distinct per row.
    """
    batch, size, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    cholesky = kernel.new_zeros(count, batch, size)
    residual = kernel.diagonal(dim1=-2, dim2=-1).clone()  # d_i^2
    chosen = torch.zeros(batch, size, dtype=torch.bool, device=kernel.device)
    picks = torch.empty(batch, count, dtype=torch.long, device=kernel.device)
    lowest = torch.finfo(kernel.dtype).min
    for step in range(count):
        # a rank-deficient kernel drives residuals to ~0 or below: still pick a new item
        score = torch.nan_to_num(residual, nan=lowest, neginf=lowest).masked_fill(
            chosen, -torch.inf
        )
        pick = score.argmax(dim=-1)
        picks[:, step] = pick
        chosen[rows, pick] = True
        previous = cholesky[:step, rows, pick]  # (step, B)
        row = kernel[rows, pick] - torch.einsum("sb,sbn->bn", previous, cholesky[:step])
        row = row / residual[rows, pick].clamp_min(1e-12).sqrt().unsqueeze(-1)
        cholesky[step] = row
        residual = residual - row.square()
    return picks


@dataclasses.dataclass(frozen=True)
class CDPruner:
    """Conditional DPP selection: instruction relevance times token diversity.

    Kernel ``L_ij = r_i * cos(x_i, x_j) * r_j`` over the features, with ``r`` the tokens'
    relevance to the instruction (:func:`instruction_relevance` of ``inputs.text``, or
    ``exp(theta / (2 (1 - theta)) * r)`` when ``theta`` is set, CDPruner's optional
    sharpening); the ``budget`` tokens of the greedy DPP MAP are kept unchanged (size 1).

    Args:
        theta: None (CDPruner's default, relevance used as is) or in [0, 1).
        negate_relevance: use ``-cos`` to the text, as CDPruner does with CLIP embeddings.
    """

    theta: float | None = None
    negate_relevance: bool = False

    def __post_init__(self) -> None:
        if self.theta is not None:
            theta = check_float(self.theta, "theta", 0.0)
            if theta >= 1.0:
                raise ValueError(f"theta must be None or in [0, 1), got {theta}")
            object.__setattr__(self, "theta", theta)

    def __call__(self, inputs: ConnectorInputs, budget: int) -> ReducedTokens:
        _, count, kept = check_inputs(inputs, budget, "cdpruner")
        if inputs.text is None:
            raise ValueError(
                "cdpruner needs the instruction: inputs.text (B, T, D), the prompt's "
                "embeddings in the space of the features (its relevance conditions the DPP)"
            )
        if kept == count:
            return keep_all(inputs)
        relevance = instruction_relevance(
            inputs.features, inputs.text, inputs.text_mask, self.negate_relevance
        )
        if self.theta is not None:
            relevance = torch.exp(self.theta / (2 * (1 - self.theta)) * relevance)
        metric = normalized(inputs.features)
        kernel = (
            relevance.unsqueeze(-1) * (metric @ metric.transpose(-1, -2)) * relevance.unsqueeze(1)
        )
        return kept_output(inputs.features, dpp_greedy_map(kernel, kept))
