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

from turbo_core import TurboConfig

from ..adapter import model_defaults
from ..blocks import BlockSpec, install_scope
from ..patch import TurboPatch
from ..site import ReductionSite
from .hf_base import HFAdapter, install_hf_layers

__all__ = ["BERT_LAYER", "BertAdapter"]

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


class BertAdapter(HFAdapter):
    """``BertModel`` encoders; only the self-attention path (no cross-attention, no cache)."""

    name = "hf-bert"
    model_names = (
        "bert-*",
        "google-bert/*",
        "sentence-transformers/all-minilm-*",
        "sentence-transformers/paraphrase-minilm-*",
        "all-minilm-*",
        "minilm-l6",
    )
    model_types = ("bert",)

    def classes(self) -> dict[str, Any]:
        from transformers.models.bert import modeling_bert as bert

        return {"models": (bert.BertModel,), "layers": (bert.BertLayer,)}

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        if model.config.is_decoder or model.config.add_cross_attention:
            raise TypeError(
                "hf-bert patches encoders only (config.is_decoder and "
                "add_cross_attention must be False)"
            )
        layers = list(model.encoder.layer)
        odd = {
            type(layer).__name__
            for layer in layers
            if not isinstance(layer, self.classes()["layers"])
        }
        if odd:
            raise TypeError(f"hf-bert supports BertLayer, found {sorted(odd)}")
        site = patch.add_site(ReductionSite("text", model_defaults(config, 1), len(layers)))
        install_hf_layers(patch, site, layers, BERT_LAYER)
        install_scope(patch, site, model, token_mask=_padding)
