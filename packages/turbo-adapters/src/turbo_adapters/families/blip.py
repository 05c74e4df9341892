"""transformers BLIP (v1): captioning, image-text retrieval (ITM + ITC) and VQA.

One site over the vision tower's ``BlipEncoderLayer`` blocks. ``BlipAttention`` has no
attention registry (fused ``qkv``, ``projection``, eager softmax that always
materialises the probabilities); on Turbo's path it is described by
:data:`BLIP_ATTENTION` and runs fused SDPA with the exact CLS row, so a patched BLIP is
faster at r = 0 too, with the same numbers.

Downstream needs nothing: the text decoder and the ITM/VQA text encoder cross-attend
to however many image tokens arrive (the library builds their all-ones mask from the
image length), ITC reads token 0, the CLS, which is protected and stays first. The
vision tower runs once per ``generate`` (captions, VQA answers), so image tokens are
reduced once per call and the decoder's KV cache holds the reduced tokens for every
step, beam and batch row. As in the authors' code, the cross-attentions see merged
tokens without the ``log(size)`` bias.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from turbo_core import TurboConfig

from ..adapter import model_defaults
from ..attention import QKVLayout, layout_attention
from ..blocks import BlockSpec, install_blocks, install_scope
from ..patch import TurboPatch
from ..site import ReductionSite
from .hf_vit import HFAdapter, find_one

__all__ = ["BLIP_ATTENTION", "BLIP_LAYER", "BlipAdapter", "install_blip_attention"]

#: ``BlipAttention``: one fused ``qkv`` Linear (with bias), ``projection`` out.
BLIP_ATTENTION = QKVLayout(
    fused="qkv", head_dim="head_dim", scale="scale", dropout="dropout", out="projection"
)
#: ``BlipEncoderLayer``; the attention is installed by :func:`install_blip_attention`.
BLIP_LAYER = BlockSpec(norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", mlp="mlp")


def install_blip_attention(
    patch: TurboPatch, site: ReductionSite, attention: nn.Module, layout: QKVLayout = BLIP_ATTENTION
) -> None:
    """``attention`` on Turbo's path during a call, keeping its ``(output, weights)`` return.

    The weights are None on Turbo's path (they are never materialised); transformers'
    output recorders then see None instead of a wrong slice of the output.
    """
    layout.check(attention)

    def forward(original: Callable[..., Any], hidden_states: Any = None, **kwargs: Any) -> Any:
        call = site.current()
        if call is None:
            return original(hidden_states, **kwargs)
        return layout_attention(attention, layout, hidden_states, site, call), None

    patch.override(attention, "forward", forward)


class BlipAdapter(HFAdapter):
    """``BlipForConditionalGeneration``, ``BlipForImageTextRetrieval``,
    ``BlipForQuestionAnswering``, ``BlipModel`` and ``BlipVisionModel``."""

    name = "hf-blip"
    model_names = (
        "Salesforce/blip-image-captioning-*",
        "Salesforce/blip-itm-*",
        "Salesforce/blip-vqa-*",
        "blip-image-captioning-*",
        "blip-itm-*",
        "blip-vqa-*",
    )
    model_types = ("blip", "blip_vision_model")

    def classes(self) -> dict[str, Any]:
        from transformers.models.blip import modeling_blip as blip

        return {
            "models": (
                blip.BlipForConditionalGeneration,
                blip.BlipForImageTextRetrieval,
                blip.BlipForQuestionAnswering,
                blip.BlipModel,
                blip.BlipVisionModel,
            ),
            "tower": (blip.BlipVisionModel,),
            "layers": (blip.BlipEncoderLayer,),
            "attention": (blip.BlipAttention,),
        }

    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        classes = self.classes()
        tower = find_one(model, classes["tower"], "BLIP vision tower")
        layers = list(tower.encoder.layers)
        odd = {type(layer).__name__ for layer in layers if not isinstance(layer, classes["layers"])}
        odd |= {
            type(layer.self_attn).__name__
            for layer in layers
            if not isinstance(layer.self_attn, classes["attention"])
        }
        if not layers or odd:
            raise TypeError(
                f"hf-blip supports BlipEncoderLayer with BlipAttention; this model has {sorted(odd)}"
            )
        for layer in layers:  # check everything before patching anything
            BLIP_LAYER.check(layer)
            BLIP_ATTENTION.check(layer.self_attn)
        site = ReductionSite("vision", model_defaults(config, 1), len(layers))
        patch.add_site(site)
        for layer in layers:
            install_blip_attention(patch, site, layer.self_attn)
        install_blocks(patch, site, layers, BLIP_LAYER)
        install_scope(patch, site, tower)
