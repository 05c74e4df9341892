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
:mod:`turbo_adapters.families.stable_diffusion.hooks` for the mechanism and
:class:`~turbo_adapters.families.stable_diffusion.settings.SDSettings` for the settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from turbo_core import TurboConfig

from ...adapter import is_instance
from ...patch import TurboPatch
from ...site import ReductionSite
from .hooks import CallStats, DenoiserHooks, RatioClippedWarning
from .settings import SDSettings, with_ratio

__all__ = [
    "DEFAULT_ALPHA",
    "PRESETS",
    "RatioClippedWarning",
    "SDSettings",
    "StableDiffusionAdapter",
    "StableDiffusionPatch",
    "default_settings",
]

_DENOISERS = ("UNet2DConditionModel", "ControlNetModel")
#: Semantic weight used unless the user sets ``alpha`` (A has mean 1 over the image).
DEFAULT_ALPHA = 0.1

#: Named settings: ``turbo_adapters.apply(pipe, "sd-fast")``; keywords given beside win.
#: Figures: SD 1.5 UNet at 512 px, random weights, batch 2 (benchmarks/stable_diffusion.py
#: ``--mode target``), relative output difference to the unpatched UNet over two seeds.
PRESETS: dict[str, dict[str, Any]] = {
    # Self-attention over 16x fewer keys/values (one per 4x4 window, log(size) bias) and
    # cross-attention on a quarter of the tokens at the three finest resolutions; the
    # feed-forward merges where that costs least fidelity: 15/16 of the tokens at 1/4
    # resolution, 1/4 of them at 1/2, none at full resolution (where merging half of
    # them alone costs 0.066). FLOPs ratio 1.35 with a difference of 0.048, where
    # tomesd's default (0.5) gives 1.11 with 0.052.
    "sd-fast": {
        "ratio_attn1": 0.9375,
        "attn1_kv": True,
        "sx": 4,
        "sy": 4,
        "ratio_attn2": 0.75,
        "ratio_ff": {2: 0.25, 4: 0.9375},
        "max_downsample": 4,
    },
}


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
    """Settings that speed this UNet up, by where its attention lives.

    SD 1.x/2.x have attention at full latent resolution, where self-attention is most
    of the cost: merge its keys and values there (``attn1_kv``, ratio 0.75; as close to
    the unpatched UNet as can be measured, see the benchmark). SDXL has no attention at
    full resolution (tomesd's default does nothing on it) and most of its work is in
    the ten-layer blocks at a quarter of the resolution, mostly feed-forward: merge
    down to ``max_downsample=4``, keys/values of self-attention at 0.75, cross-
    attention and feed-forward at 0.5.
    """
    kinds = list(getattr(getattr(unet, "config", None), "down_block_types", []) or [])
    first = next((i for i, kind in enumerate(kinds) if "CrossAttn" in kind), 0)
    if first == 0:
        return SDSettings(ratio_attn1=0.75, attn1_kv=True, max_downsample=1)
    return SDSettings(
        ratio_attn1=0.75,
        attn1_kv=True,
        ratio_attn2=0.5,
        ratio_ff=0.5,
        max_downsample=min(2 ** (first + 1), 8),
    )


