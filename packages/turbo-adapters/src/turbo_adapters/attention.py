"""The one attention path: fused SDPA with the ``log(size)`` bias and an exact guide row.

Two doors lead into :func:`attend`:

- transformers 5 models whose attention modules call a function from the attention
  registry get a registered ``"turbo"`` function (:func:`use_turbo_attention`
  selects it on the sub-model's config); q, k and v arrive projected by the library.
- everything else describes its q/k/v layout once (:class:`QKVLayout`) and
  :func:`layout_attention` projects, attends and projects out.

Either way the projection modules are called (quantized Linear classes work) and
heads are read from the tensors (pruned heads, narrowed heads).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .patch import TurboPatch
from .site import ReductionSite, SiteCall

__all__ = [
    "TURBO_ATTENTION",
    "QKVLayout",
    "attend",
    "layout_attention",
    "use_turbo_attention",
]

#: The name of Turbo's function in transformers' attention registry.
TURBO_ATTENTION = "turbo"


def _model_mask(call: SiteCall, attn_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The model's own mask, where it still lines up with the sequence.

    With padding the reducer carries it as size-0 tokens (masked by ``log 0``), so the
    model's mask, built for the unmerged length, is dropped.
    """
    if attn_mask is None or call.state.padded:
        return None
    if attn_mask.shape[-1] != tokens or call.state.size is not None:
        raise ValueError(
            "attention_mask (attn_mask) is not supported while Turbo merges tokens: it would no "
            "longer line up with the merged sequence (padding is handled through token_mask)"
        )
    return attn_mask


