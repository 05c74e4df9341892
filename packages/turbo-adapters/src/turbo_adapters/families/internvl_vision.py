"""transformers ``InternVLVisionModel`` (InternViT): tower merging with its CLS token.

InternViT blocks are pre-norm with layer scale (``lambda_1`` / ``lambda_2``) and send
attention through transformers' attention registry, so the block path is the shared
one; the CLS token is protected and guides (as on CLIP). InternVL reads the tower's
``last_hidden_state``, drops the CLS token and pixel-shuffles the full patch grid, so
the tower always hands its tokens back at full length (every original token gets its
merged token's value): merging saves the tower's compute, the language model still sees
the full count (reduce that with the connector stage of the ``internvl`` adapter).

The same declaration gives the ``internvl`` adapter its ``"tower"`` stage
(:func:`install_internvl_tower`): inside an ``InternVLModel`` the tower merges only while
tower mode is active, and restores before the pixel shuffle.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from turbo_core import TurboConfig

from ..adapter import is_model_of
from ..blocks import BlockSpec, install_scope
from ..patch import TurboPatch
from .tower import TowerAdapter, TowerFamily

__all__ = [
    "INTERNVL_VISION",
    "INTERNVL_VISION_LAYER",
    "InternVLVisionAdapter",
    "install_internvl_tower",
    "internvl_tower_refusal",
]

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


def _feature_layer_refusal(layer: Any) -> str:
    return (
        f"InternVL reads vision_feature_layer={layer!r} from the tower's hidden states, "
        "which merged layers shorten (only the last hidden state is restored to the full "
        "grid its pixel shuffle needs); tower merging needs vision_feature_layer=-1"
    )


def internvl_tower_refusal(inner: nn.Module) -> str | None:
    """Why an ``InternVLModel``'s tower cannot merge (None: it can)."""
    tower = inner.vision_tower
    if not is_model_of(tower, INTERNVL_VISION.models):
        return f"the vision tower is a {type(tower).__name__}, not InternViT"
    layer = inner.config.vision_feature_layer
    if layer != -1:
        return _feature_layer_refusal(layer)
    return None


def install_internvl_tower(patch: TurboPatch, inner: nn.Module, config: TurboConfig) -> None:
    """Tower merging inside an ``InternVLModel``'s InternViT, active in tower mode only.

    ``patch`` is a vision-language patch (its ``active_modes()`` decide each call); the
    tower's output is restored to the full grid, so the pixel shuffle, the projector and
    the placeholder count are the unpatched model's. A call that reads another
    ``vision_feature_layer`` in tower mode raises (:func:`internvl_tower_refusal`).
    """
    tower = inner.vision_tower
    site = InternVLVisionAdapter().install_tower(patch, tower, config)

    def active() -> bool:
        return "tower" in patch.active_modes()  # type: ignore[attr-defined]

    install_scope(patch, site, tower, restore=True, when=active)

    def image_features(original: Any, *args: Any, **kwargs: Any) -> Any:
        if active():
            layer = (
                inspect.signature(original)
                .bind_partial(*args, **kwargs)
                .arguments.get("vision_feature_layer")
            )
            layer = inner.config.vision_feature_layer if layer is None else layer
            if layer != -1:
                raise ValueError(f"tower mode: {_feature_layer_refusal(layer)}")
        return original(*args, **kwargs)

    patch.override(inner, "get_image_features", image_features)