class StableDiffusionPatch(TurboPatch):
    """What :func:`turbo_adapters.apply` returns for a diffusers pipeline, UNet or ControlNet.

    One reduction site per denoiser (``"unet"``, ``"controlnet"``; a bare model's site
    is named after its class); it owns the reducer (merger and restorer roles, the
    fusion settings) and one state per call. The window settings live in
    :attr:`settings`.

    Attributes:
        settings: the :class:`SDSettings` in force (change with :meth:`configure`).
        text_mask: ``(B, T)`` keep mask of the conditional prompts' text tokens, set by
            the patched pipeline's ``encode_prompt`` (or by the user for a bare UNet).
        pipeline_cfg: whether the last pipeline call used classifier-free guidance.
        cond_rows: rows of the last pipeline call's conditional prompt embeddings.

    ``check`` (a family's own limits, e.g. :func:`~..dit.adapter.check_dit_settings`)
    sees the settings of every :meth:`configure` and refuses those the model cannot take.
    """

    def __init__(
        self,
        target: Any,
        config: TurboConfig,
        settings: SDSettings,
        denoisers: list[tuple[str, nn.Module]] | None = None,
        family: str = "stable-diffusion",
        check: Callable[[SDSettings], None] | None = None,
    ) -> None:
        super().__init__(target, family)
        self.settings = settings
        self._check = check
        self.text_mask: torch.Tensor | None = None
        self.pipeline_cfg: bool | None = None
        self.cond_rows: int | None = None
        self._hooks: list[DenoiserHooks] = []
        try:
            for role, module in denoisers if denoisers is not None else _denoisers(target):
                if module is not target:
                    self.claim(module)
                hooks = DenoiserHooks(module, self)
                # the site's guide is unused: the semantic value is the text's
                # cross-attention map, computed by the hooks from attn2
                hooks.site = self.add_site(
                    ReductionSite(role, config, max(len(hooks.blocks), 1), guide="mean")
                )
                hooks.install()
                self.add_cleanup(hooks.remove)
                self._hooks.append(hooks)
            if target is not self._hooks[0].root:
                self._wrap_encode_prompt(target)
        except BaseException:
            self.remove()
            raise

    # ---------------------------------------------------------------- settings
    def configure(self, *, site: str | None = None, **changes: Any) -> StableDiffusionPatch:
        """Change SD settings (``ratio_attn1=``, ``max_downsample=`` ...) and TurboConfig
        fields or roles (``alpha=``, ``mode=``, ``merger=`` ...); the next call uses them."""
        if "ratio" in changes:  # tomesd's keyword: every merging component at this ratio
            changes.update(with_ratio(self.settings, changes.pop("ratio"), changes))
        if "r" in changes:
            raise ValueError(
                "Stable Diffusion merges by ratio, not r: set ratio_attn1, ratio_attn2, "
                "ratio_ff (each in [0, 1))"
            )
        unused = sorted(set(changes) & {"scorer", "matcher"})
        if unused:
            raise ValueError(
                f"Stable Diffusion ranks tokens by 2-D window matching "
                f"(turbo_core.score_windows): the {' and '.join(unused)} role(s) do not apply; "
                "the merger and restorer roles do"
            )
        sd = {k: changes.pop(k) for k in list(changes) if k in SDSettings.field_names()}
        settings = self.settings.replace(**sd) if sd else self.settings
        if self._check is not None:
            self._check(settings)  # the model's own limits (a DiT adapter's checks)
        if changes:
            super().configure(site=site, **changes)
        self.settings = settings
        return self

    def cfg_halves(self, batch: int | None = None) -> bool:
        """Whether a denoiser call's batch (of ``batch`` rows) holds ``[unconditional;
        conditional]`` halves. In a pipeline call with classifier-free guidance only a
        batch of twice the conditional prompts' rows does: a ControlNet in guess mode
        sees the conditional rows alone."""
        if self.settings.cfg_halves is not None:
            return self.settings.cfg_halves
        if not self.pipeline_cfg:
            return False
        return batch is None or self.cond_rows is None or batch == 2 * self.cond_rows

    def new_generation(self) -> None:
        """Count denoising steps from 0 again (done at every patched pipeline call)."""
        for hooks in self._hooks:
            hooks.new_generation()

    @property
    def denoisers(self) -> list[nn.Module]:
        return [hooks.root for hooks in self._hooks]

    @property
    def last_stats(self) -> dict[str, CallStats]:
        """``{site: CallStats}`` of the last finished call of each denoiser in this thread."""
        out = {}
        for name, site in self.sites.items():
            state = site.last_state
            if state is not None and "stats" in state.extras:
                out[name] = state.extras["stats"]
        return out

    # ---------------------------------------------------------------- pipeline
    def _wrap_encode_prompt(self, pipe: Any) -> None:
        if getattr(pipe, "encode_prompt", None) is None:
            return
        signature = inspect.signature(pipe.encode_prompt)

        def encode_prompt(original: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            self.new_generation()
            self.pipeline_cfg = bool(bound.get("do_classifier_free_guidance", False))
            self.text_mask = _prompt_mask(pipe, bound)
            output = original(*args, **kwargs)
            first = output[0] if isinstance(output, (tuple, list)) and output else None
            self.cond_rows = first.shape[0] if isinstance(first, torch.Tensor) else None
            return output

        self.override(pipe, "encode_prompt", encode_prompt)

    def __repr__(self) -> str:
        return f"StableDiffusionPatch({self.settings}, sites={list(self.sites)}, {self.config})"


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


class StableDiffusionAdapter:
    """diffusers Stable Diffusion pipelines, UNets and ControlNets (merge-and-restore)."""

    name = "stable-diffusion"
    stages = ("denoiser",)
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
    options = SDSettings.field_names() | {"ratio"}
    presets = PRESETS

    def matches(self, model: Any) -> bool:
        return _is_pipeline(model) or _is_denoiser(model)

    def patch(
        self,
        model: Any,
        config: TurboConfig,
        explicit: frozenset[str] = frozenset(),
        **options: Any,
    ) -> StableDiffusionPatch:
        """Patch ``model``; ``options`` are :class:`SDSettings` fields.

        Unset settings take :func:`default_settings` of the UNet; an unset ``alpha``
        is :data:`DEFAULT_ALPHA`. ``r`` does not apply (merging is by ratio); ``ratio``
        is tomesd's keyword (see :func:`~.settings.with_ratio`).
        """
        check_no_r(config, explicit)
        if "alpha" not in explicit and config.alpha == TurboConfig().alpha:
            config = config.replace(alpha=DEFAULT_ALPHA)
        unet = model if _is_denoiser(model) else model.unet
        settings = resolve_settings(default_settings(unet), options)  # validate first
        return StableDiffusionPatch(model, config, settings)


def check_no_r(config: TurboConfig, explicit: frozenset[str]) -> None:
    """Diffusion families merge by ratio: a ToMe ``r`` is refused, naming the keywords."""
    if "r" in explicit or config.r != TurboConfig().r:
        raise ValueError(
            "a diffusion model merges by ratio, not r: pass ratio (tomesd's keyword, in [0, 1)) "
            "or ratio_attn1, ratio_attn2, ratio_ff"
        )


def resolve_settings(base: SDSettings, options: dict[str, Any]) -> SDSettings:
    """``base`` with the user's keywords; ``ratio`` sets every merging component."""
    options = dict(options)
    if "ratio" in options:
        options.update(with_ratio(base, options.pop("ratio"), options))
    return base.replace(**options) if options else base
