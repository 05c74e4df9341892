"""transformers ``InternVLVisionModel`` (InternViT): tower merging with its CLS token.

InternViT blocks are pre-norm with layer scale (``lambda_1`` / ``lambda_2``) and send
attention through transformers' attention registry, so the block path is the shared
one; the CLS token is protected and guides (as on CLIP). InternVL reads the tower's
``last_hidden_state``, drops the CLS token and pixel-shuffles the full patch grid, so
the tower always hands its tokens back at full length (every original token gets its
merged token's value): merging saves the tower's compute, the language model still sees
the full count (reduce that with the connector stage of the ``internvl`` adapter).
"""

from __future__ import annotations

from ..blocks import BlockSpec
from .tower import TowerAdapter, TowerFamily

__all__ = ["INTERNVL_VISION", "INTERNVL_VISION_LAYER", "InternVLVisionAdapter"]

_IV = "transformers.models.internvl.modeling_internvl:"

#: ``InternVLVisionLayer``: pre-norm, layer scale as multiplying parameters.
INTERNVL_VISION_LAYER = BlockSpec(
    norm1="layernorm_before",
    attn="attention",
    ls1="lambda_1",
    norm2="layernorm_after",
    mlp="mlp",
    ls2="lambda_2",
    drop2="dropout",
)

INTERNVL_VISION = TowerFamily(
    name="hf-internvl-vision",
    model_names=("OpenGVLab/InternViT-*",),
    model_types=("internvl_vision",),
    models=(_IV + "InternVLVisionModel",),
    layers=(_IV + "InternVLVisionLayer",),
    block=INTERNVL_VISION_LAYER,
    restore=(_IV + "InternVLVisionModel",),
)


class InternVLVisionAdapter(TowerAdapter):
    """The InternViT vision tower (CLS guide, output restored to full length)."""

    family = INTERNVL_VISION
