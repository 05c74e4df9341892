"""LLaVA-1.5 and LLaVA-NeXT (transformers 5): fewer image tokens into the language model.

Three stages, selectable on the patch (``patch.modes = "tower" | "connector" | "llm" |
"both" | "none"`` or a set) or per call (``model.generate(..., turbo_mode="llm")``; also
``forward``):

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
- ``"connector"``: each image's projected tokens reduced once to a budget before the
  language model (``patch.connector = ConnectorReduction(budget=128, method=...)``,
  :mod:`.connector`); LLaVA-1.5 and LLaVA-NeXT. Placeholders are cut as in tower mode.
- ``"llm"``: FastV-style reduction at decoder layer K (:mod:`.llm`), set with
  ``patch.llm = LLMReduction(layer=2, keep=0.5, method="prune" | "merge")``.

``patch.r`` / ``patch.configure(...)`` set the tower's Turbo schedule as for any model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from torch import nn

from turbo_core import TurboConfig

from ...adapter import model_defaults, resolve
from ...attention import use_turbo_attention
from ...blocks import install_blocks, install_scope
from ...compat import IncompatibleLibraryError
from ...patch import TurboPatch
from ...site import ReductionSite
from ..clip import CLIP_LAYER
from ..hf_base import HFAdapter
from .connector import connector_shrink
from .llm import (
    LLMReduction,
    bind_arguments,
    check_decoder,
    forward_in_call,
    install_decoder_layers,
    start_call,
)
from .modes import VisionLanguagePatch, mode_scope, parse_modes, shrunk_generate, unscoped
from .shrink import shrink_placeholders
from .size_bias import install_size_bias

__all__ = ["LLMReduction", "LlavaAdapter", "LlavaPatch", "parse_modes"]

#: LLaVA's patch: the shared vision-language patch (modes, LLM-mode settings).
LlavaPatch = VisionLanguagePatch
#: the modes whose generate cuts the prompt first
_TOWER_OR_CONNECTOR = frozenset({"tower", "connector"})


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
    """transformers ``LlavaForConditionalGeneration`` / ``LlavaModel`` and the NeXT pair.

    Hand-written, not a :class:`~..tower.TowerFamily`: the tower merges only up to
    ``vision_feature_layer`` and only in tower mode, and the entry points cut the image
    placeholders in ``input_ids`` or reduce inside the language model (LLM mode).
    """

    name = "llava"
    stages = ("tower", "connector", "llm")
    stage_limits = MappingProxyType(
        {"tower": "not on LLaVA-NeXT, whose anyres packing needs every crop's full grid"}
    )
    model_names = ("llava-hf/llava-1.5-*", "llava-hf/llava-v1.6-*", "llava-hf/llava-*")
    model_types = ("llava", "llava_next")
    models = (
        "transformers.models.llava.modeling_llava:LlavaForConditionalGeneration",
        "transformers.models.llava.modeling_llava:LlavaModel",
        "transformers.models.llava_next.modeling_llava_next:LlavaNextForConditionalGeneration",
        "transformers.models.llava_next.modeling_llava_next:LlavaNextModel",
    )
    patch_class = VisionLanguagePatch

    def classes(self) -> dict[str, Any]:
        from transformers.models.clip import modeling_clip as clip
        from transformers.models.llava import modeling_llava as llava
        from transformers.models.llava_next import modeling_llava_next as nxt

        return {
            "models": resolve(self.models),
            "inner": (llava.LlavaModel, nxt.LlavaNextModel),
            "next": (nxt.LlavaNextModel,),
            "clip_tower": (clip.CLIPVisionModel,),
            "clip_layers": (clip.CLIPEncoderLayer,),
        }

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        if not isinstance(patch, LlavaPatch):
            raise TypeError("the LLaVA adapter needs a LlavaPatch (use turbo_adapters.apply)")
        classes = self.classes()
        inner = model if isinstance(model, classes["inner"]) else model.model
        layers = list(inner.language_model.layers)
        patch.num_text_layers = len(layers)
        patch.connector_available = True
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
        # log(size) of connector-merged tokens in the decoder's attention
        install_size_bias(patch, [layer.self_attn for layer in layers], inner.language_model.config)
        try:
            check_decoder(patch.adapter_name, inner.language_model, layers)
            install_decoder_layers(patch, layers)
        except IncompatibleLibraryError as refusal:  # tower mode still works
            patch.llm_refusal = refusal
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
        install_scope(patch, site, tower, when=lambda: "tower" in patch.active_modes())

    # -------------------------------------------------------------- entries
    def _install_entries(self, patch: LlavaPatch, model: nn.Module, inner: nn.Module) -> None:
        image_token = int(inner.config.image_token_id)

        def shrink(named: dict[str, Any]) -> dict[str, Any]:
            """Tower and connector modes: encode, cut the placeholder runs, hand on."""
            pixels = named.get("pixel_values")  # None inside a call shrunk already
            named = tower_shrink(named)
            if "connector" not in patch.active_modes() or pixels is None:
                return named
            guided = "tower" not in patch.active_modes() and not isinstance(
                inner, self.classes()["next"]
            )
            return connector_shrink(patch, patch.connector, inner, named, _pad_id(model), guided)

        def tower_shrink(named: dict[str, Any]) -> dict[str, Any]:
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

        def inner_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with mode_scope(patch, kwargs) as modes:
                named = shrink(bind_arguments(original, args, kwargs))
                ids = named.get("input_ids")
                image_mask = ids == image_token if "llm" in modes and ids is not None else None
                call = start_call(patch.llm, named, image_mask, inner.language_model.config)
                return forward_in_call(call, original, named)

        patch.override(inner, "forward", inner_forward)
        if inner is model:
            return

        def outer_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with mode_scope(patch, kwargs):
                return original(**shrink(bind_arguments(original, args, kwargs)))

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
            return shrunk_generate(
                patch, original, args, kwargs, unscoped(shrink), _TOWER_OR_CONNECTOR
            )

        patch.override(model, "generate", generate)
