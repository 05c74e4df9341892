"""Proportional attention downstream as a method: ``log(size)`` in the text side's
cross-attentions over merged image tokens.

A method ``"<m>-sizebias"`` (``"turbo-sizebias"``; ``"redundancy-sizebias"`` and
``"semantics-sizebias"`` beside it) runs ``<m>`` at the same r and alpha, then the
adapter's ``use_size_bias_downstream``: the vision tower reduces exactly as ``<m>``
does (same decisions, same token counts, the same FLOPs up to one bias add per
cross-attention), and only the attention of the text side over the merged tokens
changes. Where: BLIP's caption decoder and its ITM/VQA text encoder
(:func:`turbo_adapters.families.blip.use_size_bias_downstream`), the Q-Former of
BLIP-2 and InstructBLIP (:func:`turbo_adapters.families.blip2.use_size_bias_downstream`).
The authors' code leaves it off, so ``<m>`` is the reference behaviour and the report
pairs every ``-sizebias`` row with ``<m>`` at the same r and alpha.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..names import SIZE_BIAS, plain_method
from ..vl.catalog import vl_architecture

__all__ = [
    "BIASED_ARCHITECTURES",
    "SIZE_BIAS",
    "apply_size_bias",
    "plain_method",
    "size_bias_function",
    "size_bias_problem",
]

#: The key under which a method's overrides ask for the bias downstream.
#: Model classes with cross-attentions over the image tokens, and their adapter.
BIASED_ARCHITECTURES = {
    "BlipForConditionalGeneration": "hf-blip",
    "BlipForImageTextRetrieval": "hf-blip",
    "BlipForQuestionAnswering": "hf-blip",
    "Blip2ForConditionalGeneration": "hf-blip2",
    "Blip2ForImageTextRetrieval": "hf-blip2",
    "InstructBlipForConditionalGeneration": "hf-instructblip",
}
#: Where each adapter's ``use_size_bias_downstream(patch)`` lives.
_MODULES = {
    "hf-blip": "turbo_adapters.families.blip",
    "hf-blip2": "turbo_adapters.families.blip2",
    "hf-instructblip": "turbo_adapters.families.blip2",
}


def size_bias_function(adapter: str) -> Callable[[Any], None] | None:
    """The adapter's ``use_size_bias_downstream``, or None when it has none."""
    module = _MODULES.get(adapter)
    if module is None:
        return None
    try:
        return getattr(importlib.import_module(module), "use_size_bias_downstream", None)
    except ImportError:
        return None


def size_bias_problem(name: str) -> str | None:
    """Why the suite's model ``name`` cannot run a size-bias method (None: it can)."""
    architecture = vl_architecture(name)
    if architecture is None:
        return "it is not a vision-language model whose text side cross-attends to the image"
    adapter = BIASED_ARCHITECTURES.get(architecture)
    if adapter is None:
        return (
            f"{architecture} has no cross-attention over the image tokens (the bias needs "
            f"one of {sorted(BIASED_ARCHITECTURES)})"
        )
    if size_bias_function(adapter) is None:
        return f"turbo-adapters' {adapter} adapter has no use_size_bias_downstream"
    return None


def apply_size_bias(handle: Any, model_name: str, module_class: str) -> None:
    """``use_size_bias_downstream`` on ``handle`` (a Turbo patch of the model).

    Raises:
        TypeError: the model's adapter has no such option, or the option refuses this
            model (the error names the model).
    """
    adapter = handle.adapter_name
    where = f"model {model_name!r} ({module_class}, adapter {adapter})"
    apply = size_bias_function(adapter)
    if apply is None:
        raise TypeError(
            f"the size-bias methods need use_size_bias_downstream; {where} has none "
            f"(it exists for {sorted(BIASED_ARCHITECTURES)})"
        )
    try:
        apply(handle)
    except TypeError as error:
        raise TypeError(f"the size-bias methods cannot patch {where}: {error}") from error
