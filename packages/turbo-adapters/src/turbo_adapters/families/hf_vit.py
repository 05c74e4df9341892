"""transformers ViT, DeiT and DINOv2 (models, classifiers, DeiT with teacher).

The attention modules keep projecting q/k/v themselves and call Turbo's function from
transformers' attention registry; the layers run on the block runner. Classifiers
that average patch tokens (DINOv2's ``[CLS, mean]``) get their backbone's tokens
restored to full length, so the library's own mean is the size-weighted mean.
"""

from __future__ import annotations

from torch import nn

from ..blocks import BlockSpec
from .tower import TowerAdapter, TowerFamily

__all__ = ["DINOV2", "DINOV2_LAYER", "HF_VIT", "HF_VIT_LAYER", "HFDinov2Adapter", "HFViTAdapter"]

_VIT = "transformers.models.vit.modeling_vit:"
_DEIT = "transformers.models.deit.modeling_deit:"
_DINOV2 = "transformers.models.dinov2.modeling_dinov2:"

#: ``ViTLayer`` / ``DeiTLayer``.
HF_VIT_LAYER = BlockSpec(
    norm1="layernorm_before",
    attn="attention",
    drop1="dropout",
    norm2="layernorm_after",
    mlp="mlp",
    drop2="dropout",
)
#: ``Dinov2Layer`` (layer scale, drop path, plain or SwiGLU MLP).
DINOV2_LAYER = BlockSpec(
    norm1="norm1",
    attn="attention",
    ls1="layer_scale1",
    drop1="drop_path",
    norm2="norm2",
    mlp="mlp",
    ls2="layer_scale2",
    drop2="drop_path",
)


def _cls_and_distillation(backbone: nn.Module) -> int:
    """CLS, plus DeiT's distillation token: both stay in front, never merged."""
    return 1 + int(getattr(backbone.embeddings, "distillation_token", None) is not None)


HF_VIT = TowerFamily(
    name="hf-vit",
    model_names=("google/vit-*", "facebook/deit-*"),
    model_types=("vit", "deit"),
    models=(
        _VIT + "ViTModel",
        _VIT + "ViTForImageClassification",
        _DEIT + "DeiTModel",
        _DEIT + "DeiTForImageClassification",
        _DEIT + "DeiTForImageClassificationWithTeacher",
    ),
    tower=(_VIT + "ViTModel", _DEIT + "DeiTModel"),
    layers=(_VIT + "ViTLayer", _DEIT + "DeiTLayer"),
    block=HF_VIT_LAYER,
    prefix=_cls_and_distillation,
    scope_model=True,
)

#: ``Dinov2Backbone`` (feature maps on the patch grid) is not supported: merged tokens
#: have no grid. The classifier averages the patch tokens: they come back at full length.
DINOV2 = TowerFamily(
    name="hf-dinov2",
    model_names=("facebook/dinov2-*",),
    model_types=("dinov2",),
    models=(_DINOV2 + "Dinov2Model", _DINOV2 + "Dinov2ForImageClassification"),
    tower=(_DINOV2 + "Dinov2Model",),
    layers=(_DINOV2 + "Dinov2Layer",),
    block=DINOV2_LAYER,
    restore=(_DINOV2 + "Dinov2ForImageClassification",),
    scope_model=True,
)


class HFViTAdapter(TowerAdapter):
    """transformers ``ViTModel`` / ``ViTForImageClassification`` and the DeiT equivalents."""

    family = HF_VIT


class HFDinov2Adapter(TowerAdapter):
    """transformers ``Dinov2Model`` and ``Dinov2ForImageClassification``."""

    family = DINOV2
