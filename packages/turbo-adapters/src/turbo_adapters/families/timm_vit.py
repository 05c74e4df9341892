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

from ..attention import QKVLayout
from ..blocks import BlockSpec, size_weighted_mean, token_sizes
from ..patch import TurboPatch
from .tower import TowerAdapter, TowerFamily

__all__ = ["TIMM_ATTENTION", "TIMM_BLOCK", "TIMM_VIT", "TimmViTAdapter", "install_timm_pool"]

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


def prefix_tokens(model: nn.Module) -> int:
    """CLS, distillation and register tokens of a timm model."""
    return int(model.num_prefix_tokens)


def cls_or_mean(model: nn.Module) -> str:
    """CLS guidance, or the mean for models without a class token."""
    return "cls" if model.cls_token is not None else "mean"


TIMM_VIT = TowerFamily(
    name="timm-vit",
    # timm names start with a size word of two or more letters (vit_base_patch16_224);
    # torchvision's builders are vit_<letter>_<patch> (vit_b_16) and belong to torchvision-vit.
    model_names=(
        "vit_[!_][!_]*",
        "deit_*",
        "deit3_*",
        "flexivit_*",
        "eva_large_patch14_*",  # timm builds these with VisionTransformer, not Eva
        "timm/vit_*",
        "timm/deit*",
        "vit-*-timm",
    ),
    models=("timm.models.vision_transformer:VisionTransformer",),
    layers=("timm.models.vision_transformer:Block",),
    layer_path="blocks",
    attention=("timm.layers:Attention",),
    block=TIMM_BLOCK,
    prefix=prefix_tokens,
    guide=cls_or_mean,
    prepare=(lambda patch, site, model: refuse_grad_checkpointing(patch, model),),
    scopes=("forward_features", "forward"),
    finish=(lambda patch, site, model: install_timm_pool(patch, model),),
)


class TimmViTAdapter(TowerAdapter):
    """timm ``VisionTransformer`` and its DeiT/AugReg/DINO/register variants."""

    family = TIMM_VIT
