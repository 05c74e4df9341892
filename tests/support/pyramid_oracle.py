"""An eager float64 oracle for staged LLM-mode pruning (PyramidDrop) on one unpadded row.

Written from the decoder's own modules (norms, projections, rotary table, layers, head);
nothing is imported from turbo_adapters. The attention that ranks the image tokens is
computed here by hand; the decoder layers run on explicit index subsets of the prompt.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def last_token_attention(
    layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """``(n,)`` attention of the last token to every token of ``x`` (1, n, C), heads averaged."""
    attn = layer.self_attn
    d = attn.head_dim
    n = x.shape[1]
    h = layer.input_layernorm(x)
    q = attn.q_proj(h[:, -1:]).view(1, 1, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(1, n, -1, d).transpose(1, 2)

    def rotate(t: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        half = torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1)
        return t * c[:, None] + half * s[:, None]

    q = rotate(q, cos[:, -1:], sin[:, -1:])
    k = rotate(k, cos, sin).repeat_interleave(q.shape[1] // k.shape[1], 1)
    probs = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1)  # (1, H, 1, n)
    return probs.mean(1)[0, 0]


def staged_forward(
    decoder: nn.Module,
    embeds: torch.Tensor,
    stage_sets: dict[int, torch.Tensor],
) -> torch.Tensor:
    """Run ``decoder`` on ``embeds`` (1, N, C); from layer L on, only the positions
    ``stage_sets[L]`` (sorted, original positions, rotary at those positions) take part.
    Returns the final-normed hidden state of the last position."""
    positions = torch.arange(embeds.shape[1])
    x = embeds
    for index, layer in enumerate(decoder.layers):
        if index in stage_sets:
            chosen = stage_sets[index]
            keep = torch.isin(positions, chosen)
            x, positions = x[:, keep], positions[keep]
        cos, sin = decoder.rotary_emb(x, positions[None])
        n = x.shape[1]
        causal = torch.full((n, n), -math.inf, dtype=x.dtype).triu(1)[None, None]
        out = layer(x, attention_mask=causal, position_embeddings=(cos, sin))
        x = out[0] if isinstance(out, tuple) else out
    return decoder.norm(x)[:, -1]


def pyramid_prefill(
    decoder: nn.Module,
    embeds: torch.Tensor,
    image: torch.Tensor,
    schedule: list[tuple[int, int]],
) -> dict[int, torch.Tensor]:
    """The kept positions of each stage: at layer L, the ``count`` image tokens still
    present that the last token attends to most (text tokens always stay)."""
    positions = torch.arange(embeds.shape[1])
    x = embeds
    sets: dict[int, torch.Tensor] = {}
    stages = dict(schedule)
    for index, layer in enumerate(decoder.layers):
        if index in stages:
            cos, sin = decoder.rotary_emb(x, positions[None])
            scores = last_token_attention(layer, x, cos, sin)
            is_image = image[positions]
            local = is_image.nonzero().squeeze(-1)
            top = local[scores[local].argsort(descending=True)[: stages[index]]]
            keep = ~is_image
            keep[top] = True
            x, positions = x[:, keep], positions[keep]
            sets[index] = positions.clone()
        cos, sin = decoder.rotary_emb(x, positions[None])
        n = x.shape[1]
        causal = torch.full((n, n), -math.inf, dtype=x.dtype).triu(1)[None, None]
        out = layer(x, attention_mask=causal, position_embeddings=(cos, sin))
        x = out[0] if isinstance(out, tuple) else out
    return sets


def pyramid_greedy(
    decoder: nn.Module,
    head: nn.Module,
    embed: nn.Module,
    embeds: torch.Tensor,
    sets: dict[int, torch.Tensor],
    steps: int,
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens with the prefill's stage sets fixed, every step recomputed in full
    (new tokens take part in every stage); also the first step's logits."""
    tokens: list[int] = []
    first = None
    x = embeds
    for _ in range(steps):
        n = x.shape[1]
        extra = torch.arange(embeds.shape[1], n)
        grown = {layer: torch.cat([kept, extra]) for layer, kept in sets.items()}
        logits = head(staged_forward(decoder, x, grown))[0]
        first = logits if first is None else first
        token = int(logits.argmax())
        tokens.append(token)
        x = torch.cat([x, embed(torch.tensor([[token]]))], 1)
    assert first is not None
    return tokens, first
