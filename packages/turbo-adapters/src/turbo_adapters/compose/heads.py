"""Finding attention modules and keeping their head attributes true to their weights.

Model-side pruning changes the widths of the q/k/v projections. Two kinds exist:

- **whole heads** (torch-pruning): the head width stays, the number of heads drops;
- **narrowed heads** (UPop): the number of heads stays, every head keeps the same
  subset of its channels in q, k and v, so the head width drops. The attention scale
  stays the dense model's ``1 / sqrt(head_dim)`` (UPop never rescales).

Libraries reshape q/k/v with attributes (timm ``num_heads``/``head_dim``/``attn_dim``,
transformers ``head_dim`` with ``-1`` heads), so after pruning those attributes must be
set from the weights. Turbo itself reads heads from the tensors and the head width
from ``head_dim``; :func:`set_head_shape` keeps both the library and Turbo right.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

__all__ = ["HeadShape", "attention_modules", "head_shape", "projection_width", "set_head_shape"]

_FUSED = "qkv"
_SPLIT = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_HEADS = ("num_heads", "num_attention_heads")
_SCALES = ("scale", "scaling")


@dataclasses.dataclass(frozen=True)
class HeadShape:
    """How one attention module's q/k/v are split into heads.

    Attributes:
        num_heads: heads per token.
        head_dim: channels per head in q, k and v.
        scale: the logit scale the module applies (None: the module has no attribute).
    """

    num_heads: int
    head_dim: int
    scale: float | None


def _split_names(module: nn.Module) -> tuple[str, str, str] | None:
    for names in _SPLIT:
        if all(isinstance(getattr(module, n, None), nn.Module) for n in names):
            return names
    return None


def _is_attention(module: nn.Module) -> bool:
    if not hasattr(module, "head_dim") or not any(hasattr(module, h) for h in _HEADS):
        return False
    return isinstance(getattr(module, _FUSED, None), nn.Module) or _split_names(module) is not None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every self-attention module with a ``head_dim`` and a fused or split q/k/v, by name.

    Covers timm ``Attention`` and transformers ViT/DeiT/DINOv2/CLIP/SigLIP attention
    (``qkv`` or ``q_proj``/``k_proj``/``v_proj``). BERT (``attention_head_size``, no
    ``head_dim``) is not covered.
    """
    return {name: m for name, m in model.named_modules() if _is_attention(m)}


def _out_features(linear: nn.Module) -> int:
    weight = getattr(linear, "weight", None)
    out = getattr(linear, "out_features", None)
    if out is None and weight is not None:
        out = weight.shape[0]
    if out is None:
        raise TypeError(f"cannot read the output width of {type(linear).__name__}")
    return int(out)


def projection_width(attention: nn.Module) -> int:
    """Channels of q (= of k = of v) that ``attention`` projects to, read from its modules."""
    fused = getattr(attention, _FUSED, None)
    if isinstance(fused, nn.Module):
        width = _out_features(fused)
        if width % 3:
            raise ValueError(f"{type(attention).__name__}.qkv has {width} outputs, not 3 x width")
        return width // 3
    names = _split_names(attention)
    if names is None:
        raise TypeError(f"{type(attention).__name__} has neither qkv nor q/k/v projections")
    widths = {_out_features(getattr(attention, n)) for n in names}
    if len(widths) != 1:
        raise ValueError(f"{type(attention).__name__}: q, k and v widths differ: {sorted(widths)}")
    return widths.pop()


def _heads_attr(attention: nn.Module) -> str:
    return next(h for h in _HEADS if hasattr(attention, h))


def head_shape(attention: nn.Module) -> HeadShape:
    """The module's current head attributes (as the library will reshape with them)."""
    scale = next((getattr(attention, s) for s in _SCALES if hasattr(attention, s)), None)
    return HeadShape(
        int(getattr(attention, _heads_attr(attention))),
        int(attention.head_dim),
        None if scale is None else float(scale),
    )


def set_head_shape(attention: nn.Module, *, keep: str) -> HeadShape:
    """Set ``attention``'s head attributes from its projection widths.

    Args:
        attention: a module found by :func:`attention_modules`.
        keep: ``"heads"`` for narrowed heads (UPop: the number of heads stays, head
            width = width / heads) or ``"head_dim"`` for whole-head pruning (the head
            width stays, heads = width / head width).

    The logit scale is never touched: it stays the dense model's. timm's fused path
    ignores ``attn.scale`` (it calls SDPA with the default ``1/sqrt(head_dim)``), so a
    narrowed timm attention is switched to its explicit path (``fused_attn = False``)
    where ``attn.scale`` is applied, as UPop computes it.
    """
    if keep not in ("heads", "head_dim"):
        raise ValueError(f"keep must be 'heads' or 'head_dim', got {keep!r}")
    width = projection_width(attention)
    before = head_shape(attention)
    if keep == "heads":
        heads = before.num_heads
        if width % heads:
            raise ValueError(
                f"{type(attention).__name__}: width {width} is not a multiple of its "
                f"{heads} heads (narrowed heads keep the same channels in every head)"
            )
        head_dim = width // heads
    else:
        head_dim = before.head_dim
        if width % head_dim:
            raise ValueError(
                f"{type(attention).__name__}: width {width} is not a multiple of head_dim "
                f"{head_dim} (whole-head pruning keeps the head width)"
            )
        heads = width // head_dim
    attention.head_dim = head_dim
    setattr(attention, _heads_attr(attention), heads)
    _sync_library_attrs(attention, heads, head_dim, narrowed=head_dim != before.head_dim)
    return head_shape(attention)


def _sync_library_attrs(attention: nn.Module, heads: int, head_dim: int, narrowed: bool) -> None:
    """Attributes some libraries derive from heads and head width."""
    extra: dict[str, Any] = {}
    if hasattr(attention, "attn_dim"):  # timm Attention reshapes its output with it
        extra["attn_dim"] = heads * head_dim
    if hasattr(attention, "all_head_size"):  # BERT-style self-attention
        extra["all_head_size"] = heads * head_dim
    if hasattr(attention, "attention_head_size"):
        extra["attention_head_size"] = head_dim
    if narrowed and hasattr(attention, "fused_attn"):
        extra["fused_attn"] = False  # timm: the fused path would use 1/sqrt(narrowed width)
    for name, value in extra.items():
        setattr(attention, name, value)
