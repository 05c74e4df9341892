"""Adapters for diffusers' diffusion transformers and their pipelines.

>>> patch = turbo_adapters.apply(pipe, ratio=0.5)     # doctest: +SKIP
>>> image = pipe("a photo of a cat").images[0]        # doctest: +SKIP
>>> patch.remove()                                    # doctest: +SKIP

Every adapter returns a :class:`~..stable_diffusion.StableDiffusionPatch` (same
settings, ``last_stats``, ``configure``); ``ratio`` is tomesd's keyword.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from torch import nn

from turbo_core import TurboConfig

from ...adapter import is_instance
from ..stable_diffusion.adapter import StableDiffusionPatch, check_no_r, resolve_settings
from ..stable_diffusion.settings import SDSettings

__all__ = [
    "DiTAdapter",
    "FluxAdapter",
    "PixArtAdapter",
    "SD3Adapter",
    "SanaAdapter",
    "dit_default_settings",
]


def dit_default_settings(transformer: nn.Module) -> SDSettings:
    """Settings that speed a diffusion transformer up.

    One token grid for every block (``max_downsample=1``); the self- (or joint)
    attention and the image feed-forward merge half of the image tokens. PixArt's
    self-attention merges its keys and values only (every query keeps its own output);
    a joint attention merges its image queries too and restores ``out[0]``.
    """
    pixart = type(transformer).__name__ in PixArtAdapter.classes
    return SDSettings(ratio_attn1=0.5, ratio_ff=0.5, attn1_kv=pixart, max_downsample=1)


class DiTAdapter:
    """Base of the diffusion-transformer adapters: a model class list, a pipeline's
    ``transformer``; subclasses name the classes."""

    name = "dit"
    stages = ("denoiser",)
    model_names: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    options = SDSettings.field_names() | {"ratio"}
    presets: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({})
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
        :class:`SDSettings` fields and ``ratio``. The semantic term needs a text
        cross-attention (PixArt); on the joint-attention models ``alpha`` defaults to 0
        (redundancy alone)."""
        check_no_r(config, explicit)
        transformer = model if self._is_model(model) else model.transformer
        if "alpha" not in explicit and config.alpha == TurboConfig().alpha:
            config = config.replace(alpha=0.0)
        settings = resolve_settings(dit_default_settings(transformer), options)
        joint = not any(type(m).__name__ == "BasicTransformerBlock" for m in transformer.modules())
        if joint and settings.attn1_kv:
            raise ValueError(
                f"attn1_kv=True: {type(transformer).__name__}'s joint attention takes the "
                "text as its keys beside the image, so only attn1_kv=False applies"
            )
        if joint and settings.method == "todo":
            raise ValueError(
                f"method='todo': ToDo downsamples the keys and values of a self-attention; "
                f"{type(transformer).__name__}'s joint attention computes them inside its "
                "processor (use method='turbo' or 'toma')"
            )
        role = type(transformer).__name__ if transformer is model else "transformer"
        return StableDiffusionPatch(model, config, settings, [(role, transformer)], self.name)


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
