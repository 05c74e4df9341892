"""Vision-language models whose image tokens are scattered into placeholder runs: the
connector stage (and LLM mode where the decoder is causal), one install for all of them.

A family declares its transformers classes, why tower merging is refused, and whether
LLM mode fits; the stage encodes the images with the model's own ``get_image_features``
(every image argument it accepts, as ``generate`` does), reduces each image's tokens,
cuts its placeholder run to the kept tokens (re-laying ``token_type_ids``, which
PaliGemma and Gemma 3 use for their bidirectional image blocks) and hands the kept
tokens on as ``mm_encoder_outputs``. Positions are the model's own for the shorter
prompt (1-D RoPE: the text after an image moves up by the tokens removed). Merged
tokens carry ``log(size)`` into every family's decoder attention (added to its mask, so
the prefix-LM image blocks stay bidirectional; :mod:`.llava.size_bias`).

Families: PaliGemma (SigLIP, linear projection), Gemma 3 (reduce after the 4096 -> 256
average pool), LLaVA-OneVision (anyres tiles and newline tokens packed per image, like
LLaVA-NeXT: the packed tokens are reduced), Idefics3 / SmolVLM and InternVL (after the
pixel shuffle; Idefics3's features come per row, all its tiles together, so a budget
applies per row there; InternVL's per tile). InternVL also merges inside its InternViT
tower (tower mode, restored before the pixel shuffle; :mod:`.internvl_vision`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from turbo_core import TurboConfig

from ..compat import IncompatibleLibraryError
from ..connector.calls import module_weights, reduce_call
from ..connector.guides import probe_guide, resolve_guide
from ..patch import TurboPatch
from .hf_base import HFAdapter
from .internvl_vision import install_internvl_tower, internvl_tower_refusal
from .llava.adapter import _pad_id
from .llava.llm import (
    bind_arguments,
    check_decoder,
    forward_in_call,
    install_decoder_layers,
    start_call,
)
from .llava.modes import VisionLanguagePatch, mode_scope, shrunk_generate, unscoped
from .llava.size_bias import install_size_bias

__all__ = [
    "ConnectorVLMAdapter",
    "Gemma3Adapter",
    "Idefics3Adapter",
    "InternVLAdapter",
    "LlavaOneVisionAdapter",
    "PaliGemmaAdapter",
]


def _decoder(inner: nn.Module) -> nn.Module:
    """The language model (``language_model``; Idefics3 / SmolVLM call it ``text_model``)."""
    found = getattr(inner, "language_model", None)
    return found if found is not None else inner.text_model


def _image_token(config: Any) -> int:
    found = getattr(config, "image_token_id", None)
    return int(found if found is not None else config.image_token_index)


class ConnectorVLMAdapter(HFAdapter):
    """The shared install. Subclasses set the names, ``models``, :meth:`classes`
    (``"inner"``), :attr:`tower_refusal` and :attr:`llm_refusal` (None: LLM mode fits)."""

    patch_class = VisionLanguagePatch
    stages: tuple[str, ...] = ("connector", "llm")
    tower_refusal = ""
    llm_refusal: str | None = None
    #: how the SigLIP pooling head's probe attention maps onto the image tokens:
    #: ``"direct"`` (one token per patch), ``"pool"`` (Gemma 3's average pool), or None
    #: (no one-to-one map, or no SigLIP head): no ``"probe"`` guide
    probe_layout: str | None = None

    def _probe_head(self, inner: nn.Module) -> nn.Module | None:
        if self.probe_layout is None:
            return None
        tower = getattr(inner, "vision_tower", None)
        # transformers 5's SiglipVisionModel holds the head itself; 4.x nests a vision_model
        tower = getattr(tower, "vision_model", tower)
        head = getattr(tower, "head", None) if getattr(tower, "use_head", True) else None
        return head if hasattr(head, "probe") else None

    def _guide(
        self, patch: VisionLanguagePatch, inner: nn.Module, output: Any
    ) -> tuple[str, list[torch.Tensor] | None]:
        """The call's resolved guide name and, for ``"probe"``, the per-image guides."""
        head = self._probe_head(inner)
        own = ("probe",) if head is not None else ()
        name = resolve_guide(patch.connector.guide, own, own[0] if own else "mean", self.name)
        if name != "probe" or head is None:
            return name, None
        guide = probe_guide(head, output.last_hidden_state)
        if self.probe_layout == "pool":
            guide = _pooled(inner.multi_modal_projector, guide)
        return name, list(guide)

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        if not isinstance(patch, VisionLanguagePatch):
            raise TypeError(f"the {self.name} adapter needs a VisionLanguagePatch")
        inner = model if isinstance(model, self.classes()["inner"]) else model.model
        decoder = _decoder(inner)
        layers = list(decoder.layers)
        patch.num_text_layers = len(layers)
        patch.tower_refusal = self.tower_refusal
        patch.connector_available = True
        # log(size) of connector-merged tokens in the decoder's attention (added to the
        # mask, so prefix-LM image blocks keep their bidirectional attention)
        install_size_bias(patch, [layer.self_attn for layer in layers], decoder.config)
        if self.llm_refusal is not None:
            patch.llm_refusal = IncompatibleLibraryError(
                f"{self.name} (llm mode): {self.llm_refusal}"
            )
        else:
            try:
                check_decoder(patch.adapter_name, decoder, layers)
                install_decoder_layers(patch, layers)
            except IncompatibleLibraryError as refusal:
                patch.llm_refusal = refusal
        patch.modes = "connector"
        self._install_entries(patch, model, inner)

    def _install_entries(
        self, patch: VisionLanguagePatch, model: nn.Module, inner: nn.Module
    ) -> None:
        image_token = _image_token(inner.config)
        accepted = [
            p for p in inspect.signature(inner.get_image_features).parameters if p != "kwargs"
        ]

        def shrink(named: dict[str, Any]) -> dict[str, Any]:
            if "connector" not in patch.active_modes() or named.get("pixel_values") is None:
                return named
            kwargs = {k: named[k] for k in accepted if named.get(k) is not None}
            with module_weights(inner):
                output = inner.get_image_features(**kwargs, return_dict=True)
            pooled = output.pooler_output
            guide, guides = self._guide(patch, inner, output)
            done = reduce_call(
                patch, patch.connector, named, list(pooled), image_token, _pad_id(model),
                embed=inner.get_input_embeddings(), guides=guides, guide=guide,
            )  # fmt: skip
            kept = [k.tokens for k in done.kept]
            output = copy.copy(output)
            # a tensor (images, N, D) becomes one (1, total, D): scattered in the same order
            output.pooler_output = (
                torch.cat(kept)[None] if isinstance(pooled, torch.Tensor) else kept
            )
            named = done.named
            for key in kwargs:
                named.pop(key, None)
            named["mm_encoder_outputs"] = {
                **(named.get("mm_encoder_outputs") or {}),
                "image": output,
            }
            if named.get("position_ids") is not None:
                mask = named.get("attention_mask")
                named["position_ids"] = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
            return named

        def inner_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with mode_scope(patch, kwargs) as modes:
                named = shrink(bind_arguments(original, args, kwargs))
                ids = named.get("input_ids")
                image_mask = ids == image_token if "llm" in modes and ids is not None else None
                call = start_call(patch.llm, named, image_mask, _decoder(inner).config)
                return forward_in_call(call, original, named)

        patch.override(inner, "forward", inner_forward)
        if inner is model:
            return

        def outer_forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with mode_scope(patch, kwargs):
                return original(**shrink(bind_arguments(original, args, kwargs)))

        patch.override(model, "forward", outer_forward)

        def generate(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return shrunk_generate(patch, original, args, kwargs, unscoped(shrink))

        patch.override(model, "generate", generate)


def _pooled(projector: nn.Module, guide: torch.Tensor) -> torch.Tensor:
    """Gemma 3: the patch guide ``(B, P*P)`` summed over each average-pool window, in the
    pooled tokens' order (the attention mass each pooled token stands for)."""
    side, kernel = int(projector.patches_per_image), int(projector.kernel_size)
    grid = guide.reshape(guide.shape[0], 1, side, side)
    return torch.nn.functional.avg_pool2d(grid, kernel).flatten(1) * kernel * kernel


_PREFIX_LM = (
    "its language model attends bidirectionally within each image block (token_type_ids), "
    "which LLM mode's causal re-masking does not keep"
)


class PaliGemmaAdapter(ConnectorVLMAdapter):
    """transformers ``PaliGemmaForConditionalGeneration`` / ``PaliGemmaModel``."""

    name = "paligemma"
    model_names = ("google/paligemma-*", "google/paligemma2-*", "paligemma*")
    model_types = ("paligemma",)
    models = (
        "transformers.models.paligemma.modeling_paligemma:PaliGemmaForConditionalGeneration",
        "transformers.models.paligemma.modeling_paligemma:PaliGemmaModel",
    )
    tower_refusal = (
        "tower merging on SigLIP towers (no CLS token) is not supported yet; use 'connector'"
    )
    llm_refusal = _PREFIX_LM
    probe_layout = "direct"
    stages = ("connector",)

    def classes(self) -> dict[str, Any]:
        from transformers.models.paligemma import modeling_paligemma as pg

        return {
            "inner": (pg.PaliGemmaModel,),
        }


class Gemma3Adapter(ConnectorVLMAdapter):
    """transformers ``Gemma3ForConditionalGeneration`` / ``Gemma3Model`` (the connector stage
    reduces the 256 tokens the 4096 -> 256 average pool gives each image)."""

    name = "gemma3"
    model_names = ("google/gemma-3-*", "gemma-3-*", "gemma3*")
    model_types = ("gemma3",)
    models = (
        "transformers.models.gemma3.modeling_gemma3:Gemma3ForConditionalGeneration",
        "transformers.models.gemma3.modeling_gemma3:Gemma3Model",
    )
    tower_refusal = (
        "Gemma 3 average-pools the SigLIP grid to 256 tokens, which merged tower tokens no "
        "longer fill; use 'connector' (after the pool)"
    )
    llm_refusal = _PREFIX_LM
    probe_layout = "pool"
    stages = ("connector",)

    def classes(self) -> dict[str, Any]:
        from transformers.models.gemma3 import modeling_gemma3 as g3

        return {
            "inner": (g3.Gemma3Model,),
        }


class LlavaOneVisionAdapter(ConnectorVLMAdapter):
    """transformers ``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``."""

    name = "llava-onevision"
    model_names = ("llava-hf/llava-onevision-*", "lmms-lab/llava-onevision-*")
    model_types = ("llava_onevision",)
    models = (
        "transformers.models.llava_onevision.modeling_llava_onevision:LlavaOnevisionForConditionalGeneration",
        "transformers.models.llava_onevision.modeling_llava_onevision:LlavaOnevisionModel",
    )
    tower_refusal = (
        "LLaVA-OneVision's pack_image_features reshapes every tile to its patch grid and "
        "adds newline tokens, which merged tower tokens no longer fill; use 'connector'"
    )

    def classes(self) -> dict[str, Any]:
        from transformers.models.llava_onevision import modeling_llava_onevision as ov

        return {
            "inner": (ov.LlavaOnevisionModel,),
        }


_SHUFFLE = "pixel-shuffles each tile's full patch grid, which merged tower tokens no longer fill"


class Idefics3Adapter(ConnectorVLMAdapter):
    """transformers ``Idefics3`` and ``SmolVLM`` (conditional generation and base models)."""

    name = "idefics3"
    model_names = ("HuggingFaceM4/Idefics3-*", "HuggingFaceTB/SmolVLM*", "smolvlm*", "idefics3*")
    model_types = ("idefics3", "smolvlm")
    models = (
        "transformers.models.idefics3.modeling_idefics3:Idefics3ForConditionalGeneration",
        "transformers.models.idefics3.modeling_idefics3:Idefics3Model",
        "transformers.models.smolvlm.modeling_smolvlm:SmolVLMForConditionalGeneration",
        "transformers.models.smolvlm.modeling_smolvlm:SmolVLMModel",
    )
    tower_refusal = f"Idefics3 / SmolVLM {_SHUFFLE}; use 'connector' (after the shuffle)"

    def classes(self) -> dict[str, Any]:
        from transformers.models.idefics3 import modeling_idefics3 as i3
        from transformers.models.smolvlm import modeling_smolvlm as sv

        return {
            "inner": (i3.Idefics3Model, sv.SmolVLMModel),
        }  # fmt: skip


class InternVLAdapter(ConnectorVLMAdapter):
    """transformers ``InternVLForConditionalGeneration`` / ``InternVLModel``.

    Tower mode merges inside InternViT (CLS guide, :mod:`.internvl_vision`) and hands the
    full grid back before the pixel shuffle: the tower's compute shrinks, the language
    model sees the unpatched count (the connector stage reduces that, after the shuffle).
    """

    name = "internvl"
    model_names = ("OpenGVLab/InternVL*", "internvl*")
    model_types = ("internvl",)
    models = (
        "transformers.models.internvl.modeling_internvl:InternVLForConditionalGeneration",
        "transformers.models.internvl.modeling_internvl:InternVLModel",
    )
    stages = ("tower", "connector", "llm")
    stage_limits = MappingProxyType(
        {"tower": "not where InternVL reads an intermediate InternViT layer "
                  "(vision_feature_layer != -1; the released checkpoints read the last)"}
    )  # fmt: skip

    def classes(self) -> dict[str, Any]:
        from transformers.models.internvl import modeling_internvl as iv

        return {
            "inner": (iv.InternVLModel,),
        }

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        super().install(patch, model, config)
        inner = model if isinstance(model, self.classes()["inner"]) else model.model
        refusal = internvl_tower_refusal(inner)
        if refusal is not None:
            patch.tower_refusal = refusal
            return
        install_internvl_tower(patch, inner, config)
        patch.tower_refusal = ""
        patch.tower_available = True
