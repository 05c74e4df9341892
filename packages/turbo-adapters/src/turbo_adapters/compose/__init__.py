"""Turbo stacked on model-side acceleration: quantization and structured pruning.

Turbo shortens the sequence; quantization and pruning make each token cheaper. The
recipes here do the model-side step first and patch afterwards, because Turbo's
attention path calls whatever projection modules a block holds and reads the number
of heads from the tensors::

    from turbo_adapters import compose

    patch = compose.quantize_then_patch(model, backend="torchao", r=13)
    patch = compose.prune_then_patch(model, images, head_ratio=0.3, mlp_ratio=0.3, r=13)
    patch = compose.narrow_then_patch(model, keep=[1, 0.75, 0.5, 0.5], r=13)  # UPop-style
    patch = compose.load_pruned_then_patch(dense_model, "upop.safetensors", quantize="torchao", r=13)

Every recipe returns the :class:`~turbo_adapters.TurboPatch`; ``patch.remove()``
gives back the quantized/pruned model (the model-side step is not undone). Pruning
never leaves a model its own library cannot run: BLIP's attention splits q/k/v with
its input width, so for BLIP (and BLIP-2's tower) only MLP channels are pruned
(``head_ratio=0`` / ``keep=1.0, mlp_keep=...``) and asking for heads raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import apply
from ..patch import TurboPatch
from .checkpoint import load_pruned, read_state_dict, save_pruned
from .heads import (
    HeadShape,
    attention_modules,
    check_runnable,
    head_shape,
    library_error,
    projection_width,
    set_head_shape,
)
from .prune import mlp_pairs, narrow_heads, prune_heads_and_mlp
from .quantize import BACKENDS, quantize_weights

__all__ = [
    "BACKENDS",
    "HeadShape",
    "attention_modules",
    "check_runnable",
    "head_shape",
    "library_error",
    "load_pruned",
    "load_pruned_then_patch",
    "mlp_pairs",
    "narrow_heads",
    "narrow_then_patch",
    "projection_width",
    "prune_heads_and_mlp",
    "prune_then_patch",
    "quantize_then_patch",
    "quantize_weights",
    "read_state_dict",
    "save_pruned",
    "set_head_shape",
]


def quantize_then_patch(
    model: nn.Module,
    backend: str = "torchao",
    weights: str = "int8",
    *,
    skip: Iterable[str] = (),
    preset: str | None = None,
    **turbo: Any,
) -> TurboPatch:
    """Weight-only quantization (:func:`quantize_weights`), then ``turbo_adapters.apply``."""
    quantize_weights(model, backend, weights, skip=skip)
    return apply(model, preset, **turbo)


def prune_then_patch(
    model: nn.Module,
    example_inputs: Any,
    *,
    head_ratio: float = 0.3,
    mlp_ratio: float = 0.3,
    quantize: str | None = None,
    skip: Iterable[str] = (),
    preset: str | None = None,
    **turbo: Any,
) -> TurboPatch:
    """torch-pruning of whole heads and MLP channels, optional int8 (``quantize`` names the
    backend), then ``apply``."""
    prune_heads_and_mlp(model, example_inputs, head_ratio=head_ratio, mlp_ratio=mlp_ratio)
    if quantize is not None:
        quantize_weights(model, quantize, skip=skip)
    return apply(model, preset, **turbo)


def narrow_then_patch(
    model: nn.Module,
    keep: float | Sequence[float] = 0.5,
    *,
    mlp_keep: float | Sequence[float] | None = None,
    quantize: str | None = None,
    skip: Iterable[str] = (),
    preset: str | None = None,
    **turbo: Any,
) -> TurboPatch:
    """UPop-style narrowed heads (:func:`narrow_heads`), optional int8, then ``apply``."""
    narrow_heads(model, keep, mlp_keep=mlp_keep)
    if quantize is not None:
        quantize_weights(model, quantize, skip=skip)
    return apply(model, preset, **turbo)


def load_pruned_then_patch(
    model: nn.Module,
    checkpoint: str | Path | dict[str, torch.Tensor],
    *,
    keep: str = "heads",
    quantize: str | None = None,
    skip: Iterable[str] = (),
    preset: str | None = None,
    **turbo: Any,
) -> TurboPatch:
    """Load a pruned checkpoint into the dense ``model`` (:func:`load_pruned`), optional
    int8, then ``apply``."""
    load_pruned(model, checkpoint, keep=keep)
    if quantize is not None:
        quantize_weights(model, quantize, skip=skip)
    return apply(model, preset, **turbo)
