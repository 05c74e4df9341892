"""Stable Diffusion (1.x, 2.x, SDXL, ControlNet): Turbo merge-and-restore in every UNet block.

>>> patch = turbo_adapters.apply(pipe, ratio_attn1=0.6, max_downsample=2)   # doctest: +SKIP
>>> image = pipe("a photo of a cat").images[0]                             # doctest: +SKIP
>>> patch.remove()                                                         # doctest: +SKIP

Before each of ``attn1``, ``attn2`` and ``ff`` of every ``BasicTransformerBlock`` the
normed input merges (2-D window matching on the exact latent grid, ranked by
``E = R - alpha * A`` with ``A`` the text's cross-attention over the image tokens);
after it the output is restored to full length and original order (each merged
token receives its group's output), before the gate and the residual. With
``alpha=0`` and ``use_rand=False`` this computes what tomesd computes. See
:mod:`turbo_adapters.sd_hooks` for the mechanism and
:class:`~turbo_adapters.sd_settings.SDSettings` for the settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from turbo_core import TokenReducer, TurboConfig

from .common import is_instance
from .handle import TurboHandle
from .registry import register_adapter
from .sd_hooks import CallStats, DenoiserHooks, RatioClippedWarning
from .sd_settings import SDSettings

__all__ = [
    "RatioClippedWarning",
    "SDSettings",
    "StableDiffusionAdapter",
    "StableDiffusionPatch",
    "apply_stable_diffusion",
    "default_settings",
]

_HANDLE_ATTR = "_turbo_handle"
_DENOISERS = ("UNet2DConditionModel", "ControlNetModel")
#: Semantic weight used unless the user sets ``alpha`` (A has mean 1 over the image).
DEFAULT_ALPHA = 0.1


def _is_denoiser(obj: Any) -> bool:
    return is_instance(obj, "diffusers", *_DENOISERS)


def _is_pipeline(obj: Any) -> bool:
    return is_instance(obj, "diffusers", "DiffusionPipeline") and _is_denoiser(
        getattr(obj, "unet", None)
    )


def _denoisers(target: Any) -> list[tuple[str, nn.Module]]:
    """``(role, module)`` of every UNet / ControlNet to patch in ``target``."""
    if _is_denoiser(target):
        return [(type(target).__name__, target)]
    found = [("unet", target.unet)]
    controlnet = getattr(target, "controlnet", None)
    if isinstance(controlnet, nn.Module):
        nets = (
            [controlnet]
            if _is_denoiser(controlnet)
            else [m for m in controlnet.modules() if _is_denoiser(m)]
        )
        found += [(f"controlnet{i if len(nets) > 1 else ''}", net) for i, net in enumerate(nets)]
    return found


def default_settings(unet: nn.Module) -> SDSettings:
    """Settings that speed this UNet up: merge at its highest-resolution attention level.

    SD 1.x/2.x have attention at full latent resolution (``max_downsample=1``); SDXL has
    none there (tomesd's default does nothing on it), so it merges at the level below.
    """
    kinds = list(getattr(getattr(unet, "config", None), "down_block_types", []) or [])
    first = next((i for i, kind in enumerate(kinds) if "CrossAttn" in kind), 0)
    return SDSettings(max_downsample=2**first if first < 4 else 8)


class StableDiffusionPatch(TurboHandle):
    """What :func:`apply` returns for a diffusers pipeline, UNet or ControlNet.

    Attributes:
        settings: the :class:`SDSettings` in force (change with :meth:`configure`).
        last_stats: ``{denoiser role: CallStats}`` of the last call of each denoiser.
        text_mask: ``(B, T)`` keep mask of the conditional prompts' text tokens, set by
            the patched pipeline's ``encode_prompt`` (or by the user for a bare UNet).
    """

    def __init__(self, target: Any, config: TurboConfig, settings: SDSettings) -> None:
        denoisers = _denoisers(target)
        blocks = sum(len(DenoiserHooks(m, self).blocks) for _, m in denoisers)
        super().__init__(target, config, "stable-diffusion", max(blocks, 1), guide="text")
        self.settings = settings
        self.text_mask: torch.Tensor | None = None
        self.pipeline_cfg: bool | None = None
        self.last_stats: dict[str, CallStats] = {}
        self._roles: dict[int, str] = {}
        self._hooks: list[DenoiserHooks] = []
        self._cleanups: list[Callable[[], None]] = []
        for role, module in denoisers:
            if getattr(module, _HANDLE_ATTR, None) is not None:
                raise RuntimeError(f"{role} is already patched by Turbo; remove that patch first")
            hooks = DenoiserHooks(module, self)
            hooks.install()
            self._hooks.append(hooks)
            self._roles[id(module)] = role
        for _, module in denoisers:
            object.__setattr__(module, _HANDLE_ATTR, self)
            self._cleanups.append(functools_partial_delattr(module))
        if target is not denoisers[0][1]:
            object.__setattr__(target, _HANDLE_ATTR, self)
            self._cleanups.append(functools_partial_delattr(target))
            self._wrap_encode_prompt(target)

    # ---------------------------------------------------------------- settings
    def configure(self, **changes: Any) -> StableDiffusionPatch:
        """Change settings (SD settings and TurboConfig fields); next call uses them."""
        sd = {k: v for k, v in changes.items() if k in SDSettings.field_names()}
        core = {k: v for k, v in changes.items() if k not in sd}
        if "r" in core:
            raise ValueError(
                "Stable Diffusion merges by ratio, not r: set ratio_attn1, ratio_attn2, "
                "ratio_ff (each in [0, 1))"
            )
        settings = self.settings.replace(**sd) if sd else self.settings
        reducer = TokenReducer(self.config.replace(**core)) if core else self.reducer
        self.settings, self.reducer = settings, reducer
        return self

    def cfg_halves(self) -> bool:
        """Whether the batch holds ``[unconditional; conditional]`` halves."""
        if self.settings.cfg_halves is not None:
            return self.settings.cfg_halves
        return bool(self.pipeline_cfg)

    def new_generation(self) -> None:
        """Count denoising steps from 0 again (done at every patched pipeline call)."""
        for hooks in self._hooks:
            hooks.new_generation()

    @property
    def denoisers(self) -> list[nn.Module]:
        return [hooks.root for hooks in self._hooks]

    def _record(self, root: nn.Module, stats: CallStats) -> None:
        self.last_stats[self._roles.get(id(root), "unet")] = stats

    # ---------------------------------------------------------------- pipeline
    def _wrap_encode_prompt(self, pipe: Any) -> None:
        original = getattr(pipe, "encode_prompt", None)
        if original is None:
            return
        signature = inspect.signature(original)
        patch = self

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            patch.new_generation()
            patch.pipeline_cfg = bool(bound.get("do_classifier_free_guidance", False))
            patch.text_mask = _prompt_mask(pipe, bound)
            return original(*args, **kwargs)

        pipe.__dict__["encode_prompt"] = encode_prompt
        self._cleanups.append(lambda: pipe.__dict__.pop("encode_prompt", None))

    # ------------------------------------------------------------------ remove
    def remove(self) -> None:
        """Remove every hook and injected method; the objects are exactly as before."""
        for hooks in self._hooks:
            hooks.remove()
        self._hooks.clear()
        for cleanup in reversed(self._cleanups):
            cleanup()
        self._cleanups.clear()

    def __repr__(self) -> str:
        return f"StableDiffusionPatch({self.settings}, {self.config})"


def functools_partial_delattr(obj: Any) -> Callable[[], None]:
    def undo() -> None:
        if obj.__dict__.get(_HANDLE_ATTR) is not None:
            del obj.__dict__[_HANDLE_ATTR]

    return undo


def _prompt_mask(pipe: Any, bound: dict[str, Any]) -> torch.Tensor | None:
    """Keep mask of the conditional prompts' tokens, one row per image, or None."""
    prompt = bound.get("prompt")
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None or bound.get("prompt_embeds") is not None:
        return None
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
        return None
    tokens = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    per_prompt = int(bound.get("num_images_per_prompt") or 1)
    return tokens.attention_mask.repeat_interleave(per_prompt, dim=0)


def apply_stable_diffusion(
    target: Any, config: TurboConfig | None = None, **changes: Any
) -> StableDiffusionPatch:
    """Patch a diffusers pipeline, UNet or ControlNet in place; see :class:`SDSettings`.

    Keyword arguments are SD settings (``ratio_attn1=0.5``, ``max_downsample=2`` ...)
    or TurboConfig fields (``alpha``, ``mode``, ``fusion``). Unset SD settings take
    :func:`default_settings` of the UNet; unset ``alpha`` is :data:`DEFAULT_ALPHA`.
    """
    if not (_is_pipeline(target) or _is_denoiser(target)):
        raise TypeError(
            "target must be a diffusers pipeline with a UNet, a UNet2DConditionModel or a "
            f"ControlNetModel, got {type(target).__name__}"
        )
    if getattr(target, _HANDLE_ATTR, None) is not None:
        raise RuntimeError("target is already patched by Turbo; remove that patch first")
    config = config or TurboConfig()
    if "alpha" not in changes and config == TurboConfig():
        config = config.replace(alpha=DEFAULT_ALPHA)
    unet = target if _is_denoiser(target) else target.unet
    patch = StableDiffusionPatch(target, config, default_settings(unet))
    if changes:
        try:
            patch.configure(**changes)
        except Exception:
            patch.remove()
            raise
    return patch


@register_adapter
class StableDiffusionAdapter:
    """diffusers Stable Diffusion pipelines, UNets and ControlNets (merge-and-restore)."""

    name = "stable-diffusion"
    model_names = (
        "runwayml/stable-diffusion-v1-5",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "compvis/stable-diffusion-v1-*",
        "stabilityai/stable-diffusion-2*",
        "stabilityai/stable-diffusion-xl-*",
        "lllyasviel/*controlnet*",
        "lllyasviel/sd-controlnet-*",
        "diffusers/controlnet-*",
        "*stable-diffusion*",
    )
    model_types = (
        "stable-diffusion",
        "stable-diffusion-xl",
        "sdxl",
        "unet2dconditionmodel",
        "controlnetmodel",
        "stablediffusionpipeline",
        "stablediffusionimg2imgpipeline",
        "stablediffusionxlpipeline",
        "stablediffusioncontrolnetpipeline",
    )
    options = SDSettings.field_names()

    def matches(self, model: Any) -> bool:
        return _is_pipeline(model) or _is_denoiser(model)

    def patch(
        self,
        model: Any,
        config: TurboConfig,
        explicit: frozenset[str] = frozenset(),
        **options: Any,
    ) -> StableDiffusionPatch:
        if "r" in explicit:
            raise ValueError(
                "Stable Diffusion merges by ratio, not r: pass ratio_attn1, ratio_attn2, ratio_ff"
            )
        if "alpha" not in explicit and config.alpha == TurboConfig().alpha:
            config = config.replace(alpha=DEFAULT_ALPHA)
        unet = model if _is_denoiser(model) else model.unet
        patch = StableDiffusionPatch(model, config, default_settings(unet))
        if options:
            try:
                patch.configure(**options)
            except Exception:
                patch.remove()
                raise
        return patch
