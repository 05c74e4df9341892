"""LLaVA-1.5 and LLaVA-NeXT (transformers 5): fewer image tokens into the language model.

Two modes, selectable on the patch (``patch.modes = "tower" | "llm" | "both" | "none"``)
or per call (``model.generate(..., turbo_mode="llm")``; also ``forward``):

- ``"tower"``: Turbo merges inside the CLIP vision tower (CLS guidance, CLS
  protected and dropped afterwards by the model's ``"default"`` strategy). Only the
  layers that reach ``vision_feature_layer`` reduce (the merge is visible in that
  hidden state). Every image's run of placeholders in ``input_ids`` is cut to the
  merged count and the rows are re-padded (left unless the caller padded right), for
  ``forward`` and ``generate``. ``generate`` returns the caller's original prompt
  followed by the new tokens, so ``out[:, input_ids.shape[1]:]`` is still the answer.
  ``forward`` returns logits for the shortened sequence (labels are shortened alike).
  LLaVA-NeXT refuses tower mode: its ``pack_image_features`` needs the full crop grids;
  its patches start in LLM mode.
- ``"llm"``: FastV-style reduction at decoder layer K (:mod:`.llava_llm`), set with
  ``patch.llm = LLMReduction(layer=2, keep=0.5, method="prune" | "merge")``.

``patch.r`` / ``patch.configure(...)`` set the tower's Turbo schedule as for any model.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from turbo_core import TurboConfig

from ..adapter import model_defaults
from ..attention import use_turbo_attention
from ..blocks import install_blocks
from ..patch import TurboPatch
from ..site import ReductionSite
from .clip import CLIP_LAYER
from .hf_vit import HFAdapter
from .llava_llm import (
    CURRENT,
    LLMCall,
    LLMReduction,
    cache_state,
    decode_kwargs,
    reduce_at_layer,
    set_cache_state,
)
from .llava_shrink import shrink_placeholders

__all__ = ["LLMReduction", "LlavaAdapter", "LlavaPatch", "parse_modes"]

MODES = ("tower", "llm")
_ALIASES = {"both": ("tower", "llm"), "none": (), "off": ()}
_MODE: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "turbo_llava_mode", default=None
)


def parse_modes(value: str | Iterable[str] | None) -> frozenset[str]:
    """``"tower"``, ``"llm"``, ``"both"``, ``"none"`` or an iterable of modes -> a set."""
    if value is None:
        return frozenset()
    names = _ALIASES.get(value, (value,)) if isinstance(value, str) else tuple(value)
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise ValueError(
            f"turbo mode must be 'tower', 'llm', 'both', 'none' or a set of {MODES}, got {value!r}"
        )
    return frozenset(names)


class LlavaPatch(TurboPatch):
    """A :class:`TurboPatch` with LLaVA's modes and LLM-mode settings.

    Attributes:
        tower_available: False for LLaVA-NeXT and for towers other than CLIP.
        num_text_layers: decoder layers of the language model (K must be below).
    """

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        super().__init__(model, adapter_name)
        self.tower_available = False
        self.tower_refusal = ""
        self.num_text_layers = 0
        self._modes: frozenset[str] = frozenset()
        self._llm = LLMReduction()

    @property
    def modes(self) -> frozenset[str]:
        """The modes used when a call does not pass ``turbo_mode``."""
        return self._modes

    @modes.setter
    def modes(self, value: str | Iterable[str] | None) -> None:
        self._modes = self.check_modes(parse_modes(value))

    def check_modes(self, modes: frozenset[str]) -> frozenset[str]:
        if "tower" in modes and not self.tower_available:
            raise ValueError(f"tower mode is not available: {self.tower_refusal}; use 'llm'")
        if "llm" in modes and self._llm.layer >= self.num_text_layers:
            raise ValueError(
                f"llm layer must be in [0, {self.num_text_layers - 1}], got {self._llm.layer}"
            )
        return modes

    @property
    def llm(self) -> LLMReduction:
        """LLM-mode settings (layer K, keep fraction, method, rank, alpha)."""
        return self._llm

    @llm.setter
    def llm(self, value: LLMReduction) -> None:
        if not isinstance(value, LLMReduction):
            raise TypeError(f"llm must be an LLMReduction, got {type(value).__name__}")
        if value.layer >= self.num_text_layers:
            raise ValueError(
                f"llm layer must be in [0, {self.num_text_layers - 1}], got {value.layer}"
            )
        self._llm = value

    def active_modes(self) -> frozenset[str]:
        found = _MODE.get()
        return self._modes if found is None else found


@contextlib.contextmanager
def _mode_scope(patch: LlavaPatch, kwargs: dict[str, Any]) -> Iterator[frozenset[str]]:
    """Pop ``turbo_mode`` from a call's kwargs and make it the active mode inside."""
    if "turbo_mode" in kwargs:
        modes = patch.check_modes(parse_modes(kwargs.pop("turbo_mode")))
        token = _MODE.set(modes)
        try:
            yield modes
        finally:
            _MODE.reset(token)
    else:
        yield patch.active_modes()


