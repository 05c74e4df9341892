"""The one small interface every task drives: a loaded model, how to feed it, and how a
method's overrides patch it (:meth:`LoadedModel.set_method`). The loaders that build it
are in :mod:`turbo_eval.models`; vision-language models and diffusion pipelines subclass it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

import turbo_adapters
from turbo_adapters import TurboPatch

__all__ = ["LoadedModel"]


@dataclasses.dataclass
class LoadedModel:
    """A model plus how to feed it and read features from it.

    Attributes:
        name: the suite's model name.
        module: the ``nn.Module`` (patched in place while a method runs).
        modality: ``"image"`` or ``"text"``.
        prepare: turns raw items (uint8 HxWx3 arrays, or strings) into model inputs.
        forward_features: runs the module on prepared inputs and returns ``(B, D)``
            features; gets the handle (or None) to pool by token size.
        forward_logits: optional, for classifiers.
    """

    name: str
    module: nn.Module
    modality: str
    prepare: Callable[[Sequence[Any]], Any]
    forward_features: Callable[[nn.Module, Any, TurboPatch | None], torch.Tensor]
    forward_logits: Callable[[nn.Module, Any], torch.Tensor] | None = None
    handle: TurboPatch | None = None
    #: the suite's model options (model-side steps read theirs from here)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the dense module and the model-side variants made from it (``"int8"`` ...)
    sides: dict[str | None, nn.Module] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------ methods
    def side(self, name: str | None) -> nn.Module:
        """The dense module (None) or its copy with a model-side step, made once."""
        if not self.sides:
            self.sides[None] = self.module
        if name not in self.sides:
            from .model_side import build_side

            dense = self.sides[None]
            example = self.example_inputs()
            self.sides[name] = build_side(dense, name, self.options, example)  # type: ignore[arg-type]
        return self.sides[name]

    def example_inputs(self) -> Any:
        """One small prepared batch (model-side steps such as pruning trace a call with it)."""
        noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
        return self.prepare(list(noise) if self.modality == "image" else ["a b", "c"])

    @property
    def is_dense(self) -> bool:
        """Whether the module is the dense model (no model-side step applied)."""
        return self.module is self.sides.get(None, self.module)

    def set_method(self, overrides: dict[str, Any] | None) -> None:
        """Unpatched for ``None`` (baseline); otherwise patched with ``overrides``.

        ``overrides[MODEL_SIDE]`` selects the model the method runs on (``"int8"``,
        ``"prune"``, ``"upop"``); ``self.module`` becomes that model.
        """
        from .names import MODEL_SIDE, SIZE_BIAS

        overrides = dict(overrides) if overrides is not None else None
        if overrides is not None and "peer" in overrides:
            raise ValueError(
                f"method {overrides['peer']!r} runs on diffusion pipelines only, "
                f"not on {self.name!r}"
            )
        if overrides is not None and overrides.pop(SIZE_BIAS, False):
            raise TypeError(
                f"the size-bias methods need cross-attentions over the image tokens; model "
                f"{self.name!r} ({type(self.module).__name__}) has none"
            )
        side = overrides.pop(MODEL_SIDE, None) if overrides is not None else None
        target = self.side(side)
        if target is not self.module or not overrides:
            if self.handle is not None:
                self.handle.remove()
                self.handle = None
            self.module = target
        if not overrides:
            return
        if self.handle is None:
            self.handle = turbo_adapters.apply(self.module, **overrides)
        else:
            self.handle.configure(**overrides)

    def features(self, items: Sequence[Any]) -> torch.Tensor:
        with torch.inference_mode():
            return self.forward_features(self.module, self.prepare(items), self.handle).float()

    def logits(self, items: Sequence[Any]) -> torch.Tensor:
        if self.forward_logits is None:
            raise TypeError(f"model {self.name!r} has no classification head")
        with torch.inference_mode():
            return self.forward_logits(self.module, self.prepare(items)).float()
