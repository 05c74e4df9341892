"""Independent oracles for LLM mode (FastV at decoder layer 0), shared by the LLaVA and
MiniGPT-v2 tests. Written here from the decoder's own modules; nothing is imported
from turbo_adapters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def ranked_kept(decoder: nn.Module, embeds: torch.Tensor, image: torch.Tensor, keep: int):
    """Positions kept by FastV at layer 0 for one unpadded row: every text token and the
    ``keep`` image tokens the last token attends to most (heads averaged).

    Args:
        decoder: a LLaMA-style decoder model (``layers``, ``rotary_emb``).
        embeds: ``(1, N, C)`` input embeddings; ``image``: ``(N,)`` bool image positions.
    """
    layer = decoder.layers[0]
    attn = layer.self_attn
    n = embeds.shape[1]
    positions = torch.arange(n)[None]
    cos, sin = decoder.rotary_emb(embeds, positions)
    x = layer.input_layernorm(embeds)
    d = attn.head_dim
    q = attn.q_proj(x).view(1, n, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, d).transpose(1, 2)
    rot = lambda t: torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1)
    q = q * cos[:, None] + rot(q) * sin[:, None]
    k = k * cos[:, None] + rot(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = ((q[:, :, -1:] @ k.transpose(-1, -2)) * d**-0.5).softmax(-1).mean(1)[0, 0]
    image_idx = image.nonzero().squeeze(-1)
    top = image_idx[scores[image_idx].argsort(descending=True)[:keep]]
    text_idx = (~image).nonzero().squeeze(-1)
    return torch.cat([text_idx, top]).sort().values


def greedy_on_kept(
    causal_lm: Callable[..., object],
    embed: nn.Module,
    embeds: torch.Tensor,
    kept: torch.Tensor,
    steps: int,
    banned: int | None = None,
) -> list[int]:
    """Greedy tokens of the unpatched LM fed only the kept embeddings at their original
    positions, recomputed in full every step (``use_cache=True`` only so transformers
    does not read the position gaps as packed sequences).

    Args:
        causal_lm: called with ``inputs_embeds``, ``position_ids``, ``use_cache``.
        banned: a token id never chosen (``min_new_tokens`` bans EOS in generate).
    """
    x = embeds[:, kept]
    positions = kept[None].clone()
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            logits = causal_lm(inputs_embeds=x, position_ids=positions, use_cache=True).logits
            last = logits[0, -1].clone()
            if banned is not None:
                last[banned] = -torch.inf
            token = last.argmax()
            tokens.append(int(token))
            x = torch.cat([x, embed(token)[None, None]], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    return tokens
