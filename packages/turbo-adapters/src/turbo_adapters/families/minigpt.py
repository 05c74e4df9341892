"""MiniGPT-v2 (:class:`turbo_adapters.models.MiniGPTv2`): Turbo in the EVA ViT-g tower,
in the language model, or both.

Modes, as for LLaVA (:mod:`.llava`): ``patch.modes = "tower" | "llm" | "both" | "none"``
or per call ``model.generate(..., turbo_mode="llm")`` (also ``chat``, ``embed_prompts``,
``encode_image``); LLM-mode settings on ``patch.llm = LLMReduction(layer=K, ...)``.

- ``"tower"`` (the default): the tower is timm's ``Eva``, patched by the timm-eva
  family (CLS guidance, CLS protected). MiniGPT-v2 concatenates every 4 consecutive
  patch tokens after dropping CLS, so the site carries ``CountRule(multiple_of=4,
  offset=1)``: any ``r`` is accepted and the core lowers the last blocks' r until
  ``count - 1`` is a multiple of 4 (never padding with fake tokens). The schedule
  actually used, and what was adjusted, is on ``patch.last_state.resolved``
  (``adjusted``, ``unadjusted``, ``meets_rule``).
- ``"llm"``: FastV-style reduction of the image tokens at decoder layer K of the
  LLaMA, the implementation LLaVA uses (:mod:`.llava.llm`). Layer K's q/k projections
  are called as they are, so the ranking sees the LoRA weights. The image positions
  come from the prompt layout that ``embed_prompts`` builds inside ``generate`` (and
  ``chat``): LLM mode acts in those calls; a prefill of the language model called
  directly in LLM mode warns that nothing was reduced.
"""

from __future__ import annotations

import contextvars
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from turbo_core import CountRule, TurboConfig

from ..adapter import FamilyAdapter
from ..blocks import install_scope
from ..compat import IncompatibleLibraryError
from ..models.minigpt import prompt_layout
from ..patch import TurboPatch
from .llava.llm import (
    bind_arguments,
    check_decoder,
    find_cache,
    forward_in_call,
    install_decoder_layers,
    start_call,
)
from .llava.modes import VisionLanguagePatch, mode_scope
from .timm_eva import TimmEvaAdapter

__all__ = ["CONCAT_RULE", "MiniGPTv2Adapter"]

#: 1 CLS + a multiple of 4 patch tokens reach the concatenation.
CONCAT_RULE = CountRule(multiple_of=4, offset=1)


@dataclasses.dataclass
class _Prompt:
    """The image positions of the prompt being generated from (until its prefill)."""

    image_mask: torch.Tensor | None = None


_PROMPT: contextvars.ContextVar[_Prompt | None] = contextvars.ContextVar(
    "turbo_minigpt_prompt", default=None
)


def _decoder(model: Any) -> nn.Module:
    """The ``LlamaModel`` under peft's wrapper and ``LlamaForCausalLM``."""
    llama = model.llama_model
    base = llama.get_base_model() if hasattr(llama, "get_base_model") else llama
    decoder: nn.Module = base.model
    return decoder


def _cached(named: dict[str, Any]) -> int:
    cache = find_cache(named)
    return int(cache.get_seq_length()) if cache is not None else 0


class MiniGPTv2Adapter(FamilyAdapter):
    """``turbo_adapters.models.MiniGPTv2``: the EVA tower (multiple-of-4 rule) and LLM mode.

    Hand-written, not a :class:`~.tower.TowerFamily`: besides its tower (timm-eva's
    declaration, installed with :meth:`~.tower.TowerAdapter.install_tower` and opened only
    in tower mode) it wraps the language model and the prompt entry points.
    """

    name = "minigpt-v2"
    stages = ("tower", "llm")
    model_names = ("minigpt-v2*", "minigptv2*", "vision-cair/minigpt*")
    models = ("turbo_adapters.models.minigpt:MiniGPTv2",)
    patch_class = VisionLanguagePatch

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        if not isinstance(patch, VisionLanguagePatch):
            raise TypeError(
                "the MiniGPT-v2 adapter needs a VisionLanguagePatch (use turbo_adapters.apply)"
            )
        minigpt: Any = model  # a MiniGPTv2 (matched by class)
        group = int(minigpt.config.concat)
        decoder: Any = _decoder(minigpt)
        layers = list(decoder.layers)
        patch.num_text_layers = len(layers)

        tower: nn.Module = minigpt.visual_encoder
        site = TimmEvaAdapter().install_tower(patch, tower, config)
        site.rule = CountRule(multiple_of=group, offset=1)

        def tower_on() -> bool:
            return "tower" in patch.active_modes()

        # the scopes wrap timm-eva's grid recorder, so it runs inside the call
        install_scope(patch, site, tower, "forward_features", when=tower_on)
        install_scope(patch, site, tower, "forward", when=tower_on)
        patch.tower_available = True
        patch.modes = "tower"

        try:
            check_decoder(patch.adapter_name, decoder, layers)
            install_decoder_layers(patch, layers)
        except IncompatibleLibraryError as refusal:  # tower mode still works
            patch.llm_refusal = refusal
        self._install_entries(patch, model, decoder)

    def _install_entries(
        self, patch: VisionLanguagePatch, model: nn.Module, decoder: nn.Module
    ) -> None:
        def encode_image(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with mode_scope(patch, kwargs):
                return original(*args, **kwargs)

        def embed_prompts(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with mode_scope(patch, kwargs):
                named = bind_arguments(original, args, kwargs)
                embeds, mask = original(**named)
                prompt = _PROMPT.get()
                if prompt is not None:  # inside generate: its prefill reduces at layer K
                    before, after = named["before"], named["after"]
                    text = max(len(h) + len(t) for h, t in zip(before, after, strict=True))
                    prompt.image_mask = prompt_layout(
                        before, after, embeds.shape[1] - text, device=embeds.device
                    )[1]
                return embeds, mask

        def generate(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with mode_scope(patch, kwargs) as modes:
                if "llm" in modes and max(kwargs.get("num_beams", 1) or 1, 1) > 1:
                    raise ValueError(
                        "llm mode supports num_beams=1 only (its cache is not reordered)"
                    )
                token = _PROMPT.set(_Prompt())
                try:
                    return original(*args, **kwargs)
                finally:
                    _PROMPT.reset(token)

        def decoder_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            named = bind_arguments(original, args, kwargs)
            image_mask = None
            if "llm" in patch.active_modes() and _cached(named) == 0:  # a prefill
                image_mask = self._take_image_mask(named)
            call = start_call(patch.llm, named, image_mask, decoder.config)
            return forward_in_call(call, original, named)

        patch.override(model, "encode_image", encode_image)
        patch.override(model, "embed_prompts", embed_prompts)
        patch.override(model, "generate", generate)
        patch.override(decoder, "forward", decoder_forward)

    @staticmethod
    def _take_image_mask(named: dict[str, Any]) -> torch.Tensor | None:
        """The image positions of this prefill, from the prompt ``generate`` laid out."""
        prompt = _PROMPT.get()
        embeds = named.get("inputs_embeds")
        found = prompt.image_mask if prompt is not None else None
        if found is not None and embeds is not None and embeds.shape[:2] == found.shape:
            prompt.image_mask = None  # type: ignore[union-attr]  # one prefill per prompt
            return found
        warnings.warn(
            "MiniGPT-v2 llm mode reduces the image tokens in MiniGPTv2.generate / chat, which "
            "know where they are; this call of the language model came from elsewhere, so "
            "nothing was reduced",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
