"""The semantic value of image tokens in a UNet block: the text's cross-attention over them.

Cross-attention runs after self-attention, so the plan step (at the block's input)
computes the map itself, cheaply, from the block's own ``attn2`` projections:
``softmax_over_image(k_text q_image^T * scale)`` averaged over heads, then folded over
the text tokens (max or mean, start token and padding left out). Projections are
called as modules (LoRA, quantized Linear classes keep working); the head count comes
from the module.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["text_to_image_attention", "text_token_mask"]


def text_token_mask(
    batch: int, num_text: int, device: torch.device, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, T)`` bool: the text tokens whose maps count (True); the start token never does.

    ``mask`` is a keep mask, ``(B, T)`` or ``(1, T)``, bool or 0/1 (the tokenizer's
    ``attention_mask``, or the ``encoder_attention_mask`` given to the UNet); one of
    another shape is ignored. Without it every token after the start token counts.
    """
    keep = torch.ones(batch, num_text, dtype=torch.bool, device=device)
    fits = mask is not None and mask.dim() == 2 and mask.shape[-1] == num_text
    if fits and mask.shape[0] in (1, batch):  # type: ignore[union-attr]
        keep = keep & (mask.to(device) > 0)
    if num_text > 1:
        keep[:, 0] = False
    return keep


def text_to_image_attention(
    attn: nn.Module,
    image: torch.Tensor,
    text: torch.Tensor,
    keep: torch.Tensor,
    reduce: str = "max",
) -> torch.Tensor:
    """Semantic value of every image token: ``(B, N)``, mean 1 over the image.

    Args:
        attn: the block's cross-attention (a diffusers ``Attention``: ``to_q``,
            ``to_k``, ``heads``, ``scale``).
        image: ``(B, N, C)`` normed image tokens (the query side).
        text: ``(B, T, Ct)`` text tokens (``encoder_hidden_states``).
        keep: ``(B, T)`` bool, the text tokens that count (:func:`text_token_mask`).
        reduce: ``"max"`` or ``"mean"`` over the kept text tokens.

    Each text token's map is a softmax over the N image tokens (how that token spreads
    its attention over the image), averaged over heads; multiplied by N so that a
    uniform map is 1 everywhere whatever the resolution.
    """
    batch, num_image, _ = image.shape
    heads = int(attn.heads)
    query = attn.to_q(image)  # (B, N, H*D)
    key = attn.to_k(text)  # (B, T, H*D)
    dim = query.shape[-1] // heads
    work = torch.promote_types(query.dtype, torch.float32)
    query = query.view(batch, num_image, heads, dim).transpose(1, 2)  # (B, H, N, D)
    key = key.view(batch, -1, heads, dim).transpose(1, 2)  # (B, H, T, D)
    scale = float(getattr(attn, "scale", dim**-0.5))
    logits = (key * scale) @ query.transpose(-1, -2)  # (B, H, T, N)
    maps = logits.to(work).softmax(dim=-1).mean(dim=1)  # (B, T, N)
    weight = keep.to(work).unsqueeze(-1)  # (B, T, 1)
    if reduce == "mean":
        folded = (maps * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
    elif reduce == "max":
        folded = maps.masked_fill(~keep.unsqueeze(-1), 0.0).amax(dim=1)
    else:
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    return folded * num_image
