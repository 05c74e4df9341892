"""Pieces shared by the vision-transformer adapters."""

from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

from turbo_core import ReductionState, TurboConfig

from .handle import TurboHandle

__all__ = ["fused_attention", "is_instance", "make_handle", "size_weighted_mean"]


def is_instance(model: nn.Module, module: str, *class_names: str) -> bool:
    """``isinstance(model, module.ClassName)`` without importing a library needlessly.

    A model can only be an instance of a library's class if that library is already
    imported, so adapters of libraries that are not loaded answer False at once
    (asking every adapter never imports timm, torchvision or transformers).
    """
    if module.split(".")[0] not in sys.modules:
        return False
    try:
        found = importlib.import_module(module)
    except ImportError:
        return False
    classes = tuple(getattr(found, name) for name in class_names if hasattr(found, name))
    return bool(classes) and isinstance(model, classes)


def make_handle(
    model: nn.Module,
    config: TurboConfig,
    explicit: frozenset[str],
    adapter_name: str,
    num_blocks: int,
    prefix_tokens: int,
    has_cls: bool,
) -> TurboHandle:
    """A handle whose ``protected`` defaults to the model's prefix tokens."""
    if "protected" not in explicit:
        config = config.replace(protected=prefix_tokens)
    return TurboHandle(model, config, adapter_name, num_blocks, guide="cls" if has_cls else "mean")


def fused_attention(
    handle: TurboHandle,
    state: ReductionState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA with the ``log(size)`` bias, recording the block's merge inputs.

    ``q, k, v`` are ``(B, H, N, D)``; returns ``(B, H, N, D)``.
    """
    if attn_mask is not None:
        raise ValueError(
            "attn_mask is not supported while Turbo merges tokens: the mask would "
            "no longer line up with the merged sequence"
        )
    bias = handle.attention_bias(state, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    handle.observe_attention(state, q, k, scale)
    return out


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens where each token counts as many originals as it stands for."""
    if size is None:
        return x.mean(dim=1)
    weight = size.to(x.dtype)
    return (x * weight).sum(dim=1) / weight.sum(dim=1)
