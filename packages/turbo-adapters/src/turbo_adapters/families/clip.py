"""transformers CLIP vision tower (``CLIPVisionModel``, ``...WithProjection``, ``CLIPModel``).

Only the vision tower is patched; in a ``CLIPModel`` the text tower (same layer
classes, its own config) is untouched: its layers are found by class inside the vision
tower only. ``pre_layrnorm`` runs before the first layer, so the tokens that merge are
the normalised ones; the pooled output is ``post_layernorm`` of token 0, the protected
CLS. ``CLIPForImageClassification`` averages patch tokens: its tower hands them back at
full length, so that mean is the size-weighted mean.
"""

from __future__ import annotations

from ..blocks import BlockSpec
from .tower import TowerAdapter, TowerFamily

__all__ = ["CLIP", "CLIP_LAYER", "HFCLIPVisionAdapter"]

_CLIP = "transformers.models.clip.modeling_clip:"

#: ``CLIPEncoderLayer`` (also SigLIP-style towers with the same names).
CLIP_LAYER = BlockSpec(norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", mlp="mlp")

CLIP = TowerFamily(
    name="hf-clip",
    model_names=("openai/clip-vit-*", "laion/clip-vit-*"),
    model_types=("clip", "clip_vision_model"),
    models=(
        _CLIP + "CLIPVisionModel",
        _CLIP + "CLIPVisionModelWithProjection",
        _CLIP + "CLIPModel",
        _CLIP + "CLIPForImageClassification",
    ),
    tower=(_CLIP + "CLIPVisionModel",),
    layers=(_CLIP + "CLIPEncoderLayer",),
    block=CLIP_LAYER,
    restore=(_CLIP + "CLIPForImageClassification",),
)


class HFCLIPVisionAdapter(TowerAdapter):
    """The vision tower of transformers CLIP models (text tower untouched)."""

    family = CLIP
