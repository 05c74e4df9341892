"""Guides for the connector stage: each image token's semantic value A, where no CLS exists.

A connector method ranks tokens with a guide (VisionZip keeps the tokens it attends to
most; Turbo subtracts ``alpha * A`` from the redundancy). Families with a CLS token read
its attention (``"cls"``); the others choose one of:

- ``"probe"``: the SigLIP pooling head's learned probe query attending over the tower's
  output tokens (``nn.MultiheadAttention``'s own weights, heads averaged). The head was
  trained to summarise the image, so it is the closest thing SigLIP has to a CLS token;
  only checkpoints that carry the head have it (standalone SigLIP towers do, PaliGemma
  and Gemma 3 checkpoints usually do not).
- ``"mean"``: the mean token as the query, ``softmax(mean(x) . x_i / sqrt(D))`` over the
  image's tokens (the language model's input space). Every family has it, it costs
  O(N D) and it does not depend on the prompt.
- ``"text"``: the prompt's attention to the image, ``mean_t softmax_i(t . x_i / sqrt(D))``
  over the prompt's text embeddings ``t`` and the projected image tokens ``x_i``, both in
  the language model's input space (the tower-text similarity). Computing it at a
  decoder layer would mean running the decoder over the full image before reducing it,
  the cost the stage exists to avoid, so the input-space similarity is used.

``"auto"`` takes the family's default, ``"none"`` gives no guide.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from turbo_core.attention import guide_attention

__all__ = [
    "GUIDES",
    "mean_query_guide",
    "probe_guide",
    "resolve_guide",
    "text_guide",
]

#: every guide name a :class:`~turbo_adapters.connector.ConnectorReduction` accepts
GUIDES = ("auto", "none", "cls", "probe", "mean", "text")
#: guides the stage computes itself from the features / prompt (every family has them)
SHARED_GUIDES = ("mean", "text")


def resolve_guide(requested: str, own: Sequence[str], default: str, family: str) -> str:
    """The guide a call uses: ``requested``, or ``default`` for ``"auto"``.

    ``own`` are the guides the family computes itself (``"cls"``, ``"probe"``); the
    shared ones (``"mean"``, ``"text"``) and ``"none"`` are always available.

    Raises:
        ValueError: ``requested`` is a guide this family (or this model) lacks.
    """
    name = default if requested == "auto" else requested
    available = ("none", *own, *SHARED_GUIDES)
    if name not in available:
        raise ValueError(
            f"guide={requested!r} is not available on {family}; available: "
            f"{', '.join(repr(a) for a in ('auto', *available))}"
        )
    return name


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mean_query_guide(tokens: torch.Tensor) -> torch.Tensor:
    """``(N,)`` attention of the mean token over ``tokens (N, D)``, summing to 1."""
    x = _work(tokens)
    logits = x @ x.mean(0) * x.shape[-1] ** -0.5
    return logits.softmax(-1)


def text_guide(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(N,)`` the text tokens' ``(T, D)`` attention over ``tokens (N, D)``, averaged over
    the text tokens (uniform when there is no text)."""
    x = _work(tokens)
    if text.shape[0] == 0:
        return x.new_full((x.shape[0],), 1.0 / x.shape[0])
    logits = _work(text).to(x.dtype) @ x.T * x.shape[-1] ** -0.5  # (T, N)
    return logits.softmax(-1).mean(0)


def probe_guide(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` the SigLIP pooling head's probe attention over ``hidden (B, N, D)`` (the
    tower's output after ``post_layernorm``, what the head reads), heads averaged.

    Reads the head's ``nn.MultiheadAttention`` projections (packed ``in_proj_weight``).
    """
    attn = head.attention
    if not getattr(attn, "_qkv_same_embed_dim", True) or attn.in_proj_weight is None:
        raise ValueError("probe guide needs the pooling head's packed in_proj_weight")
    width, heads = attn.embed_dim, attn.num_heads
    weight = attn.in_proj_weight
    bias = attn.in_proj_bias
    q_bias = None if bias is None else bias[:width]
    k_bias = None if bias is None else bias[width : 2 * width]
    with torch.no_grad():
        probe = head.probe.reshape(1, width).to(hidden.dtype)
        q = nn.functional.linear(probe, weight[:width], q_bias)  # (1, D)
        k = nn.functional.linear(hidden, weight[width : 2 * width], k_bias)  # (B, N, D)
        batch, n, _ = k.shape
        q = q.reshape(1, heads, -1).expand(batch, -1, -1)
        k = k.reshape(batch, n, heads, -1).transpose(1, 2)
        return guide_attention(q, k)
