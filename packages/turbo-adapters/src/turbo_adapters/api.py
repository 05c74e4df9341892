"""The user-facing entry points: apply, remove, patched."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from turbo_core import TurboConfig

from .patch import TurboPatch, handle_of
from .registry import adapter_for_model, get_adapter
from .site import ROLE_NAMES

__all__ = ["apply", "patched", "remove", "resolve_config"]


def resolve_config(preset_or_config: str | TurboConfig | None, **overrides: Any) -> TurboConfig:
    """A config from a preset name, a config, or None (defaults), plus overrides."""
    if preset_or_config is None:
        config = TurboConfig()
    elif isinstance(preset_or_config, str):
        config = TurboConfig.from_preset(preset_or_config)
    elif isinstance(preset_or_config, TurboConfig):
        config = preset_or_config
    else:
        raise TypeError(
            "preset_or_config must be a preset name, a TurboConfig or None, "
            f"got {type(preset_or_config).__name__}"
        )
    return config.replace(**overrides) if overrides else config


def apply(
    model: nn.Module,
    preset_or_config: str | TurboConfig | None = None,
    *,
    adapter: str | None = None,
    **overrides: Any,
) -> TurboPatch:
    """Patch ``model`` in place with Turbo and return its handle.

    Args:
        model: a supported model (timm, torchvision, transformers ...).
        preset_or_config: a preset name (``"reference"``, ``"tome"`` ...; an adapter's
            own presets too, such as Stable Diffusion's ``"sd-fast"``), a
            :class:`~turbo_core.TurboConfig`, or None for the defaults.
        adapter: adapter or model name to use instead of detecting it from ``model``.
        **overrides: config fields to change (``r=13``, ``alpha=0``), or roles
            (``scorer=...``, ``matcher=...``) that every later settings change keeps.

    Precedence: the preset < the model's defaults (``protected`` = its CLS,
    distillation and register tokens, when the config leaves it None) < an explicit
    config < keyword overrides.

    Raises:
        RuntimeError: if ``model`` is already patched.
    """
    if handle_of(model) is not None:
        raise RuntimeError(
            "model is already patched by Turbo; call turbo_adapters.remove(model) "
            "first, or change settings on the handle (handle.r = ...)"
        )
    roles = {k: overrides.pop(k) for k in list(overrides) if k in ROLE_NAMES}
    chosen = get_adapter(adapter) if adapter is not None else adapter_for_model(model)
    if not chosen.matches(model):
        raise TypeError(f"adapter {chosen.name!r} cannot patch a {type(model).__name__}")
    # an adapter's own preset is a set of keyword settings, below the user's keywords
    own_presets = chosen.presets
    if isinstance(preset_or_config, str) and preset_or_config.strip().lower() in own_presets:
        overrides = {**own_presets[preset_or_config.strip().lower()], **overrides}
        preset_or_config = None
    # settings of the adapter's own (Stable Diffusion's ratios, windows) go to the adapter
    extra = chosen.options
    options = {k: overrides.pop(k) for k in list(overrides) if k in extra}
    config = resolve_config(preset_or_config, **overrides)
    patch = chosen.patch(model, config, explicit=frozenset(overrides), **options)
    if roles:
        try:
            patch.configure(**roles)
        except BaseException:
            patch.remove()  # a refused role leaves the model as it was
            raise
    return patch


def remove(model: nn.Module) -> None:
    """Undo :func:`apply`: classes and forwards are the originals again."""
    handle = handle_of(model)
    if handle is None:
        raise ValueError("model is not patched by Turbo")
    handle.remove()


@contextlib.contextmanager
def patched(
    model: nn.Module, preset_or_config: str | TurboConfig | None = None, **overrides: Any
) -> Iterator[TurboPatch]:
    """``with patched(model, r=13) as handle: ...`` applies on entry and removes on exit."""
    handle = apply(model, preset_or_config, **overrides)
    try:
        yield handle
    finally:
        handle.remove()
