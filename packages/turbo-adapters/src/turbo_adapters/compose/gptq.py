"""GPTQ for the language model of a vision-language stack, with gptqmodel (7.6).

Turbo reduces the vision tokens; GPTQ makes the language model that reads them
cheaper. The two meet only at the language model's ``inputs_embeds``, so stacking
needs no more than: quantize the language model (a saved transformers causal LM with
its tokenizer), load it back, put it where the VLM's language model was, and patch
the vision tower with ``turbo_adapters.apply``.

gptqmodel pins numpy exactly and needs ``GPTQMODEL_CPU_WORKERS`` on small machines:
install it in its own environment (tox ``gptq``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["gptq_linear_classes", "load_gptq", "quantize_gptq"]


def _workers() -> None:
    # gptqmodel starts one worker per core by default; 2 cores are shared with torch
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))


def quantize_gptq(
    pretrained: str | Path,
    out: str | Path,
    calibration: Sequence[torch.Tensor],
    *,
    bits: int = 4,
    group_size: int = 128,
    device: str = "cpu",
) -> Path:
    """GPTQ-quantize the causal LM saved at ``pretrained`` (with its tokenizer) into ``out``.

    Args:
        calibration: token id tensors ``(1, L)`` or ``(L,)``, at least 10 tokens each.
        bits: 2, 3, 4 or 8.
        group_size: a divisor of every quantized layer's input width, or -1 (per row).

    Returns:
        ``out``, loadable with :func:`load_gptq`.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits!r}")
    if not calibration:
        raise ValueError("calibration must hold at least one token sequence")
    _workers()
    from gptqmodel import GPTQModel, QuantizeConfig

    rows = []
    for ids in calibration:
        ids = ids.reshape(1, -1).long()
        if ids.shape[1] < 10:
            raise ValueError(f"calibration sequences need >= 10 tokens, got {ids.shape[1]}")
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    config = QuantizeConfig(bits=bits, group_size=group_size)
    model = GPTQModel.load(str(pretrained), config, device=device)
    model.quantize(rows, batch_size=1)
    model.save(str(out))
    return Path(out)


def load_gptq(path: str | Path, device: str = "cpu") -> nn.Module:
    """The quantized transformers model (e.g. ``LlamaForCausalLM``) saved at ``path``."""
    _workers()
    from gptqmodel import GPTQModel

    wrapper: Any = GPTQModel.load(str(path), device=device)
    return wrapper.model.eval()  # type: ignore[no-any-return]


def gptq_linear_classes(model: nn.Module) -> set[str]:
    """Names of the gptqmodel quantized Linear classes inside ``model``."""
    return {
        type(m).__name__ for m in model.modules() if type(m).__module__.startswith("gptqmodel.")
    }
