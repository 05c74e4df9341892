"""timm ``Eva`` (EVA, EVA-02 and other Eva-class models, with or without RoPE).

Rotary embeddings are applied per position inside every attention, after tokens
have merged. A merged token gets the rotary embedding of one representative
original patch: the member closest to the centroid of the patches it stands for
(ties to the lowest index). Representatives come from source tracking, which the
site switches on by itself for models with RoPE.

Supported: ``EvaBlock`` with ``EvaAttention`` (fused or separate q/k/v, separate
q/v biases, qk-norm, scale-norm, gating, LayerScale, SwiGLU), RoPE types whose
embedding is one row per patch (``cat``, ``dinov3``) and the depth-dependent ``mixed``
type. Not supported: post-norm blocks, ``AttentionRope`` (grouped-query) blocks, and
patch dropout while training (its kept positions are not exposed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..blocks import BlockSpec
from ..patch import TurboPatch
from ..site import ReductionSite, SiteCall
from .timm_vit import (
    TIMM_ATTENTION,
    cls_or_mean,
    install_timm_pool,
    prefix_tokens,
    refuse_grad_checkpointing,
)
from .tower import TowerAdapter, TowerFamily

__all__ = [
    "EVA_FUSED",
    "EVA_SPLIT",
    "TIMM_EVA",
    "TimmEvaAdapter",
    "eva_block",
    "rope_representatives",
]

_GRID = "eva_grid"
_REPS = "eva_representatives"


def rope_representatives(
    source: torch.Tensor, prefix: int, num_slots: int, grid_width: int
) -> torch.Tensor:
    """The original patch whose rotary embedding each current patch token uses.

    Args:
        source: ``(B, N_original)`` current slot of every original token (prefix first).
        prefix: leading tokens without rotary embedding (CLS, registers); they never merge.
        num_slots: current number of non-prefix tokens.
        grid_width: patches per row of the original grid.

    Returns:
        ``(B, num_slots)`` int64 index into the original patches: for every slot, the
        member closest to the slot's centroid on the patch grid, ties to the lowest index.
    """
    slots = source[:, prefix:] - prefix  # (B, P)
    batch, patches = slots.shape
    index = torch.arange(patches, device=source.device)
    # integer arithmetic so that equal distances tie exactly: n^2 |c - mean|^2 = |n c - sum|^2
    coords = torch.stack([index // grid_width, index % grid_width], dim=-1)  # (P, 2)
    coords = coords.expand(batch, patches, 2)
    slot2 = slots.unsqueeze(-1).expand(batch, patches, 2)
    sums = coords.new_zeros(batch, num_slots, 2).scatter_add(1, slot2, coords)
    counts = slots.new_zeros(batch, num_slots).scatter_add(1, slots, torch.ones_like(slots))
    n = counts.gather(1, slots).unsqueeze(-1)  # (B, P, 1) size of each patch's slot
    dist = (n * coords - sums.gather(1, slot2)).square().sum(-1)  # (B, P), scaled by n^2
    best = torch.full_like(counts, torch.iinfo(torch.long).max).scatter_reduce(
        1, slots, dist, reduce="amin"
    )
    candidate = torch.where(dist == best.gather(1, slots), index, patches)
    return torch.full_like(counts, patches).scatter_reduce(1, slots, candidate, reduce="amin")


def _rope_rows(rope: torch.Tensor, call: SiteCall, prefix: int, num_slots: int) -> torch.Tensor:
    """``rope`` rows of the current patch tokens, ``(B or 1, H or 1, num_slots, D)``."""
    rope = rope.reshape((1,) * (4 - rope.dim()) + tuple(rope.shape))  # (B', H', P, D)
    state = call.state
    if state.size is None:  # nothing merged yet
        return rope
    cached = state.extras.get(_REPS)
    if cached is None or cached[0] is not state.source:
        grid_width = state.extras[_GRID][1]
        reps = rope_representatives(state.source, prefix, num_slots, grid_width)  # type: ignore[arg-type]
        cached = (state.source, reps)
        state.extras[_REPS] = cached
    reps = cached[1]  # (B, S)
    batch, heads, dim = reps.shape[0], rope.shape[1], rope.shape[-1]
    rope = rope.expand(batch, heads, -1, dim)
    return rope.gather(2, reps[:, None, :, None].expand(batch, heads, num_slots, dim))


def eva_rotary(
    module: nn.Module, q: torch.Tensor, k: torch.Tensor, call: SiteCall, rope: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """EvaAttention's RoPE on the patch tokens (prefix tokens carry none)."""
    if rope is None:
        return q, k
    from timm.layers import apply_rot_embed_cat

    npt = module.num_prefix_tokens
    rope = _rope_rows(rope, call, npt, q.shape[2] - npt)
    half = getattr(module, "rotate_half", False)
    rotated = [
        torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2)
        for t in (q, k)
    ]
    return rotated[0], rotated[1]


