"""Structured pruning before Turbo: whole heads and MLP channels, or UPop-style narrowed heads.

- :func:`prune_heads_and_mlp` runs torch-pruning (magnitude importance) on the q/k/v
  projections (whole heads) and the first MLP Linear (hidden channels) of every block;
  the residual width, the embeddings and the classifier stay.
- :func:`narrow_heads` keeps, in every attention, the same subset of channels in all
  heads and in q, k and v (UPop's structure: ``num_heads`` stays, the head width
  shrinks, the scale stays the dense ``1/sqrt(head_dim)``), with a width per layer;
  optionally the MLP hidden width too. Channels are chosen by weight magnitude (UPop
  learns them; the structure, which is what Turbo must handle, is the same).

Both leave plain ``nn.Linear`` layers of new shapes, fix the head attributes
(:mod:`.heads`) and can be quantized and patched afterwards. Before changing anything
they check that the library's own attention runs the new head shape
(:func:`.heads.check_runnable`): a pruned model must still run unpatched, so that
``patch.remove()`` gives back a working model. transformers' BLIP and BLIP-2 vision
attention cannot (it splits q/k/v with its input width), so for them only the MLP
channels can be pruned; asking for heads raises a ``TypeError`` saying so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .heads import (
    OUT_PROJECTIONS,
    attention_modules,
    check_runnable,
    head_shape,
    projection_width,
    set_head_shape,
)

__all__ = ["mlp_pairs", "narrow_heads", "prune_heads_and_mlp"]


def mlp_pairs(model: nn.Module) -> dict[str, tuple[nn.Linear, nn.Linear]]:
    """Every MLP as ``(fc1, fc2)`` Linear layers (timm, transformers ViT/CLIP/DINOv2), by name."""
    pairs = {}
    for name, module in model.named_modules():
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
            pairs[name] = (fc1, fc2)
    return pairs


def _qkv_linears(attention: nn.Module) -> list[nn.Linear]:
    fused = getattr(attention, "qkv", None)
    if isinstance(fused, nn.Linear):
        return [fused]
    for names in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
        found = [getattr(attention, n, None) for n in names]
        if all(isinstance(f, nn.Linear) for f in found):
            return found  # type: ignore[return-value]
    raise TypeError(f"{type(attention).__name__}: q/k/v projections are not nn.Linear")


def _check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def prune_heads_and_mlp(
    model: nn.Module,
    example_inputs: Any,
    *,
    head_ratio: float = 0.3,
    mlp_ratio: float = 0.3,
) -> dict[str, int]:
    """Remove whole heads and MLP hidden channels in place with torch-pruning.

    Args:
        model: a ViT-like model whose attention modules :func:`.heads.attention_modules`
            finds and whose MLPs have ``fc1``/``fc2``.
        example_inputs: what ``model`` is called with (torch-pruning traces one call).
        head_ratio: fraction of heads removed per attention, in [0, 1).
        mlp_ratio: fraction of MLP hidden channels removed per block, in [0, 1).

    Returns:
        the number of heads each attention kept, by module name.

    Raises:
        TypeError: before anything is pruned, if an attention's own forward cannot run
            fewer heads (transformers' BLIP and BLIP-2 vision attention: prune their
            MLP channels only, ``head_ratio=0``).
    """
    import torch_pruning as tp

    head_ratio = _check_ratio("head_ratio", head_ratio)
    mlp_ratio = _check_ratio("mlp_ratio", mlp_ratio)
    attentions = attention_modules(model)
    pairs = mlp_pairs(model)
    if not attentions:
        raise TypeError(
            f"found no attention module with q/k/v projections in {type(model).__name__}"
        )
    num_heads = {}
    kept_shapes = {}
    for name, attention in attentions.items():
        heads = projection_width(attention) // int(attention.head_dim)
        if head_ratio > 0:  # else q/k/v are left out: torch-pruning would still group them
            num_heads.update({linear: heads for linear in _qkv_linears(attention)})
        # torch-pruning removes ceil(ratio x heads) heads of every attention
        kept = max(heads - math.ceil(head_ratio * heads), 1)
        kept_shapes[name] = (kept, int(attention.head_dim))
    check_runnable(attentions, kept_shapes)
    roots = set(num_heads) | {fc1 for fc1, _ in pairs.values()}
    # every other layer is ignored, so neither the residual width nor the head changes
    ignored = [
        m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in roots
    ]
    ratios = {fc1: mlp_ratio for fc1, _ in pairs.values()}
    # a q/k/v group prunes whole heads (head_ratio), never channels within a head
    ratios.update({linear: head_ratio for linear in num_heads})
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=0.0,
        pruning_ratio_dict=ratios,
        num_heads=num_heads,
        prune_num_heads=head_ratio > 0,
        prune_head_dims=False,
        head_pruning_ratio=head_ratio,
        ignored_layers=ignored,
    )
    pruner.step()
    return {name: set_head_shape(a, keep="head_dim").num_heads for name, a in attentions.items()}


def _per_layer(name: str, value: float | Sequence[float], count: int) -> list[float]:
    values = [value] * count if isinstance(value, (int, float)) else list(value)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} layers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
            raise ValueError(f"{name} entries must be fractions in (0, 1], got {v!r}")
    return [float(v) for v in values]


def _require_plain(linear: nn.Module) -> None:
    if type(linear) is not nn.Linear or type(linear.weight) is not nn.Parameter:
        raise TypeError(
            f"narrowing needs plain nn.Linear layers (prune before quantizing), got "
            f"{type(linear).__name__} with a {type(getattr(linear, 'weight', None)).__name__} weight"
        )


def _sliced(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    _require_plain(linear)
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _narrowed_width(attention: nn.Module, fraction: float) -> int:
    """The head width ``attention`` keeps; checks it can be narrowed (nothing changes)."""
    for norm in ("q_norm", "k_norm"):
        if getattr(getattr(attention, norm, None), "weight", None) is not None:
            raise TypeError(
                f"{type(attention).__name__}: narrowing heads with {norm} is not supported"
            )
    shape = head_shape(attention)
    width = projection_width(attention)
    if shape.num_heads * shape.head_dim != width:
        raise ValueError(
            f"{type(attention).__name__}: {shape.num_heads} heads x {shape.head_dim} != width {width}"
        )
    for linear in _qkv_linears(attention):
        _require_plain(linear)
    return max(1, round(shape.head_dim * fraction))


def _narrow_attention(attention: nn.Module, keep: int) -> None:
    """Keep ``keep`` channels of every head (the same ones in all heads and in q, k, v)."""
    shape = head_shape(attention)
    heads, head_dim = shape.num_heads, shape.head_dim
    if keep == head_dim:
        return
    width = projection_width(attention)
    linears = _qkv_linears(attention)
    # importance of channel c: its rows in q, k and v, over all heads
    if len(linears) == 1:
        rows = linears[0].weight.detach().float().reshape(3, heads, head_dim, -1)
    else:
        rows = torch.stack(
            [lin.weight.detach().float().reshape(heads, head_dim, -1) for lin in linears]
        )
    score = rows.pow(2).sum(dim=(0, 1, 3))
    chosen = score.topk(keep).indices.sort().values
    index = (torch.arange(heads).unsqueeze(1) * head_dim + chosen).flatten()
    if len(linears) == 1:  # fused [q, k, v]
        fused_index = torch.cat([index + i * width for i in range(3)])
        attention.qkv = _sliced(linears[0], fused_index, None)
    else:
        names = [n for n, m in attention.named_children() if m in linears]
        for name in names:
            setattr(attention, name, _sliced(getattr(attention, name), index, None))
    out_name = next(n for n in OUT_PROJECTIONS if hasattr(attention, n))
    setattr(attention, out_name, _sliced(getattr(attention, out_name), None, index))
    set_head_shape(attention, keep="heads")


def _narrow_mlp(fc1: nn.Linear, fc2: nn.Linear, fraction: float) -> tuple[nn.Linear, nn.Linear]:
    _require_plain(fc1)
    _require_plain(fc2)
    hidden = fc1.out_features
    keep = max(1, round(hidden * fraction))
    score = fc1.weight.detach().float().norm(dim=1) * fc2.weight.detach().float().norm(dim=0)
    chosen = score.topk(keep).indices.sort().values
    return _sliced(fc1, chosen, None), _sliced(fc2, None, chosen)


def narrow_heads(
    model: nn.Module,
    keep: float | Sequence[float] = 0.5,
    *,
    mlp_keep: float | Sequence[float] | None = None,
) -> dict[str, int]:
    """UPop-style pruning in place: narrower heads (same channels in every head), per layer.

    Args:
        model: a ViT-like model (timm, transformers ViT/DeiT/DINOv2/CLIP).
        keep: fraction of each head's channels kept, in (0, 1]; one value or one per
            attention module (in model order).
        mlp_keep: fraction of MLP hidden channels kept, one value or one per MLP; None
            leaves the MLPs dense.

    Returns:
        the head width each attention kept, by module name. The number of heads and the
        logit scale are unchanged.

    Raises:
        TypeError: before anything changes, for quantized layers, ``q_norm``/``k_norm``,
            or an attention whose own forward cannot run narrower heads (transformers'
            BLIP and BLIP-2 vision attention: narrow their MLPs only, ``keep=1.0``).
    """
    attentions = attention_modules(model)
    if not attentions:
        raise TypeError(
            f"found no attention module with q/k/v projections in {type(model).__name__}"
        )
    fractions = _per_layer("keep", keep, len(attentions))
    kept = {
        name: _narrowed_width(a, f)
        for (name, a), f in zip(attentions.items(), fractions, strict=True)
    }
    pairs = mlp_pairs(model) if mlp_keep is not None else {}
    if mlp_keep is not None and not pairs:
        raise TypeError(f"mlp_keep given, but {type(model).__name__} has no fc1/fc2 MLP")
    mlp_fractions = [] if mlp_keep is None else _per_layer("mlp_keep", mlp_keep, len(pairs))
    for fc1, fc2 in pairs.values():
        _require_plain(fc1)
        _require_plain(fc2)
    check_runnable(
        attentions, {name: (head_shape(a).num_heads, kept[name]) for name, a in attentions.items()}
    )
    # everything is checked: from here on the model changes
    for name, attention in attentions.items():
        _narrow_attention(attention, kept[name])
    for (name, (fc1, fc2)), fraction in zip(pairs.items(), mlp_fractions, strict=True):
        mlp = model.get_submodule(name)
        mlp.fc1, mlp.fc2 = _narrow_mlp(fc1, fc2, fraction)
    return kept
