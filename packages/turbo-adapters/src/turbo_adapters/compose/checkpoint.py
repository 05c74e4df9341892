"""Pruned checkpoints: plain state dicts whose Linear shapes differ from the dense config.

UPop (and torch-pruning users) save ``model.state_dict()`` of the pruned model; the
model class is then built from the *dense* config and cannot ``load_state_dict`` it.
:func:`load_pruned` does what UPop's loader does: resize every Linear (and LayerNorm)
from the shapes in the state dict, then sets each attention's head attributes from
its new widths (:func:`.heads.set_head_shape`), then loads strictly.

Files are read with safetensors (``.safetensors``) or ``torch.load(weights_only=True)``;
nothing executes code from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .heads import (
    attention_modules,
    check_runnable,
    head_shape,
    planned_shape,
    projection_width,
    set_head_shape,
)

__all__ = ["load_pruned", "read_state_dict", "save_pruned"]


def save_pruned(model: nn.Module, path: str | Path) -> Path:
    """Write ``model.state_dict()`` as safetensors (``.safetensors``) or with ``torch.save``."""
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a ``torch.save`` file (weights only, no pickled code).

    A file holding ``{"model": state}`` or ``{"state_dict": state}`` (UPop, timm
    training checkpoints) yields the inner dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(f"{path} holds a {type(state).__name__}, not a state dict")
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), Mapping):
            return dict(state[key])
    return dict(state)


def _resized(module: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> nn.Module | None:
    """A new module of the checkpoint's shape for ``module`` at ``name``, or None if it fits."""
    weight = state.get(f"{name}.weight")
    if weight is None or getattr(module, "weight", None) is None:
        return None
    if tuple(weight.shape) == tuple(module.weight.shape):
        return None
    like = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Linear):
        return nn.Linear(weight.shape[1], weight.shape[0], bias=f"{name}.bias" in state, **like)
    if isinstance(module, nn.LayerNorm):
        return nn.LayerNorm(
            tuple(weight.shape), eps=module.eps, elementwise_affine=True,
            bias=f"{name}.bias" in state, **like,
        )  # fmt: skip
    raise TypeError(
        f"{name}: the checkpoint's weight {tuple(weight.shape)} does not fit "
        f"{type(module).__name__} {tuple(module.weight.shape)}, and only Linear and "
        "LayerNorm layers are resized"
    )


def _state_width(name: str, attention: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """Channels of q the checkpoint gives the attention at ``name`` (None: not in it)."""
    prefix = f"{name}." if name else ""
    if isinstance(getattr(attention, "qkv", None), nn.Module):
        fused = state.get(f"{prefix}qkv.weight")
        return None if fused is None else int(fused.shape[0]) // 3
    for child in ("q_proj", "query"):
        weight = state.get(f"{prefix}{child}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def load_pruned(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    *,
    keep: str = "heads",
) -> dict[str, tuple[int, int]]:
    """Load a pruned state dict into ``model`` built from the dense config, in place.

    Args:
        model: the dense model (any Linear may be resized).
        checkpoint: a path (safetensors or torch) or a state dict.
        keep: how narrower q/k/v are read: ``"heads"`` (UPop: the number of heads
            stays, each head is narrower; the scale stays the dense one) or
            ``"head_dim"`` (whole heads removed, as torch-pruning does).

    Returns:
        ``(num_heads, head_dim)`` of every attention whose widths changed, by name.

    Raises:
        ValueError: for an unknown ``keep``, or widths that fit neither rule.
        TypeError: before anything changes, if an attention's own forward cannot run the
            checkpoint's heads (transformers' BLIP and BLIP-2 vision attention).
        RuntimeError: from ``load_state_dict(strict=True)`` for missing or extra keys.
    """
    if keep not in ("heads", "head_dim"):
        raise ValueError(f"keep must be 'heads' or 'head_dim', got {keep!r}")
    state = checkpoint if isinstance(checkpoint, Mapping) else read_state_dict(checkpoint)
    attentions = attention_modules(model)
    shapes = {}
    for name, attention in attentions.items():
        width = _state_width(name, attention, state)
        if width is not None and width != projection_width(attention):
            shapes[name] = planned_shape(attention, width, keep=keep)
    check_runnable(attentions, shapes)  # before any layer is resized
    for name, module in list(model.named_modules()):
        new = _resized(module, name, state)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    changed = {}
    for name, attention in attentions.items():
        shape = head_shape(attention)
        if projection_width(attention) != shape.num_heads * shape.head_dim:
            new_shape = set_head_shape(attention, keep=keep)
            changed[name] = (new_shape.num_heads, new_shape.head_dim)
    model.load_state_dict(dict(state), strict=True)
    return changed
