"""Attention helpers: the guide token's exact attention row and the size bias for fused SDPA."""

from __future__ import annotations

import math

import torch
from einops import rearrange

__all__ = ["add_size_bias", "guide_attention", "size_log_bias"]


def _check_heads(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(t.shape)}")


def guide_attention(
    guide_query: torch.Tensor,
    key: torch.Tensor,
    size: torch.Tensor | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention weights one guide token gives every key, averaged over heads.

    Computes ``softmax(q_guide K^T * scale + log size)`` for the guide row only:
    O(N d) work instead of the O(N^2 d) full matrix, so the main attention can
    stay on fused ``scaled_dot_product_attention``. Exact, not an approximation.

    Args:
        guide_query: ``(B, H, D)`` query of the guide token (e.g. ``q[:, :, 0]`` for CLS).
        key: ``(B, H, N, D)`` keys.
        size: optional ``(B, N, 1)`` or ``(B, N)`` token sizes (proportional attention).
        scale: logit scale, default ``D ** -0.5``.
        key_padding_mask: optional ``(B, N)`` bool, True where a key may be attended.

    Returns:
        ``(B, N)`` float32, each row summing to 1.
    """
    _check_heads("guide_query", guide_query, 3)
    _check_heads("key", key, 4)
    if guide_query.shape[:2] != key.shape[:2] or guide_query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"guide_query {tuple(guide_query.shape)} does not match key {tuple(key.shape)}: "
            "expected (B, H, D) and (B, H, N, D)"
        )
    scale = key.shape[-1] ** -0.5 if scale is None else scale
    # float32 for the softmax: this row decides rankings, half precision ties too often.
    work = torch.promote_types(key.dtype, torch.float32)
    # scale the (B, H, D) query rather than the (B, H, N) logits: fewer multiplications
    query = guide_query.to(work) * scale
    logits = _guide_logits(key.to(work), query)  # (B, H, N)
    if size is not None:
        # explicit N, not -1: a reshape cannot infer it from an empty batch
        logits += size.reshape(size.shape[0], 1, size.shape[1]).to(work).log()
    if key_padding_mask is not None:
        logits.masked_fill_(~key_padding_mask[:, None, :], -math.inf)
    return logits.softmax(dim=-1).mean(dim=1)


def _guide_logits(key: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``key @ query`` per head: (B, H, N, D) x (B, H, D) -> (B, H, N).

    Keys sliced from a fused qkv projection are (B, N, H, D) in memory. A batched
    matmul over (B, H) would first copy all keys; instead, view them as (B, N, H*D)
    and multiply by a block-diagonal (B, H*D, H) query: one matmul, no copy.
    """
    batch, heads, tokens, dim = key.shape
    by_token = key.transpose(1, 2)  # (B, N, H, D) view
    if key.is_contiguous() or by_token.stride(2) != dim or by_token.stride(3) != 1:
        return (key @ query.unsqueeze(-1)).squeeze(-1)
    flat = by_token.as_strided(
        (batch, tokens, heads * dim), (by_token.stride(0), by_token.stride(1), 1)
    )
    eye = torch.eye(heads, dtype=query.dtype, device=query.device)
    block_diagonal = (query.unsqueeze(-1) * eye.view(1, heads, 1, heads)).reshape(
        batch, heads * dim, heads
    )
    return torch.bmm(flat, block_diagonal).transpose(1, 2)


def size_log_bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``log(size)`` shaped ``(B, 1, 1, N)``: an additive mask for fused SDPA.

    Passing it as ``attn_mask`` to ``scaled_dot_product_attention`` gives
    proportional attention ``softmax(QK^T / sqrt(d) + log s)``.
    """
    if size is None:
        return None
    # sizes are float32 (exact counts); a float64 model gets its log in float64
    wide = torch.promote_types(size.dtype, dtype)
    return rearrange(size, "b n 1 -> b 1 1 n").to(wide).log().to(dtype)


def add_size_bias(
    attn_mask: torch.Tensor | None, size: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """Combine an existing SDPA mask (bool or additive) with the size bias."""
    bias = size_log_bias(size, dtype)
    if bias is None:
        return attn_mask
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
            ~attn_mask, -math.inf
        )
    return attn_mask.to(dtype) + bias
