"""transformers BLIP-2 and InstructBLIP: the EVA ViT-g vision tower, reduced once per call.

The vision attention (fused ``qkv`` whose bias is ``q_bias, 0, v_bias``) dispatches
through transformers' attention registry, so Turbo's registered function receives q,
k and v from the library and the encoder layers run on the block runner. The tower's
config is a sub-config of its own: the Q-Former and the language model keep their
attention implementations.

Downstream needs no change: the Q-Former cross-attends from its 32 queries to however
many image tokens arrive (its all-ones image mask is built from the image length), so
the language model always receives ``num_query_tokens`` embeddings, and ``generate``
runs the vision tower once: the reduction happens once per call, never per decoding
step, for any batch size and beam count. The pooled output (ITC in
``Blip2ForImageTextRetrieval`` reads the Q-Former, not it) is the protected CLS.

Two options act on the Q-Former, as BLIP's do on its text side:
:func:`use_cross_modal_guidance` (one more reduction of the image, ranked by the
Q-Former's first cross-attention; shared code in :mod:`.guided`) and
:func:`use_size_bias_downstream` (``log(size)`` in the Q-Former's cross-attentions).
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import nn

from turbo_core import size_log_bias

from ...blocks import BlockSpec, token_sizes
from ...patch import TurboPatch
from ...site import ReductionSite
from ..tower import TowerAdapter, TowerFamily
from . import guided

__all__ = [
    "BLIP2",
    "BLIP2_LAYER",
    "CROSS_SITE",
    "INSTRUCTBLIP",
    "Blip2Adapter",
    "InstructBlipAdapter",
    "use_cross_modal_guidance",
    "use_size_bias_downstream",
]

#: ``Blip2EncoderLayer`` / ``InstructBlipEncoderLayer`` (pre-norm, registry attention).
BLIP2_LAYER = BlockSpec(norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", mlp="mlp")


_BLIP2 = "transformers.models.blip_2.modeling_blip_2:"
_IBLIP = "transformers.models.instructblip.modeling_instructblip:"

BLIP2 = TowerFamily(
    name="hf-blip2",
    model_names=("Salesforce/blip2-*", "blip2-*"),
    model_types=("blip-2", "blip_2", "blip2", "blip_2_vision_model"),
    models=(
        _BLIP2 + "Blip2ForConditionalGeneration",
        _BLIP2 + "Blip2Model",
        _BLIP2 + "Blip2ForImageTextRetrieval",
        _BLIP2 + "Blip2VisionModel",
        _BLIP2 + "Blip2VisionModelWithProjection",
    ),
    tower=(_BLIP2 + "Blip2VisionModel",),
    layers=(_BLIP2 + "Blip2EncoderLayer",),
    layer_path="encoder.layers",
    block=BLIP2_LAYER,
)

INSTRUCTBLIP = TowerFamily(
    name="hf-instructblip",
    model_names=("Salesforce/instructblip-*", "instructblip-*"),
    model_types=("instructblip", "instructblip_vision_model"),
    models=(
        _IBLIP + "InstructBlipForConditionalGeneration",
        _IBLIP + "InstructBlipModel",
        _IBLIP + "InstructBlipVisionModel",
    ),
    tower=(_IBLIP + "InstructBlipVisionModel",),
    layers=(_IBLIP + "InstructBlipEncoderLayer",),
    layer_path="encoder.layers",
    block=BLIP2_LAYER,
)


class Blip2Adapter(TowerAdapter):
    """``Blip2ForConditionalGeneration`` (OPT and T5 language models), ``Blip2Model``,
    ``Blip2ForImageTextRetrieval``, ``Blip2VisionModel`` (``...WithProjection``)."""

    family = BLIP2


class InstructBlipAdapter(TowerAdapter):
    """``InstructBlipForConditionalGeneration``, ``InstructBlipModel``, ``InstructBlipVisionModel``."""

    family = INSTRUCTBLIP


# ------------------------------------------------- the Q-Former: guidance, size bias
CROSS_SITE = guided.CROSS_SITE
_ADAPTERS = (Blip2Adapter.name, InstructBlipAdapter.name)


@dataclasses.dataclass
class _QFormerHooks:
    """What a patch asked of its Q-Former; the wrappers read it at every call."""

    site: ReductionSite | None = None
    reduce: str = "merge"
    pool: str = "mean"
    bias: bool = False
    installed: bool = False  # the wrappers are in place


@dataclasses.dataclass
class _QFormerImage:
    """The image of one Q-Former call, as its cross-attentions receive it."""

    image: torch.Tensor
    size: torch.Tensor | None


#: The patch's state key of its Q-Former wrappers (installed by the first option needing them).
_HOOKS = "blip2.qformer_hooks"
#: Sizes of the image handed to the Q-Former (before its fp32 cast drops them).
_INCOMING: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "turbo_qformer_incoming_size", default=None
)
_IMAGE: contextvars.ContextVar[_QFormerImage | None] = contextvars.ContextVar(
    "turbo_qformer_image", default=None
)


def use_cross_modal_guidance(
    patch: TurboPatch, r: int, *, reduce: str = "merge", pool: str = "mean", **changes: Any
) -> ReductionSite:
    """Reduce the image tokens once more, ranked by the Q-Former, before its cross-attentions.

    The same option as BLIP's (:func:`turbo_adapters.families.blip.use_cross_modal_guidance`)
    for ``Blip2ForConditionalGeneration``, ``Blip2Model``, ``Blip2ForImageTextRetrieval``
    and ``InstructBlipForConditionalGeneration``: the Q-Former's first cross-attention
    (layer 0; the others follow every ``cross_attention_frequency`` layers) ranks the
    image tokens by its queries' attention over them (averaged over heads, pooled over
    the query tokens: ``pool="mean"`` or ``"max"``), the image keys are the redundancy
    metric, and ``r`` tokens are merged (size-weighted) or pruned (the survivors keep
    their sizes); every cross-attention of the call sees the reduced image. The
    language model still receives ``num_query_tokens`` embeddings.

    Which text guides: only the learned query tokens cross-attend. They enter that
    cross-attention after layer 0's self-attention, where they sit beside the text the
    Q-Former reads (InstructBLIP's instruction, the ITM text of
    ``Blip2ForImageTextRetrieval``): with such text the ranking follows it. Plain BLIP-2
    queries read no text (the prompt goes to the language model only), so their ranking
    depends on the image alone. The ranking uses those hidden states exactly as the
    first cross-attention receives them: the reduction happens inside layer 0, just
    before its cross-attention, which projects the image keys a second time (the
    ranking's keys cover the full image; the FLOPs count both).

    The vision tower keeps its CLS-guided schedule (``patch.configure(site="vision",
    r=...)``); this site is ``patch.sites["text-guided"]``. Only layer 0's
    cross-attention ranks: if something replaced its forward after this call, nothing is
    reduced and the call warns (:class:`~turbo_adapters.TurboBypassWarning`).

    Args:
        patch: a patch made by the hf-blip2 or hf-instructblip adapter.
        r: image tokens this step removes (clipped like any block's r).
        reduce: ``"merge"`` or ``"prune"``.
        pool: ``"mean"`` or ``"max"`` over the query tokens.
        **changes: config fields for this site (``alpha``, ``mode``, ``trace_source`` ...);
            the rest is the vision site's config with ``min_tokens=0``.
    """
    guided.check_options(reduce, pool)
    hooks = _install(patch, "use_cross_modal_guidance")
    site = guided.add_guided_site(patch, r, changes)
    hooks.site, hooks.reduce, hooks.pool = site, reduce, pool
    return site


def use_size_bias_downstream(patch: TurboPatch) -> None:
    """Let the Q-Former's cross-attentions see ``log(size)`` of merged image tokens.

    Off by default, as in the authors' code. When on, every Q-Former cross-attention over
    a merged image (from the vision tower, and after the guided reduction when
    :func:`use_cross_modal_guidance` is on, whose ranking then sees the bias too) adds
    ``log(size)`` to its logits through its ``encoder_attention_mask``.
    """
    hooks = _install(patch, "use_size_bias_downstream")
    implementation = getattr(patch.model.qformer.config, "_attn_implementation", None)
    if implementation not in (None, "eager", "sdpa"):
        raise TypeError(
            "use_size_bias_downstream needs the Q-Former's eager or sdpa attention (a float "
            f"mask), found {implementation!r}"
        )
    hooks.bias = True


def _install(patch: TurboPatch, option: str) -> _QFormerHooks:
    """The Q-Former wrappers of ``patch`` (installed by the first option that needs them)."""
    if patch.adapter_name not in _ADAPTERS or "vision" not in patch.sites:
        raise TypeError(f"{option} needs a patch made by the hf-blip2 or hf-instructblip adapter")
    hooks: _QFormerHooks = patch.family_state(_HOOKS, _QFormerHooks)
    if hooks.installed:
        return hooks
    qformer = getattr(patch.model, "qformer", None)
    layers = list(getattr(getattr(qformer, "encoder", None), "layer", []))
    cross = [layer.crossattention for layer in layers if getattr(layer, "has_cross_attention", 0)]
    if not cross or getattr(layers[0], "crossattention", None) is not cross[0]:
        raise TypeError(
            f"{type(patch.model).__name__} has no Q-Former whose layer 0 cross-attends to the "
            f"image ({option} needs a BLIP-2 or InstructBLIP model with its Q-Former)"
        )
    for attention in cross:  # check everything before patching anything
        inner = getattr(attention, "attention", None)
        missing = [
            name
            for name in ("query", "key", "attention_head_size", "scaling")
            if not hasattr(inner, name)
        ]
        if missing:
            raise TypeError(f"{type(attention).__name__}.attention has no {missing}")
    hooks.installed = True
    patch.override(qformer, "forward", _qformer_entry)
    patch.override(qformer.encoder, "forward", _encoder_entry(hooks))
    for attention in cross:
        _install_cross_attention(patch, hooks, attention, ranks=attention is cross[0])
    return hooks


def _argument(function: Callable[..., Any], args: Any, kwargs: Any, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    if not args:
        return None
    bound = inspect.signature(function).bind_partial(*args, **kwargs)
    return bound.arguments.get(name)


def _qformer_entry(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    image = _argument(original, args, kwargs, "encoder_hidden_states")
    token = _INCOMING.set(None if image is None else token_sizes(image))
    try:
        return original(*args, **kwargs)
    finally:
        _INCOMING.reset(token)


def _encoder_entry(hooks: _QFormerHooks) -> Callable[..., Any]:
    def entry(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        image = _argument(original, args, kwargs, "encoder_hidden_states")
        if image is None or not _argument(original, args, kwargs, "query_length"):
            return original(*args, **kwargs)  # a text-only call: nothing to do
        size = _INCOMING.get()
        if size is None or size.shape[:2] != image.shape[:2]:
            size = token_sizes(image)
        if hooks.site is not None or (hooks.bias and size is not None):
            _check_unpadded(_argument(original, args, kwargs, "encoder_attention_mask"))
        token = _IMAGE.set(_QFormerImage(image, size))
        try:
            if hooks.site is None:
                return original(*args, **kwargs)
            with guided.guided_call(hooks.site, image, size, reduce=hooks.reduce, pool=hooks.pool):
                return original(*args, **kwargs)
        finally:
            _IMAGE.reset(token)

    return entry


def _check_unpadded(mask: torch.Tensor | None) -> None:
    """The models pass an all-ones image mask; a padded image cannot be reduced here."""
    if mask is None:
        return
    attends = mask if mask.dtype == torch.bool else mask == 0
    if not bool(attends.all()):
        raise ValueError(
            "encoder_attention_mask masks image tokens; the Q-Former options need an "
            "unpadded image (BLIP-2 and InstructBLIP always pass an all-ones mask)"
        )


#: ``Blip2QFormerAttention.forward`` / ``InstructBlipQFormerAttention.forward``.
_CROSS_ARGUMENTS = (
    "hidden_states",
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
)


def _install_cross_attention(
    patch: TurboPatch, hooks: _QFormerHooks, attention: nn.Module, *, ranks: bool
) -> None:
    """``ranks``: layer 0's cross-attention, the only one that ranks and reduces."""
    inner = attention.attention

    def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        incoming = _IMAGE.get()
        # the libraries' order, by name (more positionals than these raise, as the library would)
        kwargs.update(zip(_CROSS_ARGUMENTS[: len(args)], args, strict=True))
        if incoming is None or kwargs.get("encoder_hidden_states") is not incoming.image:
            return original(**kwargs)
        image, size = incoming.image, incoming.size
        call = guided.active()
        # a later cross-attention never ranks: if layer 0 was bypassed, the call warns
        if call is not None and call.image is image and (ranks or call.reduced is not None):
            if call.reduced is None:  # layer 0: rank with the queries it receives
                queries = kwargs["hidden_states"]
                width = inner.attention_head_size

                def rows() -> torch.Tensor:
                    return rearrange(inner.query(queries), "b t (h d) -> b h t d", d=width)

                def keys() -> torch.Tensor:
                    return rearrange(inner.key(image), "b n (h d) -> b h n d", d=width)

                bias = size_log_bias(size, queries.dtype) if hooks.bias else None
                guided.reduce_image(call, rows, keys, scale=inner.scaling, bias=bias)
            image, size = call.reduced, call.reduced_size
        if hooks.bias and size is not None:
            mask = size_log_bias(size, kwargs["hidden_states"].dtype)
        elif image is not incoming.image:
            mask = None  # the unpadded image's all-ones mask
        else:
            return original(**kwargs)
        kwargs.update(encoder_hidden_states=image, encoder_attention_mask=mask)
        return original(**kwargs)

    patch.override(attention, "forward", forward)
