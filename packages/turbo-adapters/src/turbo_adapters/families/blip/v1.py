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

import contextvars
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import nn

from turbo_core import size_log_bias

from ...attention import QKVLayout, layout_attention
from ...blocks import BlockSpec, token_sizes
from ...patch import TurboPatch
from ...site import ReductionSite
from ..tower import TowerAdapter, TowerFamily
from . import guided

__all__ = [
    "BLIP",
    "BLIP_ATTENTION",
    "BLIP_LAYER",
    "CROSS_SITE",
    "BlipAdapter",
    "install_blip_attention",
    "use_cross_modal_guidance",
    "use_size_bias_downstream",
]

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


def _check_attention(model: nn.Module, tower: nn.Module, layers: list[nn.Module]) -> None:
    for layer in layers:  # check everything before patching anything
        BLIP_ATTENTION.check(layer.self_attn)


_BLIP = "transformers.models.blip.modeling_blip:"

BLIP = TowerFamily(
    name="hf-blip",
    model_names=(
        "Salesforce/blip-image-captioning-*",
        "Salesforce/blip-itm-*",
        "Salesforce/blip-vqa-*",
        "blip-image-captioning-*",
        "blip-itm-*",
        "blip-vqa-*",
    ),
    model_types=("blip", "blip_vision_model"),
    models=(
        _BLIP + "BlipForConditionalGeneration",
        _BLIP + "BlipForImageTextRetrieval",
        _BLIP + "BlipForQuestionAnswering",
        _BLIP + "BlipModel",
        _BLIP + "BlipVisionModel",
    ),
    tower=(_BLIP + "BlipVisionModel",),
    layers=(_BLIP + "BlipEncoderLayer",),
    layer_path="encoder.layers",
    attention=(_BLIP + "BlipAttention",),
    block=BLIP_LAYER,
    check=_check_attention,
    # no attention registry in BlipAttention: Turbo projects q/k/v by BLIP_ATTENTION
    attend=install_blip_attention,
)


class BlipAdapter(TowerAdapter):
    """``BlipForConditionalGeneration``, ``BlipForImageTextRetrieval``,
    ``BlipForQuestionAnswering``, ``BlipModel`` and ``BlipVisionModel``."""

    family = BLIP


# ------------------------------------------------------------ cross-modal guidance
CROSS_SITE = guided.CROSS_SITE


def use_cross_modal_guidance(
    patch: TurboPatch, r: int, *, reduce: str = "merge", pool: str = "mean", **changes: Any
) -> ReductionSite:
    """Reduce the image tokens once more, ranked by the text, before the cross-attentions.

    For models whose text encoder cross-attends to the image (``BlipForImageTextRetrieval``
    with the ITM head, ``BlipForQuestionAnswering``): at the first cross-attention the
    text tokens' attention over the image tokens (averaged over heads, pooled over the
    real text tokens) is the semantic value, the image keys the redundancy metric; ``r``
    tokens are merged (size-weighted) or pruned (dropped; the survivors keep their
    sizes) and every cross-attention of the call sees the reduced image. The CLS stays
    first. The ranking uses the text's hidden states as the first cross-attention
    receives them (after layer 0's self-attention): the reduction happens inside that
    layer, just before its cross-attention, which projects the image keys a second time
    (the ranking's keys cover the full image). The vision tower keeps its own
    CLS-guided schedule (``patch.configure(site="vision", r=...)``); this site is
    ``patch.sites["text-guided"]`` (``patch.configure(site="text-guided", r=...,
    alpha=...)``). Only layer 0's cross-attention ranks: if something replaced its
    forward after this call, nothing is reduced and the call warns
    (:class:`~turbo_adapters.TurboBypassWarning`).

    Args:
        patch: a patch made by the hf-blip adapter.
        r: image tokens this step removes (clipped like any block's r).
        reduce: ``"merge"`` or ``"prune"``.
        pool: ``"mean"`` or ``"max"`` over the text tokens.
        **changes: config fields for this site (``alpha``, ``mode``, ``trace_source`` ...);
            the rest is the vision site's config with ``min_tokens=0``.
    """
    guided.check_options(reduce, pool)
    if patch.adapter_name != BlipAdapter.name or "vision" not in patch.sites:
        raise TypeError("use_cross_modal_guidance needs a patch made by the hf-blip adapter")
    encoder = getattr(patch.model, "text_encoder", None)
    layers = list(getattr(getattr(encoder, "encoder", None), "layer", []))
    if not layers or not all(hasattr(layer, "crossattention") for layer in layers):
        raise TypeError(
            f"{type(patch.model).__name__} has no text encoder that cross-attends to the image "
            "(cross-modal guidance needs BlipForImageTextRetrieval or BlipForQuestionAnswering)"
        )
    site = guided.add_guided_site(patch, r, changes)

    def entry(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        image = kwargs.get("encoder_hidden_states")
        if image is None:
            return original(*args, **kwargs)
        text_mask = kwargs.get("attention_mask")
        if text_mask is None and len(args) > 1:
            text_mask = args[1]
        weight = text_mask if text_mask is not None and text_mask.dim() == 2 else None
        with guided.guided_call(
            site, image, token_sizes(image), reduce=reduce, pool=pool, row_weight=weight
        ):
            return original(*args, **kwargs)

    patch.override(encoder, "forward", entry)
    for index, layer in enumerate(layers):
        _install_cross_attention(patch, layer.crossattention, ranks=index == 0)
    return site


def _install_cross_attention(patch: TurboPatch, attention: nn.Module, *, ranks: bool) -> None:
    """``ranks``: layer 0's cross-attention, the only one that ranks and reduces."""

    def forward(
        original: Callable[..., Any],
        hidden_states: Any,
        attention_mask: Any = None,
        encoder_hidden_states: Any = None,
        **kwargs: Any,
    ) -> Any:
        call = guided.active()
        if call is None or encoder_hidden_states is not call.image:
            return original(hidden_states, attention_mask, encoder_hidden_states, **kwargs)
        if call.reduced is None and not ranks:  # layer 0 was bypassed: the call warns
            return original(hidden_states, attention_mask, encoder_hidden_states, **kwargs)
        if call.reduced is None:  # the first cross-attention of this call ranks
            inner = attention.self
            width = inner.attention_head_size

            def queries() -> torch.Tensor:
                return rearrange(inner.query(hidden_states), "b t (h d) -> b h t d", d=width)

            def keys() -> torch.Tensor:
                return rearrange(inner.key(call.image), "b n (h d) -> b h n d", d=width)

            bias = None
            if inner in patch.family_state(_BIASED, set):  # rank as this layer attends
                bias = size_log_bias(call.size, hidden_states.dtype)
            guided.reduce_image(call, queries, keys, scale=width**-0.5, bias=bias)
        if call.reduced is call.image:  # nothing removed: the call as it was
            return original(hidden_states, attention_mask, encoder_hidden_states, **kwargs)
        # BLIP's image mask is all ones; the reduced image has no padding either
        return original(hidden_states, None, call.reduced, **kwargs)

    patch.override(attention, "forward", forward)


# ------------------------------------------------- proportional attention downstream
_IMAGE_SIZES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "turbo_blip_image_sizes", default=None
)