#: ``EvaAttention``: timm's attention layout plus separate q/v biases and RoPE, with one
#: fused ``qkv`` or split projections.
EVA_FUSED = dataclasses.replace(
    TIMM_ATTENTION, qkv_biases=("q_bias", "k_bias", "v_bias"), rotary=eva_rotary
)
EVA_SPLIT = dataclasses.replace(EVA_FUSED, fused=None, split=("q_proj", "k_proj", "v_proj"))


def eva_block(attention: nn.Module) -> BlockSpec:
    """The ``EvaBlock`` spec for this attention's projection layout."""
    return BlockSpec(
        norm1="norm1",
        attn="attn",
        ls1="gamma_1",
        drop1="drop_path1",
        norm2="norm2",
        mlp="mlp",
        ls2="gamma_2",
        drop2="drop_path2",
        layout=EVA_FUSED if getattr(attention, "qkv", None) is not None else EVA_SPLIT,
    )


def install_grid_recorder(patch: TurboPatch, site: ReductionSite, model: nn.Module) -> None:
    """Record the patch grid of each call (RoPE representatives need its width)."""

    def record_grid(original: Callable[..., Any], x: torch.Tensor, *args: Any, **kw: Any) -> Any:
        call = site.current()
        if call is not None:
            if model.training and model.patch_drop is not None and model.rope is not None:
                raise RuntimeError(
                    "timm-eva cannot merge under patch dropout with RoPE while training; "
                    "set patch_drop_rate=0 or call model.eval()"
                )
            embed = model.patch_embed
            grid = (
                embed.dynamic_feat_size(tuple(x.shape[-2:]))
                if model.dynamic_img_size
                else embed.grid_size
            )
            call.state.extras[_GRID] = tuple(grid)
        return original(x, *args, **kw)

    patch.override(model, "forward_features", record_grid)


TIMM_EVA = TowerFamily(
    name="timm-eva",
    # timm-vit claims eva_large_*, which timm builds as VisionTransformer
    model_names=("eva_*", "eva02_*", "timm/eva*"),
    models=("timm.models.eva:Eva",),
    layers=("timm.models.eva:EvaBlock",),
    layer_path="blocks",
    attention=("timm.models.eva:EvaAttention",),
    block=lambda first: eva_block(first.attn),
    prefix=prefix_tokens,
    guide=cls_or_mean,
    needs_source=lambda model: model.rope is not None,  # rotary rows of merged tokens
    # the scopes wrap the grid recorder, so it runs inside the call they open
    prepare=(
        lambda patch, site, model: refuse_grad_checkpointing(patch, model),
        install_grid_recorder,
    ),
    scopes=("forward_features", "forward"),
    finish=(lambda patch, site, model: install_timm_pool(patch, model),),
)


class TimmEvaAdapter(TowerAdapter):
    """timm ``Eva``: EVA, EVA-02 (RoPE, SwiGLU), and Eva-class ViTs with ``EvaBlock``.

    :meth:`install_tower` installs everything but the entry scopes, for models that
    embed an ``Eva`` and open the site's call themselves (MiniGPT-v2, only in tower mode).
    """

    family = TIMM_EVA
