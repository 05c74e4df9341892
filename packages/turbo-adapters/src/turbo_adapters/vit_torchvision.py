"""torchvision ``VisionTransformer`` (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, SWAG).

torchvision's ``EncoderBlock`` runs ``nn.MultiheadAttention``. The patched block
computes q, k, v itself from that module's ``in_proj`` weights (head count from
the module at run time), runs fused SDPA with the ``log(size)`` bias, applies the
module's own ``out_proj``, and merges after the attention residual and before
``ln_2``/MLP. The class token is token 0 and stays protected, so the classifier's
``x[:, 0]`` reads the same token as without Turbo.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from turbo_core import ReductionState, TurboConfig

from .common import fused_attention, is_instance, make_handle
from .handle import TurboHandle
from .registry import register_adapter

__all__ = ["TorchvisionViTAdapter"]


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H * D)`` -> ``(B, H, N, D)``."""
    batch, tokens, width = t.shape
    return t.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _multihead_self_attention(
    mha: nn.MultiheadAttention, x: torch.Tensor, handle: TurboHandle, state: ReductionState
) -> torch.Tensor:
    """``mha(x, x, x)`` for a batch-first ``(B, N, C)`` input, on fused attention with Turbo."""
    if mha._qkv_same_embed_dim:
        q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    else:
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
        q = F.linear(x, mha.q_proj_weight, biases[0])
        k = F.linear(x, mha.k_proj_weight, biases[1])
        v = F.linear(x, mha.v_proj_weight, biases[2])
    heads = mha.num_heads
    q, k, v = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    dropout = mha.dropout if mha.training else 0.0
    out = fused_attention(handle, state, q, k, v, None, dropout)  # (B, H, N, D)
    batch, _, tokens, _ = out.shape
    return mha.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class _TurboEncoderBlock:
    """Mixin for ``torchvision.models.vision_transformer.EncoderBlock``."""

    _turbo_handle: TurboHandle

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        handle = self._turbo_handle
        state = handle.current_state()
        if state is None:
            return super().forward(input)  # type: ignore[misc]
        if input.dim() != 3:
            raise ValueError(
                f"input must be 3-D (batch, tokens, channels), got shape {tuple(input.shape)}"
            )
        x = _multihead_self_attention(self.self_attention, self.ln_1(input), handle, state)
        x = self.dropout(x) + input
        x = handle.step(x, state)  # merge between the attention residual and the MLP
        return x + self.mlp(self.ln_2(x))


class _TurboScope:
    """Mixin for the model and its ``Encoder``: one reduction state per forward pass."""

    _turbo_handle: TurboHandle

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._turbo_handle.forward_scope():
            return super().forward(*args, **kwargs)  # type: ignore[misc]


@register_adapter
class TorchvisionViTAdapter:
    """torchvision ``VisionTransformer`` (all sizes, ImageNet-1k and SWAG weights)."""

    name = "torchvision-vit"
    model_names = (
        "vit_[bhl]_[0-9][0-9]",  # builders: vit_b_16, vit_l_32, vit_h_14
        "vit_[bhl]_[0-9][0-9]_weights*",  # ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1
        "torchvision/vit_[bhl]_[0-9][0-9]*",
    )
    model_types = ()

    def matches(self, model: nn.Module) -> bool:
        return is_instance(model, "torchvision.models.vision_transformer", "VisionTransformer")

    def patch(
        self, model: nn.Module, config: TurboConfig, explicit: frozenset[str] = frozenset()
    ) -> TurboHandle:
        from torchvision.models.vision_transformer import EncoderBlock

        blocks = list(model.encoder.layers)
        problems = sorted(
            {type(b).__name__ for b in blocks if not isinstance(b, EncoderBlock)}
            | {
                "MultiheadAttention with add_bias_kv/add_zero_attn"
                for b in blocks
                if isinstance(b, EncoderBlock)
                and (b.self_attention.bias_k is not None or b.self_attention.add_zero_attn)
            }
        )
        if problems:
            raise TypeError(
                f"torchvision-vit supports EncoderBlock layers; this model has {problems}"
            )
        handle = make_handle(
            model, config, explicit, self.name, len(blocks), prefix_tokens=1, has_cls=True
        )
        handle.swap_class(model, _TurboScope)
        handle.swap_class(model.encoder, _TurboScope)
        for block in blocks:
            handle.swap_class(block, _TurboEncoderBlock)
        return handle
