"""transformers CLIP vision tower (``CLIPVisionModel``, ``...WithProjection``, ``CLIPModel``).

Only the vision tower is patched; in a ``CLIPModel`` the text tower (the same layer
classes) is left untouched. CLIP's ``pre_layrnorm`` runs before the first layer, so the
tokens that merge are the normalised ones; the pooled output is ``post_layernorm`` of
token 0, the CLS token, which is protected and stays first. The merge goes after the
attention residual and before ``layer_norm2`` and the MLP. ``CLIPForImageClassification``
averages patch tokens weighted by how many original patches each stands for.
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

__all__ = ["HFCLIPVisionAdapter"]


class _TurboCLIPEncoderLayer:
    """Mixin for a vision ``CLIPEncoderLayer``: merge between attention and MLP."""

    _turbo_handle: TurboHandle

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        handle = self._turbo_handle
        state = handle.current_state()
        if state is None:
            return super().forward(hidden_states, attention_mask, **kwargs)  # type: ignore[misc]
        refuse_checkpointing(self)  # type: ignore[arg-type]
        attended, _ = self.self_attn(
            hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs
        )
        x = hidden_states + attended
        x = handle.step(x, state)  # (B, N, C) -> (B, N - r, C)
        return x + self.mlp(self.layer_norm2(x))


class _TurboCLIPModel(TurboHFScope):
    """Mixin for ``CLIPModel``: image features share one reduction state per call."""

    def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
        with self._turbo_handle.forward_scope():
            return super().get_image_features(*args, **kwargs)  # type: ignore[misc]


class _TurboCLIPClassifier:
    """Mixin for ``CLIPForImageClassification``: size-weighted mean of patch tokens."""

    _turbo_handle: TurboHandle

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)  # type: ignore[attr-defined]
        with self._turbo_handle.forward_scope() as state:
            outputs = self.vision_model(pixel_values, **kwargs)  # type: ignore[attr-defined]
            size = state.size  # (B, N, 1) after the last layer, None if nothing merged
        sequence = outputs.last_hidden_state  # (B, N, C)
        pooled = size_weighted_mean(sequence[:, 1:], None if size is None else size[:, 1:])
        logits = self.classifier(pooled)  # type: ignore[attr-defined]
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)  # type: ignore[attr-defined]
        result = ImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict else result.to_tuple()


def _clip_classes() -> dict[str, Any]:
    from transformers.models.clip import modeling_clip as clip

    return {
        "models": (
            clip.CLIPVisionModel,
            clip.CLIPVisionModelWithProjection,
            clip.CLIPModel,
            clip.CLIPForImageClassification,
        ),
        "vision": (clip.CLIPVisionModel,),
        "layers": (clip.CLIPEncoderLayer,),
        "attentions": (clip.CLIPAttention,),
        "clip_model": clip.CLIPModel,
        "classifier": clip.CLIPForImageClassification,
    }


@register_adapter
class HFCLIPVisionAdapter(HFAdapterBase):
    """The vision tower of transformers CLIP models (text tower untouched)."""

    name = "hf-clip"
    model_names = ("openai/clip-vit-*", "laion/clip-vit-*")
    model_types = ("clip", "clip_vision_model")

    classes = staticmethod(_clip_classes)

    def patch(
        self, model: nn.Module, config: TurboConfig, explicit: frozenset[str] = frozenset()
    ) -> TurboHandle:
        classes = self.classes()
        vision = find_one(model, classes["vision"], "CLIPVisionModel")
        # by class inside the vision tower only: the text tower uses the same layer classes
        pairs = self.layer_pairs(vision, classes, "vision CLIPEncoderLayer")
        handle = make_handle(
            model, config, explicit, self.name, len(pairs), prefix_tokens=1, has_cls=True
        )
        if isinstance(model, classes["clip_model"]):
            top: type = _TurboCLIPModel
        elif isinstance(model, classes["classifier"]):
            top = _TurboCLIPClassifier
        else:
            top = TurboHFScope
        swap_hf_class(handle, model, top)
        if vision is not model:
            swap_hf_class(handle, vision, TurboHFScope)
        patch_layers(handle, pairs, _TurboCLIPEncoderLayer)
        return handle
