"""transformers BLIP-2 and InstructBLIP: the EVA ViT-g vision tower, reduced once per call.

The vision attention (fused ``qkv`` whose bias is ``q_bias, 0, v_bias``) dispatches
through transformers' attention registry, so Turbo's registered function receives q,
k and v from the library and the encoder layers run on the block runner. The tower's
config is a sub-config of its own: the Q-Former and the language model keep their
attention implementations.

Downstream needs no change: the Q-Former cross-attends from its 32 queries to however
many image tokens arrive (its all-ones image mask is built from the image length), so
the language model always receives ``num_query_tokens`` embeddings, and ``generate``
runs the vision tower once: the reduction happens once per call, never per decoding
step, for any batch size and beam count. The pooled output (ITC in
``Blip2ForImageTextRetrieval`` reads the Q-Former, not it) is the protected CLS.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from turbo_core import TurboConfig

from ..adapter import model_defaults
from ..blocks import BlockSpec, install_scope
from ..patch import TurboPatch
from ..site import ReductionSite
from .hf_vit import HFAdapter, find_one, install_hf_layers

__all__ = ["BLIP2_LAYER", "Blip2Adapter", "InstructBlipAdapter"]

#: ``Blip2EncoderLayer`` / ``InstructBlipEncoderLayer`` (pre-norm, registry attention).
BLIP2_LAYER = BlockSpec(norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", mlp="mlp")


class _VisionTowerAdapter(HFAdapter):
    """One site over the vision tower's encoder layers of a BLIP-2-style model."""

    tower_name = ""

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        classes = self.classes()
        tower = find_one(model, classes["tower"], self.tower_name)
        layers = list(tower.encoder.layers)
        odd = {type(layer).__name__ for layer in layers if not isinstance(layer, classes["layers"])}
        if not layers or odd:
            raise TypeError(
                f"{self.name} supports {self.tower_name} encoder layers, found {sorted(odd)}"
            )
        site = ReductionSite("vision", model_defaults(config, 1), len(layers))
        patch.add_site(site)
        install_hf_layers(patch, site, layers, BLIP2_LAYER)
        install_scope(patch, site, tower)


class Blip2Adapter(_VisionTowerAdapter):
    """``Blip2ForConditionalGeneration`` (OPT and T5 language models), ``Blip2Model``,
    ``Blip2ForImageTextRetrieval``, ``Blip2VisionModel`` (``...WithProjection``)."""

    name = "hf-blip2"
    model_names = ("Salesforce/blip2-*", "blip2-*")
    model_types = ("blip-2", "blip_2", "blip2", "blip_2_vision_model")
    tower_name = "Blip2VisionModel"

    def classes(self) -> dict[str, Any]:
        from transformers.models.blip_2 import modeling_blip_2 as blip2

        return {
            "models": (
                blip2.Blip2ForConditionalGeneration,
                blip2.Blip2Model,
                blip2.Blip2ForImageTextRetrieval,
                blip2.Blip2VisionModel,
                blip2.Blip2VisionModelWithProjection,
            ),
            "tower": (blip2.Blip2VisionModel,),
            "layers": (blip2.Blip2EncoderLayer,),
        }


class InstructBlipAdapter(_VisionTowerAdapter):
    """``InstructBlipForConditionalGeneration``, ``InstructBlipModel``, ``InstructBlipVisionModel``."""

    name = "hf-instructblip"
    model_names = ("Salesforce/instructblip-*", "instructblip-*")
    model_types = ("instructblip", "instructblip_vision_model")
    tower_name = "InstructBlipVisionModel"

    def classes(self) -> dict[str, Any]:
        from transformers.models.instructblip import modeling_instructblip as iblip

        return {
            "models": (
                iblip.InstructBlipForConditionalGeneration,
                iblip.InstructBlipModel,
                iblip.InstructBlipVisionModel,
            ),
            "tower": (iblip.InstructBlipVisionModel,),
            "layers": (iblip.InstructBlipEncoderLayer,),
        }
