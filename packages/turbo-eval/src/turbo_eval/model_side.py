"""Model-side acceleration that a method stacks Turbo on: int8, pruning, UPop-style heads, GPTQ.

A suite method is ``<turbo method>+<side>`` (``"turbo+int8"``, ``"redundancy+upop"``)
or a side alone (``"int8"``: the unpatched model with that step). Each side is made
once per model, on its own copy of the dense model, by :func:`build_side`; options
come from the suite's ``[[models]]`` entry:

- ``int8``: ``int8_backend = "torchao"`` (or ``"quanto"``); the classifier stays float.
- ``prune``: torch-pruning, ``prune_heads = 0.3``, ``prune_mlp = 0.3`` (fractions removed).
- ``upop``: ``upop_checkpoint = "path"`` (a pruned state dict, loaded into the dense
  config with narrowed heads), else narrowing by magnitude with ``upop_keep = 0.5`` and
  ``upop_mlp_keep`` (fractions kept; one value or one per layer).
- ``gptq``: ``gptq_model = "folder"``, the model's language model (or the whole model,
  for a causal LM) GPTQ-quantized with gptqmodel
  (``turbo_adapters.compose.gptq.quantize_gptq`` makes one); it replaces the language
  model of BLIP-2/InstructBLIP, LLaVA and MiniGPT-v2 (whose LoRA is carried over).
  gptqmodel is optional: without it this side says which package and environment
  (tox ``gptq``) it needs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from .names import MODEL_SIDE, SIDES, split_method

#: Model options the model-side steps read (their defaults are in :func:`build_side`).
SIDE_OPTIONS = (
    "int8_backend",
    "prune_heads",
    "prune_mlp",
    "upop_checkpoint",
    "upop_keep",
    "upop_mlp_keep",
    "gptq_model",
)

__all__ = ["MODEL_SIDE", "SIDES", "SIDE_LABELS", "build_side", "split_method"]

#: The key under which a method's overrides name its model-side step.
SIDE_LABELS = {"int8": "int8", "prune": "pruned 30%", "upop": "UPop-style", "gptq": "GPTQ"}
_CLASSIFIERS = ("head", "classifier", "fc", "heads")


def _classifiers(model: nn.Module) -> list[str]:
    return [n for n in _CLASSIFIERS if isinstance(getattr(model, n, None), nn.Module)]


def build_side(dense: nn.Module, side: str, options: Mapping[str, Any], example: Any) -> nn.Module:
    """A copy of ``dense`` with the model-side step ``side`` applied (``dense`` is untouched).

    Args:
        example: one prepared input batch (torch-pruning traces a call with it).
    """
    from turbo_adapters import compose

    if side not in SIDES:
        raise ValueError(f"side must be one of {list(SIDES)}, got {side!r}")
    if side == "gptq":
        return _gptq_side(dense, options)
    model = copy.deepcopy(dense)
    if side == "int8":
        backend = str(options.get("int8_backend", "torchao"))
        return compose.quantize_weights(model, backend, skip=_classifiers(model)).eval()
    if side == "prune":
        if isinstance(example, Mapping):
            raise TypeError("the prune side supports image models (a tensor input) only")
        compose.prune_heads_and_mlp(
            model,
            example,
            head_ratio=float(options.get("prune_heads", 0.3)),
            mlp_ratio=float(options.get("prune_mlp", 0.3)),
        )
        return model.eval()
    checkpoint = options.get("upop_checkpoint")
    if checkpoint:
        compose.load_pruned(model, str(checkpoint), keep="heads")
    else:
        compose.narrow_heads(
            model, options.get("upop_keep", 0.5), mlp_keep=options.get("upop_mlp_keep")
        )
    return model.eval()


def _gptq_side(dense: nn.Module, options: Mapping[str, Any]) -> nn.Module:
    """A copy of ``dense`` whose language model is the GPTQ one in ``gptq_model``."""
    folder = options.get("gptq_model")
    if not isinstance(folder, str) or not folder:
        raise ValueError(
            "the gptq side needs gptq_model = a folder holding the model's language model "
            "GPTQ-quantized (turbo_adapters.compose.gptq.quantize_gptq makes one)"
        )
    from turbo_adapters.compose import gptq

    return gptq.attach_gptq(dense, gptq.load_gptq(folder), copy=True).eval()
