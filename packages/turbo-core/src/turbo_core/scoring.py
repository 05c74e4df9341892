"""Scorer: the information degree E of every candidate token and its best partner."""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import torch

from .config import Fusion, Mode, TurboConfig

__all__ = ["InformationScorer", "Scorer", "TokenScores", "fuse_information"]

# Floor for the semantic value in S2 (division), so a zero attention weight ranks as
# "very mergeable" instead of producing inf/nan.
_DIVISION_EPS = 1e-6


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
    weight = config.semantic_weight
    if config.fusion is Fusion.DIFFERENCE:
        return redundancy - weight * semantic
    if config.fusion is Fusion.DIVISION:
        # A positive constant does not change the ranking: this ranks exactly like R / A.
        return redundancy / (weight * semantic.clamp_min(_DIVISION_EPS))
    if config.fusion is Fusion.PRODUCT:
        return redundancy * (1.0 - weight * semantic)
    decay = float(config.beta ** abs(config.gamma - block_index))
    return redundancy - decay * weight * semantic


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
    ) -> TokenScores:
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
        redundancy, partner = similarity.max(dim=-1)
        semantic_a = None if semantic is None else semantic[:, ::2].to(work_dtype)
        degree = fuse_information(redundancy, semantic_a, self.config, block_index)
        if protected_a:
            degree = degree.clone() if degree is redundancy else degree
            degree[:, :protected_a] = -torch.inf  # never a source
        return TokenScores(degree, partner, num_tokens, protected)
