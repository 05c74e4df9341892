"""transformers DINOv2 (``Dinov2Model``, ``Dinov2ForImageClassification``).

Same pattern as :mod:`turbo_adapters.vit_hf`, for DINOv2's layer layout: the merge goes
after ``attention -> layer_scale1 -> drop_path -> residual`` and before ``norm2`` and the
MLP (plain or SwiGLU). The classifier's mean over patch tokens becomes a mean weighted by
how many original patches each merged token stands for. ``Dinov2Backbone`` (feature maps
reshaped to the patch grid) is not supported: merged tokens have no grid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from turbo_core import TurboConfig

from .common import make_handle, size_weighted_mean
from .handle import TurboHandle
from .registry import register_adapter
from .vit_hf import (
    HFAdapterBase,
    TurboHFScope,
    find_one,
    patch_layers,
    refuse_checkpointing,
    swap_hf_class,
)

__all__ = ["HFDinov2Adapter"]


class _TurboDinov2Layer:
    """Mixin for ``Dinov2Layer``: merge between the attention residual and the MLP."""

    _turbo_handle: TurboHandle

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        handle = self._turbo_handle
        state = handle.current_state()
        if state is None:
            return super().forward(hidden_states, attention_mask, **kwargs)  # type: ignore[misc]
        refuse_checkpointing(self)  # type: ignore[arg-type]
        attended, _ = self.attention(
            self.norm1(hidden_states), attention_mask=attention_mask, **kwargs
        )
        x = self.drop_path(self.layer_scale1(attended)) + hidden_states
        x = handle.step(x, state)  # (B, N, C) -> (B, N - r, C)
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(x)))) + x


class _TurboDinov2Classifier:
    """Mixin for ``Dinov2ForImageClassification``: ``[CLS, size-weighted patch mean]``."""

    _turbo_handle: TurboHandle

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)  # type: ignore[attr-defined]
        with self._turbo_handle.forward_scope() as state:
            outputs = self.dinov2(pixel_values, attention_mask=attention_mask, **kwargs)  # type: ignore[attr-defined]
            size = state.size  # (B, N, 1) after the last layer, None if nothing merged
        sequence = outputs.last_hidden_state  # (B, N, C)
        patch_size = None if size is None else size[:, 1:]
        pooled = torch.cat([sequence[:, 0], size_weighted_mean(sequence[:, 1:], patch_size)], dim=1)
        logits = self.classifier(pooled)  # type: ignore[attr-defined]
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)  # type: ignore[attr-defined]
        result = ImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict else result.to_tuple()


def _dinov2_classes() -> dict[str, tuple[type, ...]]:
    from transformers.models.dinov2 import modeling_dinov2 as dinov2

    return {
        "models": (dinov2.Dinov2Model, dinov2.Dinov2ForImageClassification),
        "backbones": (dinov2.Dinov2Model,),
        "classifiers": (dinov2.Dinov2ForImageClassification,),
        "layers": (dinov2.Dinov2Layer,),
        "attentions": (dinov2.Dinov2Attention,),
    }


@register_adapter
class HFDinov2Adapter(HFAdapterBase):
    """transformers ``Dinov2Model`` and ``Dinov2ForImageClassification``."""

    name = "hf-dinov2"
    model_names = ("facebook/dinov2-*",)
    model_types = ("dinov2",)

    classes = staticmethod(_dinov2_classes)

    def patch(
        self, model: nn.Module, config: TurboConfig, explicit: frozenset[str] = frozenset()
    ) -> TurboHandle:
        classes = self.classes()
        backbone = find_one(model, classes["backbones"], "Dinov2Model")
        pairs = self.layer_pairs(backbone, classes, "Dinov2Layer")
        handle = make_handle(
            model, config, explicit, self.name, len(pairs), prefix_tokens=1, has_cls=True
        )
        top = _TurboDinov2Classifier if isinstance(model, classes["classifiers"]) else TurboHFScope
        swap_hf_class(handle, model, top)
        if backbone is not model:
            swap_hf_class(handle, backbone, TurboHFScope)
        patch_layers(handle, pairs, _TurboDinov2Layer)
        return handle
