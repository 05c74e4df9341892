"""timm VisionTransformer (ViT, DeiT, AugReg, DINO, registers, LayerScale, qk-norm).

The model's own modules and weights stay in place: the model, its ``Block`` s and
their ``Attention`` s get Turbo subclasses whose forward reads q/k/v from the
module's own layers, runs fused SDPA with the ``log(size)`` bias, and merges after
attention and before the MLP. Head counts come from the tensors at run time, so a
block whose Linear layers were quantized or pruned to fewer heads still works.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from turbo_core import TurboConfig

from .common import fused_attention, is_instance, make_handle, size_weighted_mean
from .handle import TurboHandle
from .registry import register_adapter

__all__ = ["TimmViTAdapter"]


class _TurboTimmAttention:
    """Mixin for ``timm.layers.Attention``."""

    _turbo_handle: TurboHandle

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        state = self._turbo_handle.current_state()
        if state is None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x)  # (B, N, 3 * H * D); H read from the tensor (pruned heads)
        heads = qkv.shape[-1] // (3 * self.head_dim)
        q, k, v = (
            qkv.reshape(batch, tokens, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop.p if self.training else 0.0
        x = fused_attention(self._turbo_handle, state, q, k, v, self.scale, dropout, attn_mask)
        x = x.transpose(1, 2).reshape(batch, tokens, heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class _TurboTimmBlock:
    """Mixin for ``timm.models.vision_transformer.Block``: merge between attention and MLP."""

    _turbo_handle: TurboHandle

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        handle = self._turbo_handle
        state = handle.current_state()
        if state is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        x = handle.step(x, state)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _TurboTimmVisionTransformer:
    """Mixin for the model: one reduction state per forward pass; pooling by size."""

    _turbo_handle: TurboHandle

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._turbo_handle.forward_scope():
            return super().forward(*args, **kwargs)  # type: ignore[misc]

    def forward_features(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "grad_checkpointing", False) and torch.is_grad_enabled():
            # checkpointing re-runs blocks during backward, outside this forward's state,
            # so the recomputed blocks would neither see the sizes nor merge
            raise RuntimeError(
                "Turbo does not support grad_checkpointing; call "
                "model.set_grad_checkpointing(False) or run under torch.no_grad()"
            )
        with self._turbo_handle.forward_scope():
            return super().forward_features(*args, **kwargs)  # type: ignore[misc]

    def _pool_sizes(self, x: torch.Tensor) -> torch.Tensor | None:
        """Sizes of the tokens in ``x``: this forward's, or the last forward's when the
        head runs on its own after ``forward_features`` (timm's usual split)."""
        handle = self._turbo_handle
        state = handle.current_state()
        if state is None or state.block_index == 0:
            state = handle.last_state
        size = None if state is None else state.size
        return size if size is not None and size.shape[:2] == x.shape[:2] else None

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self._pool_sizes(x)
        if size is None or self.attn_pool is not None or pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)  # type: ignore[misc]
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        tokens = x[:, start:]
        mean = size_weighted_mean(tokens, size[:, start:])
        return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)


@register_adapter
class TimmViTAdapter:
    """timm ``VisionTransformer`` and its DeiT/AugReg/DINO/register variants."""

    name = "timm-vit"
    # timm names start with a size word of two or more letters (vit_base_patch16_224);
    # torchvision's builders are vit_<letter>_<patch> (vit_b_16) and belong to torchvision-vit.
    model_names = (
        "vit_[!_][!_]*",
        "deit_*",
        "deit3_*",
        "flexivit_*",
        "eva_large_patch14_*",  # timm builds these with VisionTransformer, not Eva
        "timm/vit_*",
        "timm/deit*",
        "vit-*-timm",
    )
    model_types = ()

    def matches(self, model: nn.Module) -> bool:
        return is_instance(model, "timm.models.vision_transformer", "VisionTransformer")

    def patch(
        self, model: nn.Module, config: TurboConfig, explicit: frozenset[str] = frozenset()
    ) -> TurboHandle:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        blocks = list(model.blocks)
        unsupported = {type(b).__name__ for b in blocks if not isinstance(b, Block)}
        unsupported |= {
            type(b.attn).__name__
            for b in blocks
            if isinstance(b, Block) and not isinstance(b.attn, Attention)
        }
        if unsupported:
            raise TypeError(
                f"timm-vit supports Block with Attention; this model has {sorted(unsupported)}"
            )
        handle = make_handle(
            model,
            config,
            explicit,
            self.name,
            len(blocks),
            prefix_tokens=int(model.num_prefix_tokens),
            has_cls=model.cls_token is not None,
        )
        handle.swap_class(model, _TurboTimmVisionTransformer)
        for block in blocks:
            handle.swap_class(block, _TurboTimmBlock)
            handle.swap_class(block.attn, _TurboTimmAttention)
        return handle
