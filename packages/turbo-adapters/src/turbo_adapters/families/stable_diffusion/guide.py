"""The semantic value of image tokens: the text's attention over them.

- A UNet or PixArt block (:func:`text_to_image_attention`): cross-attention runs after
  self-attention, so the plan step (at the block's input) computes the map itself,
  cheaply, from the block's own ``attn2`` projections: ``softmax_over_image(k_text
  q_image^T * scale)`` averaged over heads, then folded over the text tokens (max or
  mean, start token and padding left out). The logits are the ones the cross-attention
  computes (how relevant text token t is to image token i); normalised over the image
  per text token they say where in the image each text token points. The direction the
  model applies (softmax over the text per image token) sums to 1 for every image
  token, so it cannot say which image tokens the text cares about.
- A joint (MMDiT) attention (:func:`joint_text_attention`: SD3 / SD3.5, FLUX double and
  single blocks): the model itself computes the text tokens' attention over the image
  tokens, as the text rows of its joint softmax. Only those ``T`` rows are computed
  here (text queries against every key, ``O(T (T + N) d)``), never the full ``(T + N)^2``
  attention; the image keys are projected from the tokens the attention receives,
  with its own key norm and FLUX's rotary rows.

Projections are called as modules (LoRA, quantized Linear classes keep working); the
head count comes from the module.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["joint_text_attention", "rotate_pairs", "text_to_image_attention", "text_token_mask"]


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
    return _fold(maps, keep, reduce) * num_image


def _fold(maps: torch.Tensor, keep: torch.Tensor, reduce: str) -> torch.Tensor:
    """``(B, T, N)`` maps of the text tokens -> ``(B, N)``: mean or max over the kept ones."""
    if reduce == "mean":
        weight = keep.to(maps.dtype).unsqueeze(-1)  # (B, T, 1)
        return (maps * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
    if reduce == "max":
        return maps.masked_fill(~keep.unsqueeze(-1), 0.0).amax(dim=1)
    raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary embedding of ``(B, S, H, D)`` queries or keys with ``(S, D)`` tables.

    Channels pair up as ``(0, 1), (2, 3) ...``; each pair ``(a, b)`` turns into
    ``(a cos - b sin, b cos + a sin)`` with the pair's entries of the tables.
    """
    even, odd = x[..., 0::2], x[..., 1::2]
    turned = torch.stack([-odd, even], dim=-1).flatten(-2)
    return x * cos[None, :, None, :] + turned * sin[None, :, None, :]


def _heads(x: torch.Tensor, heads: int, norm: nn.Module | None) -> torch.Tensor:
    """``(B, L, H*D)`` -> ``(B, L, H, D)``, through the attention's per-head norm if any."""
    batch, length, width = x.shape
    x = x.view(batch, length, heads, width // heads)
    return norm(x) if norm is not None else x


def joint_text_attention(
    attn: nn.Module,
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    shared: bool = False,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep: torch.Tensor | None = None,
    reduce: str = "mean",
) -> torch.Tensor:
    """Semantic value of every image token of a joint attention: ``(B, N)``, mean 1.

    Args:
        attn: the joint attention (diffusers' SD3 ``Attention`` or ``FluxAttention``):
            ``to_q`` / ``to_k`` with the norms ``norm_q`` / ``norm_k`` (None: no norm)
            project the image stream, ``add_q_proj`` / ``add_k_proj`` with
            ``norm_added_q`` / ``norm_added_k`` the text stream.
        image: ``(B, N, C)`` image tokens as the attention receives them (normed).
        text: ``(B, T, C)`` text tokens as the attention receives them.
        shared: the text goes through the image's projections and norms (FLUX single
            blocks: the attention gets one ``[text; image]`` sequence).
        rotary: FLUX's ``(cos, sin)`` tables, one row per token of ``[text; image]``.
        keep: ``(B, T)`` bool, the text tokens whose rows count; None: every one.
        reduce: ``"mean"`` (the default of the diffusion transformers) or ``"max"``
            over the text tokens.

    Each text token's row of the joint softmax (its attention over all ``T + N`` keys,
    as the model computes it), image columns only, averaged over heads and folded over
    the text tokens; then rescaled to mean 1 over the image (the share of attention the
    text gives the image as a whole does not rank image tokens), so that ``alpha``
    weighs alike at every resolution and like the UNet's map. Costs the image keys'
    projection and ``T x (T + N)`` logits per head.
    """
    batch, num_image, _ = image.shape
    num_text = text.shape[1]
    heads = int(attn.heads)
    if shared:
        q_proj, k_proj, q_norm, k_norm = attn.to_q, attn.to_k, "norm_q", "norm_k"
    else:
        q_proj, k_proj = attn.add_q_proj, attn.add_k_proj
        q_norm, k_norm = "norm_added_q", "norm_added_k"
    query = _heads(q_proj(text), heads, getattr(attn, q_norm, None))  # (B, T, H, D)
    key_text = _heads(k_proj(text), heads, getattr(attn, k_norm, None))
    key_image = _heads(attn.to_k(image), heads, getattr(attn, "norm_k", None))  # (B, N, H, D)
    work = torch.promote_types(query.dtype, torch.float32)
    key = torch.cat([key_text, key_image], dim=1).to(work)  # (B, T + N, H, D)
    query = query.to(work)
    if rotary is not None:
        cos, sin = (t.to(device=image.device, dtype=work) for t in rotary)
        if cos.shape[0] != num_text + num_image:
            raise ValueError(
                f"rotary tables have {cos.shape[0]} rows; the joint sequence has "
                f"{num_text} text + {num_image} image tokens"
            )
        query = rotate_pairs(query, cos[:num_text], sin[:num_text])
        key = rotate_pairs(key, cos, sin)
    scale = query.shape[-1] ** -0.5
    logits = (query.transpose(1, 2) * scale) @ key.permute(0, 2, 3, 1)  # (B, H, T, T + N)
    maps = logits.softmax(dim=-1)[..., num_text:].mean(dim=1)  # (B, T, N)
    if keep is None:
        keep = torch.ones(batch, num_text, dtype=torch.bool, device=maps.device)
    folded = _fold(maps, keep.to(maps.device), reduce)
    return folded * (num_image / folded.sum(dim=-1, keepdim=True).clamp_min(1e-30))
