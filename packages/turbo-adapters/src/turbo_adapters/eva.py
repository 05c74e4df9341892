"""timm ``Eva`` (EVA, EVA-02 and other Eva-class models, with or without RoPE).

Rotary embeddings are applied per position inside every attention, after tokens
have merged. A merged token gets the rotary embedding of one representative
original patch: the member closest to the centroid of the patches it stands for
(ties to the lowest index). Representatives come from source tracking, so the
adapter switches ``trace_source`` on for models with RoPE (unless set explicitly).

Supported: ``EvaBlock`` with ``EvaAttention`` (fused or separate q/k/v, qk-norm,
scale-norm, gating, LayerScale, SwiGLU), RoPE types whose embedding is one row per
patch (``cat``, ``dinov3``) and the depth-dependent ``mixed`` type. Not supported:
post-norm blocks, ``AttentionRope`` (grouped-query) blocks, and patch dropout
while training (its kept positions are not exposed).
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
from .vit_timm import _TurboTimmVisionTransformer

__all__ = ["TimmEvaAdapter", "rope_representatives"]

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


def _rope_for_tokens(rope: torch.Tensor, state: ReductionState, prefix: int, num_slots: int):
    """``rope`` rows of the current patch tokens, ``(B or 1, H or 1, num_slots, D)``."""
    rope = rope.reshape((1,) * (4 - rope.dim()) + tuple(rope.shape))  # (B', H', P, D)
    if state.size is None:  # nothing merged yet
        return rope
    if state.source is None:
        raise RuntimeError(
            "timm-eva needs trace_source=True to place rotary embeddings after merging; "
            "re-apply Turbo without trace_source=False"
        )
    cached = state.extras.get(_REPS)
    if cached is None or cached[0] is not state.source:
        grid_width = state.extras[_GRID][1]
        cached = (state.source, rope_representatives(state.source, prefix, num_slots, grid_width))
        state.extras[_REPS] = cached
    reps = cached[1]  # (B, S)
    batch, heads, dim = reps.shape[0], rope.shape[1], rope.shape[-1]
    rope = rope.expand(batch, heads, -1, dim)
    return rope.gather(2, reps[:, None, :, None].expand(batch, heads, num_slots, dim))


class _TurboEvaAttention:
    """Mixin for ``timm.models.eva.EvaAttention``."""

    _turbo_handle: TurboHandle

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        from timm.layers import apply_rot_embed_cat

        handle = self._turbo_handle
        state = handle.current_state()
        if state is None:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        if self.qkv is not None:
            bias = None
            if self.q_bias is not None:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias)  # heads read from the tensor (pruning)
            q, k, v = qkv.reshape(batch, tokens, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (
                proj(x).reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, D)
        if rope is not None:
            npt = self.num_prefix_tokens
            rope = _rope_for_tokens(rope, state, npt, tokens - npt)
            half = getattr(self, "rotate_half", False)
            rotate = lambda t: apply_rot_embed_cat(t[:, :, npt:], rope, half=half)  # noqa: E731
            q = torch.cat([q[:, :, :npt], rotate(q)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], rotate(k)], dim=2).type_as(v)
        dropout = self.attn_drop.p if self.training else 0.0
        x = fused_attention(handle, state, q, k, v, self.scale, dropout, attn_mask)
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class _TurboEvaBlock:
    """Mixin for ``timm.models.eva.EvaBlock``: merge between attention and MLP."""

    _turbo_handle: TurboHandle

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        handle = self._turbo_handle
        state = handle.current_state()
        if state is None:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        if is_causal:
            raise ValueError("is_causal is not supported while Turbo merges tokens")
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = handle.step(x + self.drop_path1(x_attn), state)
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return x + self.drop_path2(x_mlp)


class _TurboEva(_TurboTimmVisionTransformer):
    """Mixin for the model: the timm ViT scope and pooling, plus the patch grid for RoPE."""

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.training and self.patch_drop is not None and self.rope is not None:
            raise RuntimeError(
                "timm-eva cannot merge under patch dropout with RoPE while training; "
                "set patch_drop_rate=0 or call model.eval()"
            )
        with self._turbo_handle.forward_scope() as state:
            if self.dynamic_img_size:
                grid = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
            else:
                grid = self.patch_embed.grid_size
            state.extras[_GRID] = tuple(grid)
            return super().forward_features(x, *args, **kwargs)


@register_adapter
class TimmEvaAdapter:
    """timm ``Eva``: EVA, EVA-02 (RoPE, SwiGLU), and Eva-class ViTs with ``EvaBlock``."""

    name = "timm-eva"
    # timm-vit registers first and claims eva_large_*, which timm builds as VisionTransformer
    model_names = ("eva_*", "eva02_*", "timm/eva*")
    model_types = ()

    def matches(self, model: nn.Module) -> bool:
        return is_instance(model, "timm.models.eva", "Eva")

    def patch(
        self, model: nn.Module, config: TurboConfig, explicit: frozenset[str] = frozenset()
    ) -> TurboHandle:
        from timm.models.eva import EvaAttention, EvaBlock

        blocks = list(model.blocks)
        unsupported = {type(b).__name__ for b in blocks if type(b) is not EvaBlock}
        unsupported |= {
            type(b.attn).__name__
            for b in blocks
            if type(b) is EvaBlock and not isinstance(b.attn, EvaAttention)
        }
        if unsupported:
            raise TypeError(
                f"timm-eva supports EvaBlock with EvaAttention; this model has {sorted(unsupported)}"
            )
        prefix = int(model.num_prefix_tokens)
        if model.rope is not None:
            if "trace_source" not in explicit:
                config = config.replace(trace_source=True)
            if "protected" in explicit and config.protected < prefix:
                raise ValueError(
                    f"protected must be >= {prefix} (the model's prefix tokens, which carry "
                    f"no rotary embedding), got {config.protected}"
                )
        handle = make_handle(
            model,
            config,
            explicit,
            self.name,
            len(blocks),
            prefix_tokens=prefix,
            has_cls=model.cls_token is not None,
        )
        handle.swap_class(model, _TurboEva)
        for block in blocks:
            handle.swap_class(block, _TurboEvaBlock)
            handle.swap_class(block.attn, _TurboEvaAttention)
        return handle