def _named(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by name (positional ones bound to ``fn``'s signature)."""
    bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    extra = bound.pop("kwargs", {})
    return {**bound, **extra}


def _feature_layers(config: Any, num_layers: int) -> int:
    """How many tower layers reach ``vision_feature_layer`` (the ones that may merge)."""
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    reach = [i if i >= 0 else num_layers + 1 + i for i in layers]
    return min(reach)


def _pad_id(model: nn.Module) -> int:
    for config in (
        getattr(model, "generation_config", None),
        model.config,
        getattr(model.config, "text_config", None),
    ):
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        if isinstance(pad, int):
            return pad
    return 0


class LlavaAdapter(HFAdapter):
    """transformers ``LlavaForConditionalGeneration`` / ``LlavaModel`` and the NeXT pair."""

    name = "llava"
    model_names = ("llava-hf/llava-1.5-*", "llava-hf/llava-v1.6-*", "llava-hf/llava-*")
    model_types = ("llava", "llava_next")

    def classes(self) -> dict[str, Any]:
        from transformers.models.clip import modeling_clip as clip
        from transformers.models.llava import modeling_llava as llava
        from transformers.models.llava_next import modeling_llava_next as nxt

        return {
            "models": (
                llava.LlavaForConditionalGeneration,
                llava.LlavaModel,
                nxt.LlavaNextForConditionalGeneration,
                nxt.LlavaNextModel,
            ),
            "inner": (llava.LlavaModel, nxt.LlavaNextModel),
            "next": (nxt.LlavaNextModel,),
            "clip_tower": (clip.CLIPVisionModel,),
            "clip_layers": (clip.CLIPEncoderLayer,),
        }

    def patch(
        self, model: nn.Module, config: TurboConfig, explicit: frozenset[str] = frozenset()
    ) -> TurboPatch:
        patch = LlavaPatch(model, self.name)
        try:
            self.install(patch, model, config)
        except BaseException:
            patch.remove()
            raise
        return patch

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        if not isinstance(patch, LlavaPatch):
            raise TypeError("the LLaVA adapter needs a LlavaPatch (use turbo_adapters.apply)")
        classes = self.classes()
        inner = model if isinstance(model, classes["inner"]) else model.model
        layers = list(inner.language_model.layers)
        for layer in layers:
            for part in ("self_attn", "input_layernorm"):
                if not hasattr(layer, part):
                    raise TypeError(f"{type(layer).__name__} has no {part}")
        patch.num_text_layers = len(layers)
        if isinstance(inner, classes["next"]):
            patch.tower_refusal = (
                "LLaVA-NeXT's pack_image_features reshapes every crop to its patch grid and "
                "adds newline tokens, which merged tower tokens no longer fill"
            )
        elif not isinstance(inner.vision_tower, classes["clip_tower"]):
            patch.tower_refusal = (
                f"the vision tower is a {type(inner.vision_tower).__name__}, not CLIP"
            )
        else:
            self._install_tower(patch, inner, config)
            patch.tower_available = True
        if patch.tower_available:
            patch.modes = "tower"
        elif patch.llm.layer < patch.num_text_layers:
            patch.modes = "llm"
        else:
            warnings.warn(
                f"Turbo cannot act on this {type(model).__name__} by default: tower mode is "
                f"not available ({patch.tower_refusal}) and the language model has only "
                f"{patch.num_text_layers} layers; set patch.llm = LLMReduction(layer=...) "
                "and patch.modes = 'llm'",
                RuntimeWarning,
                stacklevel=3,
            )
        self._install_llm(patch, inner, layers)
        self._install_entries(patch, model, inner)

    # ---------------------------------------------------------------- tower
    def _install_tower(self, patch: LlavaPatch, inner: nn.Module, config: TurboConfig) -> None:
        tower = inner.vision_tower
        layers = [m for m in tower.modules() if isinstance(m, self.classes()["clip_layers"])]
        reach = _feature_layers(inner.config, len(layers))
        if reach < 1:
            raise ValueError(
                f"vision_feature_layer {inner.config.vision_feature_layer!r} reads the embeddings: "
                "no tower layer can merge before it"
            )
        site = patch.add_site(ReductionSite("vision", model_defaults(config, 1), reach))
        for layer in layers:
            CLIP_LAYER.check(layer)
        # all layers on Turbo's attention (the ones past the feature layer see merged
        # tokens with their sizes); only those that reach the feature layer merge
        use_turbo_attention(patch, site, [layer.self_attn for layer in layers])
        install_blocks(patch, site, layers[:reach], CLIP_LAYER)

        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if "tower" not in patch.active_modes():
                return original(*args, **kwargs)
            with site.scope():
                return original(*args, **kwargs)

        patch.override(tower, "forward", forward)

    # ------------------------------------------------------------------ llm
    def _install_llm(self, patch: LlavaPatch, inner: nn.Module, layers: list[nn.Module]) -> None:
        for index, layer in enumerate(layers):

            def forward(
                original: Callable[..., Any],
                *args: Any,
                _i: int = index,
                _l: nn.Module = layer,
                **kw: Any,
            ) -> Any:
                call = CURRENT.get()
                if call is None:
                    return original(*args, **kw)
                k = (
                    call.state.layer
                    if call.image_mask is None and call.state
                    else call.settings.layer
                )
                if _i < k:
                    return original(*args, **kw)
                hidden = args[0] if args else kw.pop("hidden_states")
                args = args[1:]
                if call.image_mask is not None:  # prefill
                    if _i == k:
                        hidden = reduce_at_layer(call, _l, hidden, kw)
                elif call.layer_kwargs is None:  # decode: first layer >= K builds the mask
                    call.layer_kwargs = decode_kwargs(call, hidden.shape[1], hidden.dtype)
                kw.update(call.layer_kwargs or {})
                return original(hidden, *args, **kw)

            patch.override(layer, "forward", forward)

    # -------------------------------------------------------------- entries
    def _install_entries(self, patch: LlavaPatch, model: nn.Module, inner: nn.Module) -> None:
        image_token = int(inner.config.image_token_id)

        def shrink(named: dict[str, Any]) -> dict[str, Any]:
            """Tower mode: encode, cut the placeholder runs, hand the features on."""
            pixels = named.get("pixel_values")
            if pixels is None or "tower" not in patch.active_modes():
                return named
            ids = named.get("input_ids")
            if ids is None:
                raise ValueError(
                    "tower mode needs input_ids (to shorten the image placeholders); got "
                    "inputs_embeds. Pass turbo_mode='llm' or 'none' for this call"
                )
            features = inner.get_image_features(
                pixel_values=pixels,
                vision_feature_layer=named.get("vision_feature_layer"),
                vision_feature_select_strategy=named.get("vision_feature_select_strategy"),
                return_dict=True,
            )
            merged = features.pooler_output[0].shape[0]
            total = int((ids == image_token).sum())
            per_image = total // max(len(features.pooler_output), 1)
            out = shrink_placeholders(
                ids, image_token, per_image, merged, _pad_id(model),
                attention_mask=named.get("attention_mask"), labels=named.get("labels"),
            )  # fmt: skip
            named = {**named, "input_ids": out.input_ids, "attention_mask": out.attention_mask}
            named.pop("pixel_values")
            named["mm_encoder_outputs"] = {"image": features}
            if "labels" in named:
                named["labels"] = out.labels
            if named.get("position_ids") is not None and out.attention_mask is not None:
                named["position_ids"] = (out.attention_mask.cumsum(-1) - 1).clamp(min=0)
            elif named.get("position_ids") is not None:
                named["position_ids"] = None
            return named

        def llm_call(named: dict[str, Any]) -> LLMCall | None:
            cache = named.get("past_key_values")
            mask2d = named.get("attention_mask")
            if mask2d is not None and mask2d.dim() != 2:
                mask2d = None
            state = cache_state(cache)
            cached = cache.get_seq_length() if cache is not None else 0
            if state is not None and cached > 0:  # decoding after an LLM-mode prefill
                return LLMCall(patch.llm, None, mask2d, cache, state=state)
            ids = named.get("input_ids")
            if "llm" not in patch.active_modes() or ids is None:
                return None
            image_mask = ids == image_token
            if cached > 0 or not bool(image_mask.any()):
                return None
            implementation = str(inner.language_model.config._attn_implementation or "")
            if implementation.startswith("flash") or implementation == "flex_attention":
                raise ValueError(
                    f"llm mode needs an attention that takes a 4-D additive mask (sdpa or "
                    f"eager); the language model uses {implementation!r}"
                )
            return LLMCall(patch.llm, image_mask, mask2d, cache)

        def inner_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with _mode_scope(patch, kwargs):
                named = shrink(_named(original, args, kwargs))
                call = llm_call(named)
                if call is None:
                    return original(**named)
                token = CURRENT.set(call)
                try:
                    output = original(**named)
                finally:
                    CURRENT.reset(token)
                if call.image_mask is not None and call.state is not None:
                    set_cache_state(
                        named.get("past_key_values") or output.past_key_values, call.state
                    )
                return output

        patch.override(inner, "forward", inner_forward)
        if inner is model:
            return

        def outer_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with _mode_scope(patch, kwargs):
                return original(**shrink(_named(original, args, kwargs)))

        patch.override(model, "forward", outer_forward)
        if hasattr(model, "generate"):
            self._install_generate(patch, model, shrink)

    def _install_generate(
        self,
        patch: LlavaPatch,
        model: nn.Module,
        shrink: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> None:
        def generate(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with _mode_scope(patch, kwargs) as modes:
                if "llm" in modes and max(kwargs.get("num_beams", 1) or 1, 1) > 1:
                    raise ValueError(
                        "llm mode supports num_beams=1 only (its cache is not reordered)"
                    )
                if "tower" not in modes or kwargs.get("pixel_values") is None:
                    return original(*args, **kwargs)
                named = dict(kwargs)
                if args:
                    named["input_ids"] = args[0]
                    args = args[1:]
                if named.get("inputs") is not None:
                    named["input_ids"] = named.pop("inputs")
                prompt = named["input_ids"]
                named = shrink(named)
                named.pop("position_ids", None)
                output = original(*args, **named)
                return _with_prompt(output, prompt, named["input_ids"].shape[1])

        patch.override(model, "generate", generate)


def _with_prompt(output: Any, prompt: torch.Tensor, short: int) -> Any:
    """Generated tokens after the caller's full prompt (as the unpatched model returns)."""

    def full(seq: torch.Tensor) -> torch.Tensor:
        repeat = seq.shape[0] // prompt.shape[0]
        return torch.cat([prompt.repeat_interleave(repeat, 0).to(seq.device), seq[:, short:]], 1)

    if isinstance(output, torch.Tensor):
        return full(output)
    output.sequences = full(output.sequences)
    return output
