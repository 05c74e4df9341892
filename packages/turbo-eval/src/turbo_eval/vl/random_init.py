"""Random weights for a named checkpoint's configuration: the config with a suite's
overrides merged in, and :func:`scale_weights`, the initialisation under which outputs
depend on the image."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["merged_config", "scale_weights"]


def merged_config(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        kind = value.get("model_type") if isinstance(value, Mapping) else None
        same_kind = isinstance(out.get(key), dict) and kind in (None, out[key].get("model_type"))
        if isinstance(value, Mapping) and same_kind:  # another model type replaces the part
            out[key] = merged_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: attention projections whose weights :func:`scale_weights` multiplies by its gain
_QUERY_KEY = ("query", "key", "q_proj", "k_proj")
#: the last projection of a residual branch (attention output, MLP output) in a layer
_BRANCH_OUT = ("projection", "proj", "out_proj", "o_proj", "fc2", "down_proj")


def _branch_output(name: str) -> bool:
    parts = [p for p in name.split(".") if p != "base_layer"]  # a peft-wrapped Linear
    # BERT-style layers (BLIP text, Q-Former): attention.output.dense, output.dense
    return parts[-1] in _BRANCH_OUT or (
        parts[-1] == "dense" and len(parts) > 1 and parts[-2].startswith("output")
    )


@torch.no_grad()
def scale_weights(module: nn.Module, seed: int = 0, attention_gain: float = 2.0) -> nn.Module:
    """Random weights under which a deep model's outputs depend on its input.

    Every Linear, convolution and embedding weight is drawn with variance 1 / fan-in;
    in each stack of L layers the last projection of every residual branch (attention
    output, MLP output) is scaled by 1 / sqrt(2 L), GPT-2's scaled initialisation; query
    and key projections (``query``/``key``, ``q_proj``/``k_proj``, the q and k rows of a
    fused ``qkv``) are multiplied by ``attention_gain``.

    Why: with the library's std 0.02 the image hardly reaches a decoder's residual
    stream, and in a deep post-norm stack (BLIP's BERT-base encoder and decoders) at unit
    gain every token's representation converges to the same vector (rank collapse), so
    every question gets the same answer distribution whatever the image or the method;
    near-uniform attention over 577 image tokens also returns about their mean. Trained
    models keep tokens apart and attend sharply: the scaled branches keep each token's
    own signal through depth, and a gain of 2 puts the attention logits' standard
    deviation near 4.
    """
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, layer in module.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)):
            continue
        weight = layer.weight
        if id(weight) in seen or weight.dim() < 2:
            continue
        seen.add(id(weight))
        fan = weight.shape[1] if isinstance(layer, nn.Embedding) else weight[0].numel()
        weight.copy_(torch.randn(weight.shape, generator=generator) / fan**0.5)
        parts = name.split(".")
        leaf = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]  # peft
        if leaf in _QUERY_KEY:
            weight.mul_(attention_gain)
        elif leaf == "qkv" and weight.shape[0] % 3 == 0:
            weight[: 2 * weight.shape[0] // 3].mul_(attention_gain)
    for stack in module.modules():
        if not isinstance(stack, nn.ModuleList) or len(stack) < 1:
            continue
        if len({type(layer) for layer in stack}) != 1:
            continue
        scale = (2 * len(stack)) ** -0.5
        for layer in stack:
            for name, sub in layer.named_modules():
                if isinstance(sub, nn.Linear) and _branch_output(name):
                    sub.weight.mul_(scale)
    return module
