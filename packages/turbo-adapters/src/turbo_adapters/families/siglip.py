"""transformers SigLIP vision towers (``SiglipVisionModel``, ``SiglipModel``,
``SiglipForImageClassification``): tower merging without a CLS token.

SigLIP has no CLS token (nothing is protected), so the guide row is the mean query's
attention (``guide="mean"`` on the site). Tokens merge inside the encoder layers and are
handed back at full length at the encoder's output (every original token gets its merged
token's value), so ``post_layernorm``, the attention-pooling head and anything reading
``last_hidden_state`` (PaliGemma's projector) see the usual shapes, and the head's probe
attention over the copies is exactly the size-weighted (proportional) attention.
Only the vision tower is patched; a ``SiglipModel``'s text tower is untouched.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from turbo_core import TurboConfig

from ..adapter import model_defaults
from ..blocks import install_scope
from ..patch import TurboPatch
from ..site import ReductionSite
from .clip import CLIP_LAYER
from .hf_base import HFAdapter, find_one, install_hf_layers

__all__ = ["SiglipVisionAdapter"]


class SiglipVisionAdapter(HFAdapter):
    """The vision tower of transformers SigLIP models (mean-query guide, restored output)."""

    name = "hf-siglip"
    model_names = ("google/siglip-*", "google/siglip-so400m-*")
    model_types = ("siglip", "siglip_vision_model")
    models = (
        "transformers.models.siglip.modeling_siglip:SiglipVisionModel",
        "transformers.models.siglip.modeling_siglip:SiglipModel",
        "transformers.models.siglip.modeling_siglip:SiglipForImageClassification",
    )

    def classes(self) -> dict[str, Any]:
        from transformers.models.siglip import modeling_siglip as sg

        return {
            "tower": (sg.SiglipVisionModel,),
            "layers": (sg.SiglipEncoderLayer,),
            "encoder": (sg.SiglipEncoder,),
        }

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        classes = self.classes()
        # a SiglipModel's text tower has the same encoder classes: search the vision side
        vision = model if isinstance(model, classes["tower"]) else model.vision_model
        encoder = find_one(vision, classes["encoder"], "SigLIP vision encoder")
        layers = [m for m in encoder.modules() if isinstance(m, classes["layers"])]
        site = ReductionSite(
            "vision", model_defaults(config, 0), len(layers), guide="mean", needs_source=True
        )
        patch.add_site(site)
        install_hf_layers(patch, site, layers, CLIP_LAYER)
        install_scope(patch, site, encoder, restore=True)
