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

import copy
import dataclasses
import itertools
from typing import Any

import torch
from torch import nn

__all__ = [
    "HeadShape",
    "attention_modules",
    "check_runnable",
    "head_shape",
    "library_error",
    "planned_shape",
    "projection_width",
    "set_head_shape",
]

_FUSED = "qkv"
_SPLIT = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
OUT_PROJECTIONS = ("proj", "o_proj", "out_proj", "projection")
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


def planned_shape(attention: nn.Module, width: int, *, keep: str) -> tuple[int, int]:
    """``(num_heads, head_dim)`` for q/k/v projections of ``width`` channels.

    Args:
        keep: ``"heads"`` (the number of heads stays) or ``"head_dim"`` (the head width
            stays); see :func:`set_head_shape`.

    Raises:
        ValueError: for an unknown ``keep`` or a width that does not split that way.
    """
    if keep not in ("heads", "head_dim"):
        raise ValueError(f"keep must be 'heads' or 'head_dim', got {keep!r}")
    before = head_shape(attention)
    if keep == "heads":
        heads = before.num_heads
        if width % heads:
            raise ValueError(
                f"{type(attention).__name__}: width {width} is not a multiple of its "
                f"{heads} heads (narrowed heads keep the same channels in every head)"
            )
        return heads, width // heads
    if width % before.head_dim:
        raise ValueError(
            f"{type(attention).__name__}: width {width} is not a multiple of head_dim "
            f"{before.head_dim} (whole-head pruning keeps the head width)"
        )
    return width // before.head_dim, before.head_dim


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
    before = head_shape(attention)
    heads, head_dim = planned_shape(attention, projection_width(attention), keep=keep)
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


# ------------------------------------------------ can the library run a new head shape?
#: Why a library's attention cannot run changed heads, where the reason is known.
_KNOWN_REASONS = {
    name: (
        f"transformers' {name} splits q/k/v into num_heads pieces of (input width // "
        "num_heads) channels, so it runs only num_heads x head_dim == hidden_size; "
        "no attribute changes that"
    )
    for name in ("BlipAttention", "Blip2Attention", "InstructBlipAttention")
}


def _meta_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on the meta device (no data)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        twin = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            twin = nn.Parameter(twin, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = twin
    return copy.deepcopy(module, memo)


def _meta_linear(like: nn.Module, in_features: int, out_features: int) -> nn.Linear:
    bias = getattr(like, "bias", None) is not None
    return nn.Linear(in_features, out_features, bias=bias, device="meta")


def library_error(attention: nn.Module, num_heads: int, head_dim: int) -> str | None:
    """Why ``attention``'s own forward cannot run ``num_heads`` heads of ``head_dim``
    channels, or None if it can.

    The check runs the library's forward, on the meta device (no data, no weights
    copied), on a twin whose q/k/v and output projections have the new widths and
    whose head attributes are set as :func:`set_head_shape` sets them. Exactly one of
    ``num_heads`` and ``head_dim`` may differ from the module's current shape.
    """
    before = head_shape(attention)
    if (num_heads, head_dim) == (before.num_heads, before.head_dim):
        return None
    if num_heads != before.num_heads and head_dim != before.head_dim:
        raise ValueError("change either the number of heads or the head width, not both")
    twin = _meta_twin(attention)
    width = num_heads * head_dim
    fused = getattr(twin, _FUSED, None)
    names = [_FUSED] if isinstance(fused, nn.Module) else list(_split_names(twin) or ())
    if not names:
        raise TypeError(f"{type(attention).__name__} has neither qkv nor q/k/v projections")
    first = getattr(twin, names[0])
    inputs = int(getattr(first, "in_features", None) or first.weight.shape[1])
    for name in names:
        copies = 3 if name == _FUSED else 1
        setattr(twin, name, _meta_linear(getattr(twin, name), inputs, copies * width))
    out_name = next(
        (n for n in OUT_PROJECTIONS if isinstance(getattr(twin, n, None), nn.Module)), None
    )
    if out_name is not None:
        old = getattr(twin, out_name)
        setattr(twin, out_name, _meta_linear(old, width, _out_features(old)))
    set_head_shape(twin, keep="heads" if num_heads == before.num_heads else "head_dim")
    try:
        with torch.no_grad():
            twin(torch.zeros(1, 2, inputs, device="meta"))
    except Exception as error:  # any failure of the library's forward is the answer
        reason = _KNOWN_REASONS.get(type(attention).__name__)
        found = f"{type(error).__name__}: {error}".strip()
        return found if reason is None else f"{reason} ({found})"
    return None


def check_runnable(attentions: dict[str, nn.Module], shapes: dict[str, tuple[int, int]]) -> None:
    """Raise ``TypeError`` unless every attention's library forward runs its new shape.

    Pruning recipes call this before they change anything, so a model they refuse is
    left as it was, and a model they prune still runs unpatched (``patch.remove()``
    gives back a working model, and ``r = 0`` can be compared with it).

    Args:
        attentions: modules by name (:func:`attention_modules`).
        shapes: ``(num_heads, head_dim)`` each named module would get.
    """
    checked: dict[tuple[type, tuple[int, int], tuple[int, int]], str | None] = {}
    for name, shape in shapes.items():
        attention = attentions[name]
        before = head_shape(attention)
        key = (type(attention), (before.num_heads, before.head_dim), shape)
        if key not in checked:
            checked[key] = library_error(attention, *shape)
        error = checked[key]
        if error is not None:
            raise TypeError(
                f"{name} ({type(attention).__name__}) cannot run {shape[0]} heads x {shape[1]} "
                f"channels unpatched (it has {before.num_heads} x {before.head_dim}): {error}. "
                "Prune only the MLP channels of this model (head_ratio=0, or keep=1.0 with "
                "mlp_keep)"
            )
