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

from ..attention import QKVLayout
from ..blocks import BlockSpec
from .tower import TowerAdapter, TowerFamily

__all__ = ["MHA_LAYOUT", "TORCHVISION_BLOCK", "TORCHVISION_VIT", "TorchvisionViTAdapter"]


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


def _plain_attention(model: nn.Module, tower: nn.Module, layers: list[nn.Module]) -> None:
    if any(b.self_attention.bias_k is not None or b.self_attention.add_zero_attn for b in layers):
        raise TypeError(
            "torchvision-vit supports EncoderBlock layers; this model has "
            "['MultiheadAttention with add_bias_kv/add_zero_attn']"
        )


_TV = "torchvision.models.vision_transformer:"

TORCHVISION_VIT = TowerFamily(
    name="torchvision-vit",
    model_names=(
        "vit_[bhl]_[0-9][0-9]",  # builders: vit_b_16, vit_l_32, vit_h_14
        "vit_[bhl]_[0-9][0-9]_weights*",  # ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1
        "torchvision/vit_[bhl]_[0-9][0-9]*",
    ),
    models=(_TV + "VisionTransformer",),
    tower=(_TV + "Encoder",),
    layers=(_TV + "EncoderBlock",),
    layer_path="layers",
    block=TORCHVISION_BLOCK,
    check=_plain_attention,
    scope_model=True,
)


class TorchvisionViTAdapter(TowerAdapter):
    """torchvision ``VisionTransformer`` (all sizes, ImageNet-1k and SWAG weights)."""

    family = TORCHVISION_VIT
