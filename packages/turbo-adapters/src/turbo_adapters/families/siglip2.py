"""transformers SigLIP2 vision towers (``Siglip2VisionModel``, ``Siglip2Model``,
``Siglip2ForImageClassification``): tower merging on NaFlex batches.

SigLIP2 has no CLS token: the guide row is the mean query's attention (as SigLIP).
NaFlex feeds every image at its own patch grid (``spatial_shapes``), padded to one
length and marked by ``pixel_attention_mask``. The tower's call is opened on
``Siglip2VisionModel.forward`` (the tower, also inside ``Siglip2Model`` and
``Siglip2ForImageClassification``) with that mask, and the site is a
:class:`~turbo_adapters.padded_site.PaddedRowsSite`: each padded row is reduced as if its
image ran alone at its own length (its own schedule, padding never merging, never a
partner, never attended by the guide). Batches without padding take the batched path.

The encoder hands its tokens back at full length (every real token gets its merged
token's value, padding positions what entered the encoder), so ``post_layernorm``, the
attention-pooling head (with its original mask) and ``Siglip2ForImageClassification``'s
masked mean see the usual shapes; the head's probe attention over the copies is the
size-weighted attention. Only the vision tower is patched; a ``Siglip2Model``'s text
tower (same layer classes) is untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from turbo_core import TurboConfig

from ..adapter import model_defaults
from ..blocks import install_scope
from ..padded_site import PaddedRowsSite, install_padded_restore
from ..patch import TurboPatch
from .clip import CLIP_LAYER
from .hf_base import HFAdapter, find_one, install_hf_layers

__all__ = ["Siglip2VisionAdapter"]

_S2 = "transformers.models.siglip2.modeling_siglip2:"


def _pixel_mask(
    pixel_values: Any = None, pixel_attention_mask: Any = None, *args: Any, **kwargs: Any
) -> torch.Tensor | None:
    """``(B, N)`` bool padding mask from ``Siglip2VisionModel.forward``'s arguments."""
    if pixel_attention_mask is None:
        pixel_attention_mask = kwargs.get("pixel_attention_mask")
    return None if pixel_attention_mask is None else pixel_attention_mask.to(torch.bool)


def _encoder_input(inputs_embeds: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    return inputs_embeds if inputs_embeds is not None else kwargs.get("inputs_embeds")


class Siglip2VisionAdapter(HFAdapter):
    """The vision tower of transformers SigLIP2 models (NaFlex padding handled per row)."""

    name = "hf-siglip2"
    model_names = ("google/siglip2-*",)
    model_types = ("siglip2", "siglip2_vision_model")
    models = (
        _S2 + "Siglip2VisionModel",
        _S2 + "Siglip2Model",
        _S2 + "Siglip2ForImageClassification",
    )

    def classes(self) -> dict[str, Any]:
        from transformers.models.siglip2 import modeling_siglip2 as s2

        return {
            "models": (s2.Siglip2VisionModel, s2.Siglip2Model, s2.Siglip2ForImageClassification),
            "tower": (s2.Siglip2VisionModel,),
            "layers": (s2.Siglip2EncoderLayer,),
        }

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        classes = self.classes()
        # the vision tower only: a Siglip2Model's text tower has the same layer class
        tower = find_one(model, classes["tower"], "SigLIP2 vision tower")
        encoder = tower.encoder
        layers = list(encoder.layers)
        odd = sorted({type(m).__name__ for m in layers if not isinstance(m, classes["layers"])})
        if odd or not layers:
            raise TypeError(f"hf-siglip2 supports Siglip2EncoderLayer; this model has {odd}")
        site = PaddedRowsSite(
            "vision", model_defaults(config, 0), len(layers), guide="mean", needs_source=True
        )
        patch.add_site(site)
        install_hf_layers(patch, site, layers, CLIP_LAYER)
        install_padded_restore(patch, site, encoder, _encoder_input)
        install_scope(patch, site, tower, token_mask=_pixel_mask)
