"""Shared pieces of the connector methods: input checks, gathers and the size-weighted merge."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int
from ..connector import ConnectorInputs, ReducedTokens

__all__ = [
    "check_inputs",
    "gather_tokens",
    "keep_all",
    "kept_output",
    "merge_into_kept",
    "normalized",
    "work_float",
]


def work_float(x: Tensor) -> Tensor:
    """``x`` in float32 at least: half-precision cosines and scores tie far too often."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalized(x: Tensor) -> Tensor:
    """``x`` in float32 (at least), L2-normalised over its last dimension."""
    x = work_float(x)
    norm: Tensor = x.norm(dim=-1, keepdim=True)
    return x / norm.clamp_min(1e-12)


def check_inputs(inputs: ConnectorInputs, budget: int, method: str) -> tuple[int, int, int]:
    """Validate shapes and the budget; return ``(B, N, K)`` with ``K = min(budget, N)``."""
    features = inputs.features
    if features.dim() != 3 or not features.dtype.is_floating_point:
        raise ValueError(
            f"{method}: inputs.features must be a floating (B, N, D) tensor, got "
            f"shape {tuple(features.shape)} and dtype {features.dtype}"
        )
    budget = check_int(budget, "budget", 1)
    batch, count, _ = features.shape
    if inputs.keys is not None and (
        inputs.keys.dim() != 3 or tuple(inputs.keys.shape[:2]) != (batch, count)
    ):
        raise ValueError(
            f"{method}: inputs.keys must be (B, N, Dk) = ({batch}, {count}, Dk), got "
            f"{tuple(inputs.keys.shape)}"
        )
    if inputs.guide is not None and tuple(inputs.guide.shape) != (batch, count):
        raise ValueError(
            f"{method}: inputs.guide must be (B, N) = ({batch}, {count}), got "
            f"{tuple(inputs.guide.shape)}"
        )
    if inputs.text is not None:
        text = inputs.text
        if text.dim() != 3 or text.shape[0] != batch or text.shape[2] != features.shape[2]:
            raise ValueError(
                f"{method}: inputs.text must be (B, T, D) = ({batch}, T, {features.shape[2]}), "
                f"got {tuple(text.shape)}"
            )
        mask = inputs.text_mask
        if mask is not None and (mask.dtype != torch.bool or mask.shape != text.shape[:2]):
            raise ValueError(
                f"{method}: inputs.text_mask must be a bool (B, T) tensor matching text, got "
                f"shape {tuple(mask.shape)} and dtype {mask.dtype}"
            )
    return batch, count, min(budget, count)


def keep_all(inputs: ConnectorInputs) -> ReducedTokens:
    """Every token kept, unchanged (the answer whenever the budget is at least N)."""
    batch, count, _ = inputs.features.shape
    device = inputs.features.device
    sizes = torch.ones(batch, count, device=device)
    index = torch.arange(count, device=device).expand(batch, count).clone()
    return ReducedTokens(inputs.features, sizes, index)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Rows of ``x`` (B, N, D) at ``index`` (B, K): ``(B, K, D)``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def kept_output(features: Tensor, keep: Tensor) -> ReducedTokens:
    """Pure selection: the tokens at ``keep`` (B, K), in ascending order, each of size 1."""
    keep = keep.sort(dim=-1).values
    sizes = torch.ones(keep.shape, device=features.device)
    return ReducedTokens(gather_tokens(features, keep), sizes, keep)


def merge_into_kept(features: Tensor, similarity: Tensor, keep: Tensor) -> ReducedTokens:
    """Keep ``keep`` (B, K) and merge every other token into its most similar kept token.

    ``similarity`` is ``(B, N, K)``: each token's similarity to each kept token. The merge
    is size-weighted (every input token has size 1): a kept token becomes the mean of itself
    and the tokens merged into it, and its size their count. Computed in float32 at least,
    returned in the dtype of ``features``.
    """
    batch, count, width = features.shape
    kept = keep.shape[1]
    destination = similarity.argmax(dim=-1)  # (B, N), a slot in 0..K-1
    # a kept token stays in its own slot even if a duplicate of it is kept elsewhere
    slots = torch.arange(kept, device=keep.device).expand(batch, kept)
    destination = destination.scatter(1, keep, slots)
    flat = (destination + kept * torch.arange(batch, device=keep.device).unsqueeze(-1)).reshape(-1)
    x = work_float(features).reshape(batch * count, width)
    sums = x.new_zeros(batch * kept, width).index_add_(0, flat, x)
    sizes = x.new_zeros(batch * kept).index_add_(0, flat, x.new_ones(batch * count))
    tokens = (sums / sizes.unsqueeze(-1)).reshape(batch, kept, width)
    sizes = sizes.reshape(batch, kept).float()
    order = keep.argsort(dim=-1)
    index = keep.gather(1, order)
    tokens = gather_tokens(tokens, order).to(features.dtype)
    return ReducedTokens(tokens, sizes.gather(1, order), index)
