"""transformers BERT encoders (BERT, MiniLM / sentence-transformers checkpoints) on text tokens.

Guide token: ``[CLS]``. Padding from ``attention_mask`` never merges with real tokens:
it enters the site as size-0 tokens, so the ``log(size)`` bias masks it in every fused
attention call (the model's own mask, built for the unmerged length, is not used while
Turbo runs). BERT is post-norm: the merge happens on the attention sub-layer's output
(after its residual and LayerNorm), before the feed-forward. Pool sentence embeddings
with the sizes that come out with ``last_hidden_state`` (:func:`turbo_adapters.token_sizes`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..blocks import BlockSpec
from .tower import TowerAdapter, TowerFamily

__all__ = ["BERT", "BERT_LAYER", "BertAdapter"]

#: ``BertLayer``: attention (with its residual and norm), then the feed-forward chunk.
BERT_LAYER = BlockSpec(
    attn="attention", owner="attention.self", mlp="feed_forward_chunk", post_norm=True
)


def _padding(
    input_ids: Any = None, attention_mask: Any = None, *args: Any, **kwargs: Any
) -> torch.Tensor | None:
    """``(B, N)`` bool token mask from BertModel's arguments (no host sync to test it)."""
    if attention_mask is None:
        attention_mask = kwargs.get("attention_mask")
    return None if attention_mask is None else attention_mask.to(torch.bool)


def _encoder_only(model: nn.Module, tower: nn.Module, layers: list[nn.Module]) -> None:
    if model.config.is_decoder or model.config.add_cross_attention:
        raise TypeError(
            "hf-bert patches encoders only (config.is_decoder and "
            "add_cross_attention must be False)"
        )


#: ``BertModel`` encoders; only the self-attention path (no cross-attention, no cache).
BERT = TowerFamily(
    name="hf-bert",
    model_names=(
        "bert-*",
        "google-bert/*",
        "sentence-transformers/all-minilm-*",
        "sentence-transformers/paraphrase-minilm-*",
        "all-minilm-*",
        "minilm-l6",
    ),
    model_types=("bert",),
    models=("transformers.models.bert.modeling_bert:BertModel",),
    layers=("transformers.models.bert.modeling_bert:BertLayer",),
    layer_path="encoder.layer",
    block=BERT_LAYER,
    modality="text",
    check=_encoder_only,
    token_mask=_padding,
)


class BertAdapter(TowerAdapter):
    """``BertModel`` encoders; only the self-attention path (no cross-attention, no cache)."""

    family = BERT
