"""transformers BERT encoders (BERT, MiniLM / sentence-transformers checkpoints) on text tokens.

Guide token: the [CLS] position. Padding from ``attention_mask`` never merges with
real tokens: it enters the reducer as size-0 tokens, so the ``log(size)`` bias masks
it in every fused attention call (the model's own mask is for the unmerged length
and is not used while Turbo runs). BERT is post-norm: the merge happens on the
attention sub-layer's output (after its LayerNorm), before the feed-forward.
Sentence embeddings should be pooled with ``handle.last_state.size`` as weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from turbo_core import TurboConfig

from .common import fused_attention, is_instance, make_handle
from .handle import TurboHandle
from .registry import register_adapter

__all__ = ["BertAdapter"]


class _TurboBertSelfAttention:
    _turbo_handle: TurboHandle

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        handle = self._turbo_handle
        state = handle.current_state()
        if state is None or kwargs.get("past_key_values") is not None:
            return super().forward(hidden_states, attention_mask, **kwargs)  # type: ignore[misc]
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, -1, self.attention_head_size)  # heads from the tensor
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        dropout = self.dropout.p if self.training else 0.0
        out = fused_attention(handle, state, q, k, v, self.scaling, dropout)
        return out.transpose(1, 2).reshape(batch, tokens, -1), None


class _TurboBertLayer:
    _turbo_handle: TurboHandle

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        handle = self._turbo_handle
        state = handle.current_state()
        if state is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)  # type: ignore[misc]
        attention_output, _ = self.attention(hidden_states, None)
        attention_output = handle.step(attention_output, state)
        return self.feed_forward_chunk(attention_output)


class _TurboBertModel:
    _turbo_handle: TurboHandle

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: skip the size-0 machinery
        with self._turbo_handle.forward_scope(token_mask=mask):
            return super().forward(input_ids, attention_mask, *args, **kwargs)  # type: ignore[misc]


@register_adapter
class BertAdapter:
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

    def matches(self, model: nn.Module) -> bool:
        return is_instance(model, "transformers", "BertModel")

    def patch(
        self, model: nn.Module, config: TurboConfig, explicit: frozenset[str] = frozenset()
    ) -> TurboHandle:
        from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention

        if model.config.is_decoder or model.config.add_cross_attention:
            raise TypeError(
                "hf-bert patches encoders only (config.is_decoder and "
                "add_cross_attention must be False)"
            )
        layers = list(model.encoder.layer)
        odd = {type(layer).__name__ for layer in layers if not isinstance(layer, BertLayer)}
        odd |= {
            type(layer.attention.self).__name__
            for layer in layers
            if not isinstance(layer.attention.self, BertSelfAttention)
        }
        if odd:
            raise TypeError(
                f"hf-bert supports BertLayer with BertSelfAttention, found {sorted(odd)}"
            )
        handle = make_handle(
            model, config, explicit, self.name, len(layers), prefix_tokens=1, has_cls=True
        )
        handle.swap_class(model, _TurboBertModel)
        for layer in layers:
            handle.swap_class(layer, _TurboBertLayer)
            handle.swap_class(layer.attention.self, _TurboBertSelfAttention)
        return handle
