"""transformers CLIP vision tower (``CLIPVisionModel``, ``...WithProjection``, ``CLIPModel``).

Only the vision tower is patched; in a ``CLIPModel`` the text tower (same layer
classes, its own config) is untouched. ``pre_layrnorm`` runs before the first layer,
so the tokens that merge are the normalised ones; the pooled output is
``post_layernorm`` of token 0, the protected CLS. ``CLIPForImageClassification``
averages patch tokens: its tower hands them back at full length, so that mean is the
size-weighted mean.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from turbo_core import TurboConfig

from ..adapter import model_defaults
from ..blocks import BlockSpec, install_scope
from ..patch import TurboPatch
from ..site import ReductionSite
from .hf_base import HFAdapter, find_one, install_hf_layers

__all__ = ["CLIP_LAYER", "HFCLIPVisionAdapter"]

#: ``CLIPEncoderLayer`` (also SigLIP-style towers with the same names).
CLIP_LAYER = BlockSpec(norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", mlp="mlp")


class HFCLIPVisionAdapter(HFAdapter):
    """The vision tower of transformers CLIP models (text tower untouched)."""

    name = "hf-clip"
    model_names = ("openai/clip-vit-*", "laion/clip-vit-*")
    model_types = ("clip", "clip_vision_model")

    def classes(self) -> dict[str, Any]:
        from transformers.models.clip import modeling_clip as clip

        return {
            "models": (
                clip.CLIPVisionModel,
                clip.CLIPVisionModelWithProjection,
                clip.CLIPModel,
                clip.CLIPForImageClassification,
            ),
            "tower": (clip.CLIPVisionModel,),
            "layers": (clip.CLIPEncoderLayer,),
            "classifier": (clip.CLIPForImageClassification,),
        }

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        classes = self.classes()
        tower = find_one(model, classes["tower"], "CLIP vision tower")
        # by class inside the vision tower only: the text tower uses the same layer classes
        layers = [m for m in tower.modules() if isinstance(m, classes["layers"])]
        pooled = isinstance(model, classes["classifier"])
        site = ReductionSite("vision", model_defaults(config, 1), len(layers), needs_source=pooled)
        patch.add_site(site)
        install_hf_layers(patch, site, layers, CLIP_LAYER)
        install_scope(patch, site, tower, restore=pooled)
