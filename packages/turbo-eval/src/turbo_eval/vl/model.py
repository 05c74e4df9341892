"""The vision-language model class: a :class:`~turbo_eval.loaded_model.LoadedModel` with a
call head, a tokenizer and an image processor, and the calls the tasks make on it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..loaded_model import LoadedModel
from ..names import CROSS_MODAL, CROSS_SITE, SIZE_BIAS
from ..vl_data import VLSample
from .catalog import CAPTION_PROMPTS
from .heads import Blip2ITMHead, BlipITMHead, Generation, Head, RetrievalSession

__all__ = ["SpeedInputs", "VLModel"]


@dataclasses.dataclass
class SpeedInputs:
    """Prepared inputs of the timed call (``LoadedModel.prepare`` for a VL model)."""

    inputs: dict[str, Any]
    max_new_tokens: int


@dataclasses.dataclass
class VLModel(LoadedModel):
    """A captioning, VQA or image-text matching model with its tokenizer and processor.

    ``prepare`` / ``forward_features`` are the timed call of the runner's throughput
    cells: greedy generation of exactly ``SpeedInputs.max_new_tokens`` tokens (caption
    and VQA heads) or the ITM forward on image-text pairs (matching heads).

    Attributes:
        head: the family's call logic (:mod:`turbo_eval.vl.heads`).
        family: ``"blip"``, ``"blip2"``, ``"llava"`` or ``"minigpt-v2"``.
        weights: ``"pretrained"`` or ``"random"`` (then quality is fidelity only).
        tokenizer: the text tokenizer.
        speed_purpose: what the timed call's texts are (``"caption"`` or ``"vqa"``).
        speed_tokens: tokens the timed call generates (the task sets both).
    """

    head: Head | None = None
    family: str = ""
    weights: str = "pretrained"
    tokenizer: Any = None
    speed_purpose: str = "caption"
    speed_tokens: int = 20
    #: the split of the cross-modal method in use (None for any other method)
    cross_split: dict[str, Any] | None = None
    #: cross-modal splits searched so far (:mod:`turbo_eval.methods.cross_modal`)
    cross_splits: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the patch that has the size bias downstream (:mod:`turbo_eval.methods.size_bias`), if any
    _biased: Any = dataclasses.field(default=None, repr=False)
    _flops_probe: list[VLSample] = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> str:
        """``"generate"`` (captions, answers) or ``"match"`` (image-text retrieval)."""
        return self._head.kind

    @property
    def _head(self) -> Head:
        if self.head is None:
            raise TypeError(f"model {self.name!r} has no vision-language head")
        return self.head

    @property
    def caption_prompt(self) -> str:
        return CAPTION_PROMPTS.get(self.family, "")

    def purposes(self) -> tuple[str, ...]:
        return self._head.purposes

    # ---------------------------------------------------------- calls
    def inputs(self, samples: Sequence[VLSample], purpose: str) -> dict[str, Any]:
        return self._head.inputs([s.image for s in samples], [s.text for s in samples], purpose)

    def generate(
        self, samples: Sequence[VLSample], purpose: str, max_new_tokens: int
    ) -> Generation:
        """Greedy captions or answers of the current method (patched or not)."""
        with torch.inference_mode():
            return self._head.generate(self.module, self.inputs(samples, purpose), max_new_tokens)

    def teacher_forced(
        self, samples: Sequence[VLSample], purpose: str, tokens: torch.Tensor
    ) -> torch.Tensor:
        """``(B, T, V)`` logits predicting each of ``tokens`` given the ones before."""
        with torch.inference_mode():
            inputs = self.inputs(samples, purpose)
            return self._head.teacher_forced(self.module, inputs, tokens)

    def retrieval(
        self, images: Sequence[Any], texts: Sequence[str], batch_size: int
    ) -> RetrievalSession:
        """ITC and ITM scores of ``images`` against ``texts`` (matching heads only)."""
        head = self._head
        if not isinstance(head, (BlipITMHead, Blip2ITMHead)):
            raise TypeError(f"model {self.name!r} has no image-text matching head")
        with torch.inference_mode():  # the session's own calls run without gradients too
            return head.retrieval(self.module, images, texts, batch_size)

    def end_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B,)`` number of real tokens per row: up to and including the first end token."""
        found = tokens == self._head.eos_id
        first = torch.where(found.any(1), found.int().argmax(1) + 1, tokens.shape[1])
        return first

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Text of generated tokens (up to the end token, special tokens dropped)."""
        ends = self.end_index(tokens)
        rows = [row[:end].tolist() for row, end in zip(tokens, ends, strict=True)]
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    def example_inputs(self) -> Any:
        """Keyword inputs of the timed call on two noise images (for model-side steps)."""
        noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
        return self.prepare([VLSample(image, "a b") for image in noise]).inputs

    # -------------------------------------------------------- methods
    def set_method(self, overrides: dict[str, Any] | None) -> None:
        """As :meth:`LoadedModel.set_method`, then the LLaVA options. A cross-modal or
        size-bias method is applied by :func:`turbo_eval.methods.apply_method`."""
        if overrides and (CROSS_MODAL in overrides or SIZE_BIAS in overrides):
            raise TypeError(
                f"model {self.name!r}: cross-modal and size-bias methods are applied by "
                "turbo_eval.methods.apply_method, not VLModel.set_method"
            )
        if self.handle is not None and (
            CROSS_SITE in self.handle.sites or self.handle is self._biased
        ):
            self.handle.remove()  # a plain method runs with exactly its own sites and options
            self.handle = None
        super().set_method(overrides)
        self.settle_family_options()

    def settle_family_options(self) -> None:
        """The family's own patch settings from the model options (LLaVA's mode and LLM-mode
        reduction), after any change of the patch."""
        if self.handle is not None and self.family == "llava":
            _llava_settings(self.handle, self.options)

    def set_flops_probe(self, samples: Sequence[VLSample]) -> None:
        """The items whose timed call a cross-modal split is matched on (tasks set their
        first two speed items); the splits found so far are forgotten."""
        self._flops_probe = list(samples)
        self.cross_splits.clear()

    def flops_probe_items(self) -> list[VLSample]:
        """The probe items (two noise images with a short text when no task set them)."""
        if not self._flops_probe:
            noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
            self._flops_probe = [VLSample(image, "what is in the picture") for image in noise]
        return self._flops_probe

    def probe_inputs(self) -> SpeedInputs:
        """The prepared timed-call inputs of the probe items."""
        return self.prepare(self.flops_probe_items())


def _llava_settings(handle: Any, options: Mapping[str, Any]) -> None:
    """LLaVA's LLM mode from the model options (tower mode is the adapter's default)."""
    mode = options.get("llava_mode")
    if mode is None:
        return
    from turbo_adapters.families.llava.llm import LLMReduction

    wanted = LLMReduction(
        layer=int(options.get("llm_layer", 2)),
        keep=float(options.get("llm_keep", 0.5)),
        method=str(options.get("llm_method", "prune")),
    )
    if handle.llm != wanted:
        handle.llm = wanted
    handle.modes = mode
