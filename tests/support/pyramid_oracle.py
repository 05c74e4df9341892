"""An eager float64 oracle for staged LLM-mode pruning (PyramidDrop) on one unpadded row.

Written from the decoder's own modules (norms, projections, rotary table, layers, head);
nothing is imported from turbo_adapters. The attention that ranks the image tokens is
computed here by hand; the decoder layers run on explicit index subsets of the prompt.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# per stage layer: (kept original positions, {centre position: member positions})
Plan = dict[int, tuple[list[int], dict[int, list[int]]]]


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


# ------------------------------------------------------------------ SparseVLM
def sparse_raters(embeds: torch.Tensor, image: torch.Tensor) -> list[int]:
    """Text raters: tokens after the last image token whose softmax relevance (over the
    text tokens, averaged over the image tokens) is above the mean."""
    image_pos = [i for i in range(len(image)) if image[i]]
    text_pos = list(range(image_pos[-1] + 1, len(image)))
    v, t = embeds[0, image_pos], embeds[0, text_pos]
    score = (v @ t.T).softmax(-1).mean(0)
    mean = float(score.mean())
    return [p for p, s in zip(text_pos, score.tolist(), strict=True) if s > mean]


def density_peaks_loops(x: torch.Tensor, clusters: int) -> tuple[list[int], list[int]]:
    """DPC-kNN in loops: (centres, cluster of every row); density ties go to the earlier
    row (SparseVLM breaks them with random noise)."""
    m, width = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(width) for j in range(m)] for i in range(m)]
    k = min(clusters, m)
    density = [math.exp(-sum(d * d for d in sorted(row)[:k]) / k) for row in dist]
    top = max(max(row) for row in dist)
    parent = [
        min([dist[i][j] for j in range(m) if density[j] > density[i]], default=top)
        for i in range(m)
    ]
    score = [parent[i] * density[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: -score[i])[:clusters]
    cluster = [min(range(clusters), key=lambda c: dist[i][centres[c]]) for i in range(m)]
    for c, centre in enumerate(centres):
        cluster[centre] = c
    return centres, cluster


def sparse_prefill(
    decoder: nn.Module,
    embeds: torch.Tensor,
    image: torch.Tensor,
    schedule: list[tuple[int, int]],
    recycle: float,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor, Plan]:
    """SparseVLM on one unpadded row: per stage layer, the kept positions and their sizes,
    the final-normed last hidden state, and the plan (for :func:`sparse_replay`). Merged
    slots add log(size) to their keys' logits in every later layer (and in the ranking
    attention)."""
    raters = sparse_raters(embeds, image)
    positions = torch.arange(embeds.shape[1])
    size = torch.ones(embeds.shape[1], dtype=embeds.dtype)
    x = embeds
    stages = dict(schedule)
    kept_sets: dict[int, torch.Tensor] = {}
    size_sets: dict[int, torch.Tensor] = {}
    plan: Plan = {}
    for index, layer in enumerate(decoder.layers):
        n = x.shape[1]
        bias = torch.full((n, n), -math.inf, dtype=x.dtype).triu(1) + size.log()[None, :]
        if index in stages:
            cos, sin = decoder.rotary_emb(x, positions[None])
            attn = layer.self_attn
            d = attn.head_dim
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, n, -1, d).transpose(1, 2)
            k = attn.k_proj(h).view(1, n, -1, d).transpose(1, 2)
            half_q = torch.cat([-q[..., d // 2 :], q[..., : d // 2]], -1)
            half_k = torch.cat([-k[..., d // 2 :], k[..., : d // 2]], -1)
            q = q * cos[:, None] + half_q * sin[:, None]
            k = k * cos[:, None] + half_k * sin[:, None]
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            probs = ((q @ k.transpose(-1, -2)) / math.sqrt(d) + bias).softmax(-1).mean(1)[0]
            rows = [i for i in range(n) if int(positions[i]) in raters]
            score = probs[rows].mean(0)
            local_image = [i for i in range(n) if image[positions[i]]]
            ranked = sorted(local_image, key=lambda i: -float(score[i]))
            kept, dropped = ranked[: stages[index]], ranked[stages[index] :]
            x = x.clone()
            size = size.clone()
            merges: dict[int, list[int]] = {}
            if dropped:
                count = min(int(len(dropped) * recycle) + 1, len(dropped))
                chosen = sorted(dropped, key=lambda i: -float(score[i]))[:count]
                clusters = int(count / 10) + 1
                centres, cluster = density_peaks_loops(x[0, chosen], clusters)
                for c, centre in enumerate(centres):
                    members = [chosen[i] for i in range(count) if cluster[i] == c]
                    weights = size[members]
                    x[0, chosen[centre]] = (x[0, members] * weights[:, None]).sum(0) / weights.sum()
                    size[chosen[centre]] = weights.sum()
                    kept.append(chosen[centre])
                    merges[int(positions[chosen[centre]])] = [int(positions[i]) for i in members]
            keep = torch.tensor([not image[positions[i]] or i in kept for i in range(n)])
            x, positions, size = x[:, keep], positions[keep], size[keep]
            kept_sets[index], size_sets[index] = positions.clone(), size.clone()
            plan[index] = (positions.tolist(), merges)
            n = x.shape[1]
            bias = torch.full((n, n), -math.inf, dtype=x.dtype).triu(1) + size.log()[None, :]
        cos, sin = decoder.rotary_emb(x, positions[None])
        out = layer(x, attention_mask=bias[None, None], position_embeddings=(cos, sin))
        x = out[0] if isinstance(out, tuple) else out
    return kept_sets, size_sets, decoder.norm(x)[:, -1], plan


def sparse_replay(
    decoder: nn.Module, embeds: torch.Tensor, plan: Plan, prompt: int
) -> torch.Tensor:
    """The last hidden state of ``embeds`` (prompt + generated tokens) with the prefill's
    SparseVLM decisions replayed: at each stage the same prompt tokens stay and the same
    members merge into each centre (size-weighted); generated tokens always stay."""
    positions = torch.arange(embeds.shape[1])
    size = torch.ones(embeds.shape[1], dtype=embeds.dtype)
    x = embeds
    for index, layer in enumerate(decoder.layers):
        if index in plan:
            kept, merges = plan[index]
            row = {int(p): i for i, p in enumerate(positions)}
            x, size = x.clone(), size.clone()
            for centre, members in merges.items():
                rows_ = [row[m] for m in members]
                weights = size[rows_]
                x[0, row[centre]] = (x[0, rows_] * weights[:, None]).sum(0) / weights.sum()
                size[row[centre]] = weights.sum()
            keep = torch.tensor([int(p) in kept or int(p) >= prompt for p in positions])
            x, positions, size = x[:, keep], positions[keep], size[keep]
        n = x.shape[1]
        bias = torch.full((n, n), -math.inf, dtype=x.dtype).triu(1) + size.log()[None, :]
        cos, sin = decoder.rotary_emb(x, positions[None])
        out = layer(x, attention_mask=bias[None, None], position_embeddings=(cos, sin))
        x = out[0] if isinstance(out, tuple) else out
    return decoder.norm(x)[:, -1]
