"""torchvision ``VisionTransformer`` (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, SWAG).

``EncoderBlock`` runs ``nn.MultiheadAttention``; Turbo projects q/k/v from its
``in_proj`` (it has no projection modules to call), attends on the shared path and
calls the module's own ``out_proj``. The class token is token 0 and stays protected,
so the classifier's ``x[:, 0]`` reads the same token as without Turbo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbo_core import TurboConfig

from ..adapter import FamilyAdapter, model_defaults
from ..attention import QKVLayout
from ..blocks import BlockSpec, install_blocks, install_scope
from ..patch import TurboPatch
from ..site import ReductionSite

__all__ = ["MHA_LAYOUT", "TORCHVISION_BLOCK", "TorchvisionViTAdapter"]


def _mha_project(mha: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v ``(B, N, H * D)`` from ``nn.MultiheadAttention``'s input projection."""
    if mha._qkv_same_embed_dim:
        return F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))


#: ``nn.MultiheadAttention`` (batch first), default scale ``head_dim ** -0.5``.
MHA_LAYOUT = QKVLayout(project=_mha_project, scale=None, dropout="dropout", out="out_proj")
#: ``torchvision.models.vision_transformer.EncoderBlock``.
TORCHVISION_BLOCK = BlockSpec(
    norm1="ln_1", attn="self_attention", drop1="dropout", norm2="ln_2", mlp="mlp", layout=MHA_LAYOUT
)


class TorchvisionViTAdapter(FamilyAdapter):
    """torchvision ``VisionTransformer`` (all sizes, ImageNet-1k and SWAG weights)."""

    name = "torchvision-vit"
    model_names = (
        "vit_[bhl]_[0-9][0-9]",  # builders: vit_b_16, vit_l_32, vit_h_14
        "vit_[bhl]_[0-9][0-9]_weights*",  # ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1
        "torchvision/vit_[bhl]_[0-9][0-9]*",
    )
    model_classes = ("torchvision.models.vision_transformer", "VisionTransformer")

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        from torchvision.models.vision_transformer import EncoderBlock

        blocks = list(model.encoder.layers)
        problems = {type(b).__name__ for b in blocks if not isinstance(b, EncoderBlock)}
        problems |= {
            "MultiheadAttention with add_bias_kv/add_zero_attn"
            for b in blocks
            if isinstance(b, EncoderBlock)
            and (b.self_attention.bias_k is not None or b.self_attention.add_zero_attn)
        }
        if problems:
            raise TypeError(
                f"torchvision-vit supports EncoderBlock layers; this model has {sorted(problems)}"
            )
        site = patch.add_site(ReductionSite("vision", model_defaults(config, 1), len(blocks)))
        install_blocks(patch, site, blocks, TORCHVISION_BLOCK)
        install_scope(patch, site, model.encoder)
        install_scope(patch, site, model)
