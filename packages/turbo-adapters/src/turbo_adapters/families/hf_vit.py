"""transformers ViT, DeiT and DINOv2 (models, classifiers, DeiT with teacher).

The attention modules keep projecting q/k/v themselves and call Turbo's function from
transformers' attention registry; the layers run on the block runner. Classifiers
that average patch tokens (DINOv2's ``[CLS, mean]``) get their backbone's tokens
restored to full length, so the library's own mean is the size-weighted mean.
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

__all__ = ["DINOV2_LAYER", "HF_VIT_LAYER", "HFDinov2Adapter", "HFViTAdapter"]

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


class HFViTAdapter(HFAdapter):
    """transformers ``ViTModel`` / ``ViTForImageClassification`` and the DeiT equivalents."""

    name = "hf-vit"
    model_names = ("google/vit-*", "facebook/deit-*")
    model_types = ("vit", "deit")

    def classes(self) -> dict[str, Any]:
        from transformers.models.deit import modeling_deit as deit
        from transformers.models.vit import modeling_vit as vit

        return {
            "models": (
                vit.ViTModel,
                vit.ViTForImageClassification,
                deit.DeiTModel,
                deit.DeiTForImageClassification,
                deit.DeiTForImageClassificationWithTeacher,
            ),
            "backbones": (vit.ViTModel, deit.DeiTModel),
            "layers": (vit.ViTLayer, deit.DeiTLayer),
        }

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        classes = self.classes()
        backbone = find_one(model, classes["backbones"], "ViT/DeiT backbone")
        layers = [m for m in backbone.modules() if isinstance(m, classes["layers"])]
        # CLS, plus DeiT's distillation token: both stay in front, never merged
        prefix = 1 + int(getattr(backbone.embeddings, "distillation_token", None) is not None)
        site = patch.add_site(ReductionSite("vision", model_defaults(config, prefix), len(layers)))
        install_hf_layers(patch, site, layers, HF_VIT_LAYER)
        install_scope(patch, site, backbone)
        if backbone is not model:
            install_scope(patch, site, model)


class HFDinov2Adapter(HFAdapter):
    """transformers ``Dinov2Model`` and ``Dinov2ForImageClassification``.

    ``Dinov2Backbone`` (feature maps on the patch grid) is not supported: merged
    tokens have no grid.
    """

    name = "hf-dinov2"
    model_names = ("facebook/dinov2-*",)
    model_types = ("dinov2",)

    def classes(self) -> dict[str, Any]:
        from transformers.models.dinov2 import modeling_dinov2 as dinov2

        return {
            "models": (dinov2.Dinov2Model, dinov2.Dinov2ForImageClassification),
            "backbones": (dinov2.Dinov2Model,),
            "layers": (dinov2.Dinov2Layer,),
        }

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        classes = self.classes()
        backbone = find_one(model, classes["backbones"], "Dinov2Model")
        layers = [m for m in backbone.modules() if isinstance(m, classes["layers"])]
        pooled = backbone is not model  # the classifier averages the patch tokens
        site = ReductionSite("vision", model_defaults(config, 1), len(layers), needs_source=pooled)
        patch.add_site(site)
        install_hf_layers(patch, site, layers, DINOV2_LAYER)
        install_scope(patch, site, backbone, restore=pooled)
        if pooled:
            install_scope(patch, site, model)
