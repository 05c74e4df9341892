"""LAVIS image encoders: BLIP's ViT (``lavis.models.vit``) and EVA ViT-g (``lavis.models.eva_vit``).

Both are found by structure (a ``VisionTransformer`` whose blocks hold ``norm1``,
``attn``, ``norm2``, ``mlp``), so the modules work however they were imported (LAVIS
itself needs transformers < 4.27; its two encoder modules load on their own). One q/k/v
layout form describes both attentions: a fused ``qkv`` (BLIP: with bias; EVA: bias-free with
separate ``q_bias``/``v_bias``), ``scale``, ``num_heads``, ``proj``. A LAVIS user
patches the image encoder of a LAVIS model::

    turbo_adapters.apply(model.visual_encoder, "reference-blip-caption")

and the rest of the model (BLIP's text decoder, BLIP-2's Q-Former) takes the shorter
image sequence as it comes; the CLS stays first. Not supported while merging: Grad-CAM
attention maps (``register_blk``), EVA's relative position bias, and blocks wrapped for
gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from ..attention import QKVLayout, layout_attention
from ..blocks import BlockSpec
from ..patch import TurboPatch
from ..site import ReductionSite
from .tower import TowerAdapter, TowerFamily

__all__ = [
    "EVA_ATTENTION",
    "EVA_BLOCK",
    "LAVIS_ATTENTION",
    "LAVIS_BLOCK",
    "LAVIS_VIT",
    "LavisViTAdapter",
    "lavis_kind",
]

_COMMON: dict[str, Any] = dict(
    fused="qkv",
    num_heads="num_heads",
    scale="scale",
    dropout="attn_drop",
    out="proj",
    out_dropout="proj_drop",
)
#: ``lavis.models.vit.Attention`` (BLIP): a fused ``qkv`` with its own bias.
LAVIS_ATTENTION = QKVLayout(**_COMMON)
#: ``lavis.models.eva_vit.Attention``: bias-free ``qkv`` plus ``q_bias``/``v_bias`` (or None).
EVA_ATTENTION = QKVLayout(qkv_biases=("q_bias", None, "v_bias"), **_COMMON)
#: ``lavis.models.vit.Block``.
LAVIS_BLOCK = BlockSpec(
    norm1="norm1", attn="attn", drop1="drop_path", norm2="norm2", mlp="mlp", drop2="drop_path"
)
#: ``lavis.models.eva_vit.Block`` (its ``gamma_1``/``gamma_2`` layer scale may be None).
EVA_BLOCK = dataclasses.replace(LAVIS_BLOCK, ls1="gamma_1", ls2="gamma_2")


def lavis_kind(model: nn.Module) -> str | None:
    """``"vit"`` (BLIP's ViT), ``"eva"`` (EVA ViT-g) or None, judged by structure."""
    if type(model).__name__ != "VisionTransformer" or not hasattr(model, "blocks"):
        return None
    if not hasattr(model, "cls_token") or not hasattr(model, "patch_embed"):
        return None
    blocks = list(model.blocks)
    if not blocks or type(blocks[0]).__name__ != "Block":
        return None
    attn = getattr(blocks[0], "attn", None)
    if attn is None or type(attn).__name__ != "Attention":
        return None
    if not all(hasattr(attn, n) for n in ("qkv", "proj", "scale", "num_heads")):
        return None
    if hasattr(attn, "q_bias") and hasattr(attn, "relative_position_bias_table"):
        return "eva"
    if hasattr(attn, "save_attention_map") and not hasattr(blocks[0], "ls1"):
        return "vit"  # timm's own ViT blocks have ls1/ls2 and are timm-vit's
    return None


def _install_attention(
    patch: TurboPatch, site: ReductionSite, attention: nn.Module, layout: QKVLayout
) -> None:
    """``attention`` on Turbo's path during a call; its extra argument must be inert."""

    def forward(original: Callable[..., Any], x: Any, extra: Any = None, **kwargs: Any) -> Any:
        call = site.current()
        if call is None:
            return original(x, extra, **kwargs) if extra is not None else original(x, **kwargs)
        extra = kwargs.pop("register_hook", kwargs.pop("rel_pos_bias", extra))
        if extra is not None and extra is not False:
            raise ValueError(
                "Turbo cannot merge tokens with attention maps registered (register_blk) or "
                "a relative position bias; call turbo_adapters.remove(model) for those"
            )
        return layout_attention(attention, layout, x, site, call)

    patch.override(attention, "forward", forward)


def _attention_layout(attention: nn.Module) -> QKVLayout:
    return EVA_ATTENTION if hasattr(attention, "relative_position_bias_table") else LAVIS_ATTENTION


def _check(model: nn.Module, tower: nn.Module, blocks: list[nn.Module]) -> None:
    kind = lavis_kind(model)
    if kind is None:
        raise TypeError(f"{type(model).__name__} is not a LAVIS ViT or EVA ViT encoder")
    odd = {type(b.attn).__name__ for b in blocks if type(b.attn).__name__ != "Attention"}
    if odd:
        raise TypeError(f"lavis-vit supports unwrapped Attention modules, found {sorted(odd)}")
    if kind == "eva" and (
        getattr(model, "rel_pos_bias", None) is not None
        or any(b.attn.relative_position_bias_table is not None for b in blocks)
    ):
        raise TypeError("lavis-vit does not support EVA's relative position bias")
    for block in blocks:
        _attention_layout(block.attn).check(block.attn)


LAVIS_VIT = TowerFamily(
    name="lavis-vit",
    model_names=("lavis-vit", "lavis-eva-vit", "eva_vit_g", "lavis/*"),
    # LAVIS's modules are loaded from files as often as imported: matched by structure
    models=(),
    recognise=lambda model: lavis_kind(model) is not None,
    layer_path="blocks",
    block=lambda first: (
        EVA_BLOCK if hasattr(first.attn, "relative_position_bias_table") else LAVIS_BLOCK
    ),
    check=_check,
    attend=lambda patch, site, attn: _install_attention(patch, site, attn, _attention_layout(attn)),
    scopes=("forward_features", "forward"),
)


class LavisViTAdapter(TowerAdapter):
    """LAVIS ``VisionTransformer`` encoders (BLIP ViT-B/L, EVA ViT-g of BLIP-2 / MiniGPT)."""

    family = LAVIS_VIT