def attend(
    site: ReductionSite,
    call: SiteCall,
    owner: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    attn_mask: torch.Tensor | None = None,
    want_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention over merged tokens; records ``owner``'s observation on the site.

    ``q, k, v`` are ``(B, H, N, D)``; returns ``(B, H, N, D)`` and the probabilities
    ``(B, H, N, N)`` when ``want_weights`` (materialised only then).
    """
    bias = call.reducer.attention_bias(call.state, q.dtype)
    mask = _model_mask(call, attn_mask, k.shape[2])
    if mask is not None and bias is not None:
        mask = _additive(mask, q.dtype) + bias
    elif bias is not None:
        mask = bias
    weights = None
    if want_weights:
        scale_ = q.shape[-1] ** -0.5 if scale is None else scale
        logits = (q @ k.transpose(-2, -1)) * scale_
        if mask is not None:
            logits = logits + _additive(mask, q.dtype)
        weights = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = F.dropout(weights, p=dropout_p, training=dropout_p > 0) @ v
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    site.observe(call, owner, q, k, scale=scale)
    return out, weights


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, -math.inf
        )
    return mask.to(dtype)


# --------------------------------------------------------------- q/k/v layouts
@dataclasses.dataclass(frozen=True)
class QKVLayout:
    """Where an attention module keeps its q/k/v projections and what follows them.

    Attribute names refer to the attention module; None means the part is absent.
    Exactly one of ``fused`` (one Linear to ``[q, k, v]``) and ``split`` (three
    Linear layers) is set, or ``project`` gives a function for layouts without
    projection modules (``nn.MultiheadAttention``'s ``in_proj_weight``).

    Attributes:
        fused / split / project: the projections.
        qkv_biases: ``(q_bias, k_bias, v_bias)`` parameters added after a bias-free
            fused projection (EVA, BLIP-2); a None entry adds zeros.
        q_norm, k_norm: per-head norms applied to q and k.
        head_dim: attribute with the head width; heads are read from the tensor.
        num_heads: for modules without a head-width attribute (LAVIS, BLIP's original
            ViT): attribute with the head count; the width is read from the tensor.
        scale: attribute with the logit scale (default ``head_dim ** -0.5``).
        dropout: attribute with the attention dropout (an ``nn.Dropout`` or a float).
        out_norm, gate: timm's post-attention norm and sigmoid gate (from the input).
        out: the output projection; ``out_dropout`` the dropout after it.
        rotary: ``fn(module, q, k, call, **kwargs) -> (q, k)`` (RoPE), or None.
    """

    fused: str | None = None
    split: tuple[str, str, str] | None = None
    project: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]] | None = None
    qkv_biases: tuple[str | None, str | None, str | None] | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    head_dim: str = "head_dim"
    num_heads: str | None = None
    scale: str | None = "scale"
    dropout: str | None = None
    out_norm: str | None = None
    gate: str | None = None
    out: str = "proj"
    out_dropout: str | None = None
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        given = [x for x in (self.fused, self.split, self.project) if x is not None]
        if len(given) != 1:
            raise ValueError("a QKVLayout needs exactly one of fused, split or project")

    def check(self, module: nn.Module) -> None:
        """Raise a TypeError naming what ``module`` lacks."""
        names = [self.fused, *(self.split or ()), self.out, self.num_heads or self.head_dim]
        names += [n for n in (*(self.qkv_biases or ()), self.q_norm, self.k_norm) if n]
        missing = [n for n in names if n is not None and not hasattr(module, n)]
        if missing:
            raise TypeError(f"{type(module).__name__} has no {missing} (expected by its layout)")


def _part(module: nn.Module, name: str | None) -> Any:
    return None if name is None else getattr(module, name, None)


def project_qkv(module: nn.Module, layout: QKVLayout, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(B, N, C)`` -> q, k, v as ``(B, H, N, D)`` with H read from the tensors."""
    if layout.num_heads is not None:
        split = {"h": int(getattr(module, layout.num_heads))}
    else:
        split = {"d": int(getattr(module, layout.head_dim))}
    if layout.project is not None:
        flat = layout.project(module, x)
    elif layout.fused is not None:
        qkv = getattr(module, layout.fused)(x)  # (B, N, 3 * H * D)
        parts = [_part(module, n) for n in layout.qkv_biases or ()]
        if any(p is not None for p in parts):
            width = qkv.shape[-1] // 3
            bias = torch.cat([qkv.new_zeros(width) if p is None else p for p in parts])
            qkv = qkv + bias.to(qkv.dtype)
        flat = qkv.chunk(3, dim=-1)
    else:
        flat = tuple(getattr(module, name)(x) for name in layout.split)  # type: ignore[union-attr]
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", **split) for t in flat)
    norm_q, norm_k = _part(module, layout.q_norm), _part(module, layout.k_norm)
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


def _dropout_p(module: nn.Module, name: str | None) -> float:
    p = _part(module, name)
    if not module.training or p is None:
        return 0.0
    return float(p.p if isinstance(p, nn.Dropout) else p)


def layout_attention(
    module: nn.Module,
    layout: QKVLayout,
    x: torch.Tensor,
    site: ReductionSite,
    call: SiteCall,
    attn_mask: torch.Tensor | None = None,
    **rotary_kwargs: Any,
) -> torch.Tensor:
    """The attention sub-layer of ``module`` on Turbo's path: ``(B, N, C) -> (B, N, C)``."""
    q, k, v = project_qkv(module, layout, x)
    if layout.rotary is not None:
        q, k = layout.rotary(module, q, k, call, **rotary_kwargs)
    scale = _part(module, layout.scale)
    out, _ = attend(
        site, call, module, q, k, v,
        scale=None if scale is None else float(scale),
        dropout_p=_dropout_p(module, layout.dropout),
        attn_mask=attn_mask,
    )  # fmt: skip
    out = rearrange(out, "b h n d -> b n (h d)")
    norm = _part(module, layout.out_norm)
    if norm is not None:
        out = norm(out)
    gate = _part(module, layout.gate)
    if gate is not None:
        out = out * gate(x).sigmoid()
    out = getattr(module, layout.out)(out)
    drop = _part(module, layout.out_dropout)
    return out if drop is None else drop(out)


# ------------------------------------------------- transformers attention registry
# on each bound attention module: (the site it reports to, the implementation it had
# before). On the module, not in a global table, so it dies with the model and
# torch.compile guards on a plain attribute.
_BINDING = "_turbo_attention_site"
_registered = False


def _eager_of(module: nn.Module) -> Callable[..., Any]:
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")  # noqa: B009


def _turbo_attention_function(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function signature; ``(B, N, H, D)`` out, as they expect."""
    site, previous = module.__dict__.get(_BINDING, (None, "sdpa"))
    call = None if site is None else site.current()
    if call is None:
        # called outside a Turbo call (the module used on its own): what it did before
        from transformers import AttentionInterface

        fallback = AttentionInterface().get_interface(previous or "eager", _eager_of(module))
        return fallback(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    want = bool(kwargs.get("output_attentions", False))
    out, weights = attend(
        site, call, module, query, key, value,
        scale=scaling, dropout_p=dropout, attn_mask=attention_mask, want_weights=want,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), weights


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(TURBO_ATTENTION, _turbo_attention_function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(TURBO_ATTENTION, sdpa_mask)
    _registered = True


def use_turbo_attention(
    patch: TurboPatch, site: ReductionSite, attentions: list[nn.Module]
) -> None:
    """Route ``attentions`` (transformers 5 modules) through Turbo's registered function.

    Each module reads its implementation from its config at every call, and configs are
    shared (a sub-model's config by its whole tower, one config by several models), so
    the modules get the patch's own copy of their config with ``"turbo"`` selected: the
    shared config, and every other module and model reading it, is untouched.
    ``patch.remove()`` puts the original config back and unbinds the modules.
    """
    _register()
    for module in attentions:
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation_internal"):
            raise TypeError(
                f"{type(module).__name__} does not dispatch through transformers' attention "
                "registry (transformers >= 5 is required)"
            )
    own: dict[int, Any] = {}  # one copy per shared config: the modules still agree
    for module in attentions:
        config = module.config
        if id(config) not in own:
            own[id(config)] = copy.copy(config)
            own[id(config)]._attn_implementation_internal = TURBO_ATTENTION
        patch.set_attribute(module, _BINDING, (site, config._attn_implementation_internal))
        patch.set_attribute(module, "config", own[id(config)])
