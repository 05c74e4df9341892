"""What the GPTQ method tests read from a VLM (greedy answers, the sequence length each
(quantized) decoder layer puts out) and SparseVLM's budget rule written from its paper."""

from __future__ import annotations

import math
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


def sparse_counts(keeps: list[float], recycle: float, image_tokens: int) -> list[int]:
    """SparseVLM: each stage keeps ``ceil(keep * N)`` of the image tokens still present;
    ``int(recycle * dropped) + 1`` of the dropped ones form ``int(that / 10) + 1``
    clusters, each taking one more slot."""
    present, counts = image_tokens, []
    for keep in keeps:
        kept = min(present, math.ceil(keep * image_tokens - 1e-9))
        dropped = present - kept
        if dropped:
            chosen = min(int(dropped * recycle) + 1, dropped)
            kept += int(chosen / 10) + 1
        counts.append(kept)
        present = kept
    return counts
