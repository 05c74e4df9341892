"""Adapters for diffusers' diffusion transformers and their pipelines.

>>> patch = turbo_adapters.apply(pipe, ratio=0.5)     # doctest: +SKIP
>>> image = pipe("a photo of a cat").images[0]        # doctest: +SKIP
>>> patch.remove()                                    # doctest: +SKIP
>>> patch = turbo_adapters.apply(pipe, "dit-semantic", ratio=0.5)   # doctest: +SKIP

Every adapter returns a :class:`~..stable_diffusion.StableDiffusionPatch` (same
settings, ``last_stats``, ``configure``); ``ratio`` is tomesd's keyword.

**Redundancy alone or the semantic term** (``E = R - alpha * A``), per preset:

- ``"dit-redundancy"`` (``alpha=0``), the default when ``alpha`` is not given: tokens
  merge by redundancy alone (tomesd's and ToMe's ranking).
- ``"dit-semantic"`` (``alpha=`` :data:`DIT_SEMANTIC_ALPHA`): ``A`` is the text's
  attention over the image tokens, folded by the mean over the text tokens. On the
  MMDiT models (SD3 / SD3.5, FLUX double and single blocks) it is the text rows of the
  model's own joint softmax (text queries against the text and image keys, image
  columns, mean over heads; :func:`~..stable_diffusion.guide.joint_text_attention`).
  PixArt has no joint attention: its text reaches the image only through the
  cross-attention ``attn2`` (image queries, text keys); ``A`` comes from the same
  logits normalised over the image per text token (where each text token points in
  the image), as on the UNet (:func:`~..stable_diffusion.guide.text_to_image_attention`).
  The direction ``attn2`` applies (softmax over the text per image token) sums to 1
  for every image token and cannot rank them; the mean over image queries of the
  self-attention ``attn1`` would be an image-only saliency, not text guidance, and
  costs an ``N x N`` map, as much as the attention it is meant to shorten.

Why redundancy alone by default: the semantic value costs the image keys' projection
of all ``N`` tokens before the merge plus ``T x (T + N)`` logits per head in every
block, and eats a good part of the saving. FLOPs ratio (unpatched / patched) at
``ratio=0.5``, full-width random-weight configs, counted by ``count_flops``: FLUX-dev
at 1024 px (one double and one single block, ``N = 4096``, ``T = 512``) 1.91 with
redundancy alone, 1.64 with the semantic term (it adds about 8 % of the unpatched
cost); SD3-medium at 512 px (one block, a CFG pair planned once) 1.83 vs 1.65. No
fidelity gain of the semantic term on diffusion-transformer weights has been measured
yet (the tiny random models of the tests cannot show one). The UNet family
keeps its own default (``alpha=0.1``, :data:`~..stable_diffusion.DEFAULT_ALPHA`).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import Any

from torch import nn

from turbo_core import TurboConfig

from ...adapter import is_instance
from ..stable_diffusion.adapter import (
    DEFAULT_ALPHA,
    StableDiffusionPatch,
    check_no_r,
    resolve_settings,
)
from ..stable_diffusion.settings import SDSettings

__all__ = [
    "DIT_PRESETS",
    "DIT_SEMANTIC_ALPHA",
    "DiTAdapter",
    "FluxAdapter",
    "PixArtAdapter",
    "SD3Adapter",
    "SanaAdapter",
    "check_dit_settings",
    "dit_default_settings",
]

#: ``alpha`` of the ``"dit-semantic"`` preset: the UNet's (``A`` has mean 1 over the
#: image in both, so one weight means the same on either).
DIT_SEMANTIC_ALPHA = DEFAULT_ALPHA

#: Named settings of every DiT adapter: ``turbo_adapters.apply(pipe, "dit-semantic")``;
#: keywords given beside win (``ratio=``, ``alpha=``).
DIT_PRESETS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType(
    {
        "dit-redundancy": types.MappingProxyType({"alpha": 0.0}),
        "dit-semantic": types.MappingProxyType({"alpha": DIT_SEMANTIC_ALPHA}),
    }
)


def dit_default_settings(transformer: nn.Module) -> SDSettings:
    """Settings that speed a diffusion transformer up.

    One token grid for every block (``max_downsample=1``); the self- (or joint)
    attention and the image feed-forward merge half of the image tokens. PixArt's
    self-attention merges its keys and values only (every query keeps its own output);
    a joint attention merges its image queries too and restores ``out[0]``. The text's
    maps fold by their mean over the text tokens (``text_reduce="mean"``; used only
    with ``alpha > 0``).
    """
    pixart = type(transformer).__name__ in PixArtAdapter.classes
    return SDSettings(
        ratio_attn1=0.5, ratio_ff=0.5, attn1_kv=pixart, max_downsample=1, text_reduce="mean"
    )


class DiTAdapter:
    """Base of the diffusion-transformer adapters: a model class list, a pipeline's
    ``transformer``; subclasses name the classes."""

    name = "dit"
    stages = ("denoiser",)
    model_names: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    options = SDSettings.field_names() | {"ratio"}
    presets: Mapping[str, Mapping[str, Any]] = DIT_PRESETS
    #: diffusers class names of the transformers this adapter patches
    classes: tuple[str, ...] = ()

    def _is_model(self, obj: Any) -> bool:
        return is_instance(obj, "diffusers", *self.classes)

    def matches(self, model: Any) -> bool:
        if self._is_model(model):
            return True
        return is_instance(model, "diffusers", "DiffusionPipeline") and self._is_model(
            getattr(model, "transformer", None)
        )

    def patch(
        self,
        model: Any,
        config: TurboConfig,
        explicit: frozenset[str] = frozenset(),
        **options: Any,
    ) -> StableDiffusionPatch:
        """Patch ``model`` (a pipeline or its transformer); ``options`` are
        :class:`SDSettings` fields and ``ratio``.

        An unset ``alpha`` is 0 on every diffusion transformer (redundancy alone, the
        ``"dit-redundancy"`` preset; the module docstring says why); ``alpha > 0`` (or
        the ``"dit-semantic"`` preset) ranks by ``E = R - alpha * A`` with ``A`` the
        text's attention over the image tokens: the joint attention's text rows on
        SD3 / FLUX, the cross-attention's logits on PixArt. A model without text
        (DiT's class-conditional ``DiTTransformer2DModel``) refuses ``alpha > 0``.
        """
        check_no_r(config, explicit)
        transformer = model if self._is_model(model) else model.transformer
        if "alpha" not in explicit and config.alpha == TurboConfig().alpha:
            config = config.replace(alpha=0.0)
        if config.uses_semantics and not _has_text_attention(transformer):
            raise ValueError(
                f"alpha={config.alpha:g}: the semantic value is the text's attention over "
                f"the image tokens, and {type(transformer).__name__} has no text attention "
                "(class-conditional); use alpha=0 (the 'dit-redundancy' preset)"
            )
        settings = resolve_settings(dit_default_settings(transformer), options)
        check = functools.partial(check_dit_settings, transformer)
        check(settings)
        role = type(transformer).__name__ if transformer is model else "transformer"
        return StableDiffusionPatch(
            model, config, settings, [(role, transformer)], self.name, check=check
        )


def check_dit_settings(transformer: nn.Module, settings: SDSettings) -> None:
    """Refuse settings that cannot apply to ``transformer`` (at ``apply`` and ``configure``).

    - ``attn1_kv=True`` on a joint attention (its keys hold the text beside the image);
    - ``method="todo"`` with ``todo_mode="avg"`` on a rotary model (FLUX): an averaged
      image token has no single rotary position (ToDo's ``"nearest-exact"`` keeps real
      tokens, whose rotary rows follow them; :mod:`..stable_diffusion.joint_todo`).
    """
    name = type(transformer).__name__
    joint = not any(type(m).__name__ == "BasicTransformerBlock" for m in transformer.modules())
    if joint and settings.attn1_kv:
        raise ValueError(
            f"attn1_kv=True: {name}'s joint attention takes the text as its keys beside the "
            "image, so only attn1_kv=False applies"
        )
    if settings.method == "todo" and settings.todo_mode == "avg" and _has_rotary(transformer):
        raise ValueError(
            f"todo_mode='avg': {name} places its tokens by a rotary embedding and an averaged "
            "token has no single rotary position; use todo_mode='nearest-exact' (ToDo's "
            "default: it keeps real tokens, whose rotary rows follow them)"
        )


class PixArtAdapter(DiTAdapter):
    """PixArt-alpha and PixArt-Sigma (``PixArtTransformer2DModel``; DiT's
    ``DiTTransformer2DModel`` too): BasicTransformerBlocks on the model's token grid."""

    name = "pixart"
    model_names = ("PixArt-alpha/*", "*pixart*", "facebook/DiT-*")
    model_types = ("pixart", "pixart-alpha", "pixart-sigma", "pixarttransformer2dmodel")
    classes = ("PixArtTransformer2DModel", "DiTTransformer2DModel")


class SD3Adapter(DiTAdapter):
    """Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``, MMDiT joint blocks)."""

    name = "sd3"
    model_names = ("stabilityai/stable-diffusion-3*", "*sd3*", "*stable-diffusion-3*")
    model_types = ("sd3", "sd3.5", "sd3transformer2dmodel")
    classes = ("SD3Transformer2DModel",)


class FluxAdapter(DiTAdapter):
    """FLUX.1 dev / schnell (``FluxTransformer2DModel``: double- and single-stream blocks)."""

    name = "flux"
    model_names = ("black-forest-labs/FLUX.1-*", "*flux*")
    model_types = ("flux", "flux.1", "fluxtransformer2dmodel")
    classes = ("FluxTransformer2DModel",)


class SanaAdapter(DiTAdapter):
    """Sana (``SanaTransformer2DModel``): recognised in order to refuse it with its reason.

    Sana's self-attention is linear attention (``ReLU(Q) (ReLU(K)^T V)``: its cost is
    already linear in the tokens, so merging saves only in proportion, like a linear
    layer) and its feed-forward is ``GLUMBConv``, a depth-wise 3x3 convolution over the
    full token grid, which a merged (shorter, unordered) sequence cannot feed. Merge and
    restore around the attention alone would add its overhead for a small gain; nothing
    has been measured that says otherwise.
    """

    name = "sana"
    stages: tuple[str, ...] = ()  # recognised only to refuse
    presets: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({})
    model_names = ("Efficient-Large-Model/Sana*", "*sana*")
    model_types = ("sana", "sanatransformer2dmodel")
    classes = ("SanaTransformer2DModel",)

    def patch(
        self,
        model: Any,
        config: TurboConfig,
        explicit: frozenset[str] = frozenset(),
        **options: Any,
    ) -> StableDiffusionPatch:
        raise TypeError(
            f"Turbo does not patch {type(model).__name__} (Sana): its self-attention is "
            "linear attention (already linear in the tokens: merging saves little) and its "
            "feed-forward GLUMBConv convolves the full token grid (a merged sequence has no "
            "grid); merging only around the attention was not measured to gain"
        )


def _has_rotary(transformer: nn.Module) -> bool:
    """Whether the model's attention takes a rotary embedding (FLUX's blocks)."""
    rotary = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    return any(type(m).__name__ in rotary for m in transformer.modules())


def _has_text_attention(transformer: nn.Module) -> bool:
    """Whether some block attends to text: a joint (MMDiT) block or a cross-attention."""
    joint = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")
    return any(
        type(m).__name__ in joint or getattr(m, "is_cross_attention", False) is True
        for m in transformer.modules()
    )
