"""Scorer: the information degree E of every candidate token and its best partner."""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, runtime_checkable

import torch

from .config import MAX_SEMANTIC_WEIGHT, Fusion, Mode, TurboConfig

__all__ = ["InformationScorer", "Scorer", "TokenScores", "fuse_information"]

# Floor for the semantic value in S2 (division), so a zero attention weight ranks as
# "very mergeable" instead of producing inf/nan.
_DIVISION_EPS = 1e-6

# Above this factor, factor * A can overflow float32 (max 3.4e38, A up to N with the
# length norm): the fusion then runs in float64.
_FLOAT32_SAFE_FACTOR = 1e30


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """Scores of the bipartite split: A = even positions, B = odd positions.

    Attributes:
        degree: ``(B, ceil(N/2))`` information degree E of each A token; the
            highest merge first; protected tokens hold ``-inf``.
        partner: ``(B, ceil(N/2))`` int64, index into B of each A token's most
            similar (unprotected) B token: where it would merge.
        num_tokens: ``N``.
        protected: leading tokens that must not merge.
    """

    degree: torch.Tensor
    partner: torch.Tensor
    num_tokens: int
    protected: int


@runtime_checkable
class Scorer(Protocol):
    """Computes :class:`TokenScores` from a similarity metric and a semantic row."""

    def score(
        self,
        metric: torch.Tensor,
        semantic: torch.Tensor | None,
        protected: int,
        block_index: int,
        token_mask: torch.Tensor | None = None,
    ) -> TokenScores: ...


def fuse_information(
    redundancy: torch.Tensor,
    semantic: torch.Tensor | None,
    config: TurboConfig,
    block_index: int = 0,
) -> torch.Tensor:
    """Information degree E from redundancy R and semantic value A (same shapes).

    ``redundancy`` mode and ``alpha == 0`` return R itself, so they rank exactly
    alike; ``semantics`` mode returns -A.
    """
    if not config.uses_semantics:
        return redundancy
    if semantic is None:
        raise ValueError(
            f"mode={config.mode.value!r} with alpha={config.alpha} needs the semantic row "
            "(the guide token's attention); pass semantic= or set alpha=0"
        )
    if config.mode is Mode.SEMANTICS:
        return -semantic
    weight = _semantic_factor(config, block_index)
    if weight > _FLOAT32_SAFE_FACTOR and redundancy.dtype != torch.float64:
        redundancy, semantic = redundancy.double(), semantic.double()
    if config.fusion is Fusion.DIVISION:
        # A positive constant does not change the ranking: this ranks exactly like R / A.
        return redundancy / (weight * semantic.clamp_min(_DIVISION_EPS))
    if config.fusion is Fusion.PRODUCT:
        return redundancy * (1.0 - weight * semantic)
    return redundancy - weight * semantic  # S1, and S4 with its decay in the weight


def _semantic_factor(config: TurboConfig, block_index: int) -> float:
    """The factor in front of A: ``alpha * semantic_scale``, times S4's decay in S4."""
    weight = config.semantic_weight
    if config.fusion is not Fusion.LAYER_DYNAMIC:
        return weight
    distance = abs(config.gamma - block_index)
    try:
        factor = float(config.beta**distance) * weight
    except OverflowError:
        factor = math.inf
    if factor > MAX_SEMANTIC_WEIGHT:
        raise ValueError(
            f"S4's weight beta ** |gamma - block| * alpha * semantic_scale = "
            f"{config.beta:g} ** {distance:g} * {weight:g} exceeds {MAX_SEMANTIC_WEIGHT:g} at "
            f"block {block_index}: lower beta (a decay base, usually <= 1) or alpha"
        )
    return factor


class InformationScorer:
    """Default scorer: cosine redundancy over the bipartite split, fused with semantics."""

    def __init__(self, config: TurboConfig) -> None:
        self.config = config

    def score(
        self,
        metric: torch.Tensor,
        semantic: torch.Tensor | None,
        protected: int,
        block_index: int,
        token_mask: torch.Tensor | None = None,
    ) -> TokenScores:
        """Scores of every A token; ``token_mask`` (B, N) marks real tokens (False = padding).

        Real tokens merge only into real tokens and padding only into padding; real
        tokens rank before padding, so padding merges only when a sequence has no real
        candidate left (and then harmlessly: padding has size 0).
        """
        num_tokens = metric.shape[1]
        # float32 at least: rankings from half-precision cosines tie far too often.
        work_dtype = torch.promote_types(metric.dtype, torch.float32)
        metric = metric.to(work_dtype)
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = metric[:, ::2], metric[:, 1::2]
        similarity = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        protected_a, protected_b = (protected + 1) // 2, protected // 2
        if protected_b:
            similarity[:, :, :protected_b] = -torch.inf  # never a destination
        if token_mask is not None:
            real_a, real_b = token_mask[:, ::2], token_mask[:, 1::2]
            mixed = real_a.unsqueeze(-1) != real_b.unsqueeze(-2)
            similarity.masked_fill_(mixed, -torch.inf)
        redundancy, partner = similarity.max(dim=-1)
        semantic_a = None if semantic is None else semantic[:, ::2].to(work_dtype)
        if semantic_a is not None and self.config.semantic_norm == "length":
            # A sums to 1 over the real tokens: times their count, its mean is 1 at any N
            count = (
                token_mask.sum(dim=-1, keepdim=True).to(work_dtype)
                if token_mask is not None
                else float(num_tokens)
            )
            semantic_a = semantic_a * count
        degree = fuse_information(redundancy, semantic_a, self.config, block_index)
        if token_mask is not None:
            # Tiers, highest first: real tokens with a partner, padding, real tokens
            # without a partner, protected tokens (-inf, below).
            lowest = torch.finfo(degree.dtype).min  # float64 after a widened fusion
            degree = torch.where(redundancy == -torch.inf, lowest, degree)
            degree = torch.where(real_a, degree, lowest / 4)
        if protected_a:
            degree = degree.clone() if degree is redundancy else degree
            degree[:, :protected_a] = -torch.inf  # never a source
        return TokenScores(degree, partner, num_tokens, protected)