def use_size_bias_downstream(patch: TurboPatch) -> None:
    """Let the text side's cross-attentions see ``log(size)`` of merged image tokens.

    Off by default, as in the authors' code (the decoder and text encoder attend to
    merged tokens with an all-ones mask). When on, every cross-attention over the image
    (the caption decoder's, the ITM/VQA text encoder's; not the VQA answer decoder's,
    which attends to the question) adds ``log(size)`` to its logits, at every decoding
    step and for every beam (sizes follow generate's ``repeat_interleave`` expansion).
    The bias reaches the library's attention as its ``encoder_attention_mask``. The
    sizes come from the image tensor itself when it carries them (the patched tower's
    output, also when the text encoder is called on it directly, as a retrieval loop
    that encodes each image once does), else from the call's tower output.
    """
    if patch.adapter_name != BlipAdapter.name or "vision" not in patch.sites:
        raise TypeError("use_size_bias_downstream needs a patch made by the hf-blip adapter")
    model, vision = patch.model, patch.sites["vision"]
    tower = BlipAdapter().find_tower(model)
    from transformers.models.blip.modeling_blip import BlipForQuestionAnswering

    # the VQA answer decoder cross-attends to the question, not to the image
    names = (
        ("text_encoder",)
        if isinstance(model, BlipForQuestionAnswering)
        else ("text_decoder", "text_encoder")
    )
    readers = [getattr(model, name, None) for name in names]
    cross = [
        layer.crossattention.self
        for reader in readers
        if reader is not None
        for layer in reader.modules()
        if hasattr(layer, "crossattention")
    ]
    if not cross:
        raise TypeError(f"{type(model).__name__} has no cross-attention over the image")

    def record(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        sizes = _IMAGE_SIZES.get()
        if sizes is not None and vision.current() is None:  # the outermost tower call
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            sizes["size"] = token_sizes(hidden)
        return output

    patch.override(tower, "forward", record)

    def entry(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if _IMAGE_SIZES.get() is not None:
            return original(*args, **kwargs)
        token = _IMAGE_SIZES.set({"size": None})
        try:
            return original(*args, **kwargs)
        finally:
            _IMAGE_SIZES.reset(token)

    for name in ("forward", "generate"):
        if hasattr(model, name):
            patch.override(model, name, entry)
    for attention in cross:
        _install_size_bias(patch, attention)


def _image_sizes(image: torch.Tensor) -> torch.Tensor | None:
    """``(B', N, 1)`` sizes of the image tokens a cross-attention receives, or None."""
    call = guided.active()
    if call is not None and call.reduced is not None and image is call.reduced:
        return call.reduced_size
    own = token_sizes(image)  # the tower's output, whoever calls the text side with it
    if own is not None and own.shape[:2] == image.shape[:2]:
        return own
    sizes = _IMAGE_SIZES.get()
    size = None if sizes is None else sizes["size"]
    if size is None or size.shape[1] != image.shape[1] or image.shape[0] % size.shape[0]:
        return None
    repeats = image.shape[0] // size.shape[0]  # generate expands rows by repeat_interleave
    return size if repeats == 1 else size.repeat_interleave(repeats, dim=0)


#: The patch's state key of the cross-attentions that add ``log(size)`` (the guided ranking
#: then adds it too).
_BIASED = "blip.size_biased_cross_attentions"


def _install_size_bias(patch: TurboPatch, attention: nn.Module) -> None:
    patch.family_state(_BIASED, set).add(attention)

    def forward(original: Callable[..., Any], hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        image = kwargs.get("encoder_hidden_states")
        if image is not None:
            size = _image_sizes(image)
            if size is not None:
                kwargs["encoder_attention_mask"] = size_log_bias(size, hidden_states.dtype)
        return original(hidden_states, *args, **kwargs)

    patch.override(attention, "forward", forward)
