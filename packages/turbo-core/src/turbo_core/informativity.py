"""Informativity measures of a token sequence (the paper's section 3.2)."""

from __future__ import annotations

import math

import torch

__all__ = ["attention_concentration", "attention_entropy", "token_redundancy"]


def token_redundancy(x: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``max_{j != i} cos(x_i, x_j)``: ``(B, N, C) -> (B,)``.

    High values mean most tokens are nearly repeated by another token.
    """
    if x.dim() != 3 or x.shape[1] < 2:
        raise ValueError(f"x must be (B, N >= 2, C), got shape {tuple(x.shape)}")
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = x @ x.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).fill_(-math.inf)
    return sim.max(dim=-1).values.mean(dim=-1)


def attention_concentration(attention: torch.Tensor, top_fraction: float = 0.1) -> torch.Tensor:
    """Share of the guide token's attention held by its top ``top_fraction`` tokens.

    ``attention`` is ``(B, N)`` (rows sum to 1); returns ``(B,)`` in ``[top_fraction, 1]``
    for uniform to fully concentrated rows.
    """
    if attention.dim() != 2:
        raise ValueError(f"attention must be (B, N), got shape {tuple(attention.shape)}")
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    k = max(1, math.ceil(top_fraction * attention.shape[1]))
    return attention.float().topk(k, dim=-1).values.sum(dim=-1)


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Entropy of each ``(B, N)`` attention row, normalised to ``[0, 1]`` by ``log N``."""
    if attention.dim() != 2 or attention.shape[1] < 2:
        raise ValueError(f"attention must be (B, N >= 2), got shape {tuple(attention.shape)}")
    p = attention.float().clamp_min(0)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=-1)
    return entropy / math.log(attention.shape[1])
