"""What the GPTQ method tests read from a VLM: greedy answers, and the sequence length
each (quantized) decoder layer puts out."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: new tokens per greedy answer
NEW = 4


@torch.no_grad()
def answer(model: nn.Module, inputs: dict[str, Any], new: int = NEW) -> torch.Tensor:
    """The ``new`` greedy tokens after the prompt (gptqmodel's loader sets do_sample=True in
    the LM's generation config, so greedy is asked for)."""
    out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[:, -new:]


def _length(out: Any) -> int:
    return (out[0] if isinstance(out, tuple) else out).shape[1]


@torch.no_grad()
def layer_lengths(model: nn.Module, inputs: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    """The sequence length each decoder layer of ``model.model.language_model`` puts out in
    one forward (after the reduction a stage makes at that layer), and the last position's
    logits."""
    seen: list[int] = []
    handles = [
        layer.register_forward_hook(lambda _m, _a, out: seen.append(_length(out)))
        for layer in model.model.language_model.layers
    ]
    try:
        logits = model(**inputs).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    return seen, logits
