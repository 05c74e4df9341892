"""timm ``VisionTransformer`` (ViT, DeiT, AugReg, DINO, registers, LayerScale, qk-norm, gating).

One site over ``model.blocks``; every ``Block`` runs on the block runner with timm's
attention layout; ``forward``/``forward_features`` open the call; ``pool`` averages by
size (``avg``/``avgmax``) with the sizes that came out of ``forward_features``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from turbo_core import TurboConfig

from ..adapter import FamilyAdapter, model_defaults
from ..attention import QKVLayout
from ..blocks import BlockSpec, install_blocks, install_scope, size_weighted_mean, token_sizes
from ..patch import TurboPatch
from ..site import ReductionSite

__all__ = ["TIMM_ATTENTION", "TIMM_BLOCK", "TimmViTAdapter", "install_timm_pool"]

#: ``timm.layers.Attention``: fused qkv, qk-norm, scale-norm, optional gate.
TIMM_ATTENTION = QKVLayout(
    fused="qkv",
    q_norm="q_norm",
    k_norm="k_norm",
    dropout="attn_drop",
    out_norm="norm",
    gate="gate",
    out="proj",
    out_dropout="proj_drop",
)
#: ``timm.models.vision_transformer.Block``.
TIMM_BLOCK = BlockSpec(
    norm1="norm1",
    attn="attn",
    ls1="ls1",
    drop1="drop_path1",
    norm2="norm2",
    mlp="mlp",
    ls2="ls2",
    drop2="drop_path2",
    layout=TIMM_ATTENTION,
)


def install_timm_pool(patch: TurboPatch, model: nn.Module) -> None:
    """Average pooling weighted by how many patches each token stands for."""

    def pool(original: Callable[..., Any], x: torch.Tensor, pool_type: str | None = None) -> Any:
        pool_type = model.global_pool if pool_type is None else pool_type
        size = token_sizes(x)
        if size is None or model.attn_pool is not None or pool_type not in ("avg", "avgmax"):
            return original(x, pool_type)
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        tokens = x[:, start:]
        mean = size_weighted_mean(tokens, size[:, start:])
        return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)

    patch.override(model, "pool", pool)


def refuse_grad_checkpointing(patch: TurboPatch, model: nn.Module) -> None:
    """timm checkpoints ``model.blocks`` as a sequence, past the blocks' own forwards."""

    def forward_features(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
            raise RuntimeError(
                "Turbo does not support grad_checkpointing; call "
                "model.set_grad_checkpointing(False) or run under torch.no_grad()"
            )
        return original(*args, **kwargs)

    patch.override(model, "forward_features", forward_features)


class TimmViTAdapter(FamilyAdapter):
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
    model_classes = ("timm.models.vision_transformer", "VisionTransformer")

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        blocks = list(model.blocks)
        odd = {type(b).__name__ for b in blocks if not isinstance(b, Block)}
        odd |= {type(b.attn).__name__ for b in blocks if not isinstance(b.attn, Attention)}
        if odd:
            raise TypeError(f"timm-vit supports Block with Attention; this model has {sorted(odd)}")
        config = model_defaults(config, int(model.num_prefix_tokens))
        guide = "cls" if model.cls_token is not None else "mean"
        site = patch.add_site(ReductionSite("vision", config, len(blocks), guide=guide))
        install_blocks(patch, site, blocks, TIMM_BLOCK)
        refuse_grad_checkpointing(patch, model)
        install_scope(patch, site, model, "forward_features")
        install_scope(patch, site, model, "forward")
        install_timm_pool(patch, model)
