"""TurboPatch: what `apply` returns. Holds the sites, installs and removes everything.

Injection is per instance, never by class swap: a method is replaced by a wrapper
stored on the module itself. accelerate's hooks (``dispatch_model``, ``cpu_offload``,
``add_hook_to_module``) call ``module._old_forward``; when such a hook is present the
wrapper goes there instead, so a dispatched model still merges, and a hook added
after ``apply`` captures the wrapper as its ``_old_forward``. ``remove`` puts back
exactly what was there.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from turbo_core import ReductionState, TurboConfig

from .site import ROLE_NAMES, ReductionSite

__all__ = ["TurboHandle", "TurboPatch", "handle_of"]

_PATCH_ATTR = "_turbo_patch"
_MISSING = object()


def handle_of(model: nn.Module) -> TurboPatch | None:
    """The patch on ``model`` (a model, or any module Turbo wrapped), or None."""
    patch = model.__dict__.get(_PATCH_ATTR)
    return patch if isinstance(patch, TurboPatch) else None


class TurboPatch:
    """A patched model's Turbo controls and undo list.

    Change settings at any time without re-patching: ``patch.r = 8``,
    ``patch.alpha = 2.0`` or ``patch.configure(mode="redundancy")`` (every site, or
    ``site="vision"``). After a call, ``patch.last_state`` tells what happened in this
    thread (token counts per block, sizes, sources); the sizes of a call also travel
    with its output (:func:`turbo_adapters.token_sizes`).
    """

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        if handle_of(model) is not None:
            raise RuntimeError(
                "model is already patched by Turbo; call turbo_adapters.remove(model) "
                "first, or change settings on the patch (patch.r = ...)"
            )
        self.model = model
        self.adapter_name = adapter_name
        self.sites: dict[str, ReductionSite] = {}
        self._undo: list[Callable[[], None]] = []
        self._wrapped: list[nn.Module] = []
        self.claim(model)

    # -------------------------------------------------------------------- sites
    def add_site(self, site: ReductionSite) -> ReductionSite:
        if site.name in self.sites:
            raise ValueError(f"a site named {site.name!r} exists already")
        self.sites[site.name] = site
        site.model_ref = weakref.ref(self.model)
        return site

    @property
    def site(self) -> ReductionSite:
        """The first (for most models, the only) site."""
        if not self.sites:
            raise RuntimeError("this patch has no reduction site")
        return next(iter(self.sites.values()))

    def _targets(self, site: str | None) -> list[ReductionSite]:
        if site is None:
            return list(self.sites.values())
        if site not in self.sites:
            raise KeyError(f"no site {site!r}; this patch has {sorted(self.sites)}")
        return [self.sites[site]]

    # ----------------------------------------------------------------- settings
    @property
    def config(self) -> TurboConfig:
        return self.site.config

    def configure(self, *, site: str | None = None, **changes: Any) -> TurboPatch:
        """Replace config fields or roles on every site (or one); next call uses them."""
        targets = self._targets(site)
        fields = {k: v for k, v in changes.items() if k not in ROLE_NAMES}
        for target in targets:  # validate everything before changing anything
            target.check(target.config.replace(**fields))
        for target in targets:
            target.configure(**changes)
        return self

    @property
    def r(self) -> Any:
        return self.config.r

    @r.setter
    def r(self, value: Any) -> None:
        self.configure(r=value)

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.configure(alpha=value)

    @property
    def num_blocks(self) -> int:
        return self.site.num_blocks

    @property
    def last_state(self) -> ReductionState | None:
        """The first site's state after the last call in this thread."""
        return self.site.last_state

    def __repr__(self) -> str:
        sites = ", ".join(repr(s) for s in self.sites.values())
        return f"TurboPatch(adapter={self.adapter_name!r}, sites=[{sites}])"

    # ---------------------------------------------------------------- injection
    def claim(self, module: nn.Module) -> None:
        """Mark ``module`` as patched (another ``apply`` on it is refused)."""
        if module is not self.model and handle_of(module) is not None:
            raise RuntimeError(f"{type(module).__name__} is already patched by Turbo")
        module.__dict__[_PATCH_ATTR] = self
        self._wrapped.append(module)

    def override(
        self, module: nn.Module, name: str, impl: Callable[..., Any]
    ) -> Callable[..., Any]:
        """Replace ``module.<name>`` on this instance by ``impl(original, *args, **kwargs)``.

        ``original`` is what the method was before (already bound). For ``forward``
        under an accelerate hook, the hook's ``_old_forward`` is wrapped instead, so the
        hook (device placement, offloading) keeps running around Turbo.
        """
        hooked = (
            name == "forward"
            and "_hf_hook" in module.__dict__
            and "_old_forward" in module.__dict__
        )
        original = module.__dict__["_old_forward"] if hooked else getattr(module, name)
        previous = module.__dict__.get(name, _MISSING)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return impl(original, *args, **kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        if hooked:
            module.__dict__["_old_forward"] = wrapper
        else:
            module.__dict__[name] = wrapper
        if module not in self._wrapped:
            self.claim(module)

        def undo() -> None:
            if module.__dict__.get("_old_forward") is wrapper:
                # hooked before apply (we wrapped the hook's target) or after (the hook
                # captured our wrapper): either way the hook must call the original again
                module.__dict__["_old_forward"] = original
                if module.__dict__.get(name) is wrapper:
                    _restore(module, name, previous)
                return
            if module.__dict__.get(name) is wrapper:
                _restore(module, name, previous)
                return
            warnings.warn(
                f"{type(module).__name__}.{name} was replaced after Turbo patched it; "
                "Turbo's wrapper could not be removed from it",
                RuntimeWarning,
                stacklevel=3,
            )

        self._undo.append(undo)
        return wrapper

    def set_attribute(self, module: nn.Module, name: str, value: Any) -> None:
        """Set ``module.<name>`` on this instance only; :meth:`remove` puts back what was there.

        For state that must not live on an object other models share (a transformers
        config): the module gets its own value, nothing else sees it.
        """
        previous = module.__dict__.get(name, _MISSING)
        module.__dict__[name] = value
        if module not in self._wrapped:
            self.claim(module)

        def undo() -> None:
            if module.__dict__.get(name, _MISSING) is value:
                _restore(module, name, previous)
                return
            warnings.warn(
                f"{type(module).__name__}.{name} was replaced after Turbo set it; "
                "Turbo left the new value in place",
                RuntimeWarning,
                stacklevel=3,
            )

        self._undo.append(undo)

    def add_cleanup(self, undo: Callable[[], None]) -> None:
        """Register an action that :meth:`remove` runs (in reverse order of adding)."""
        self._undo.append(undo)

    def remove(self) -> None:
        """Undo everything; the model is then exactly as before patching."""
        while self._undo:
            self._undo.pop()()
        for site in self.sites.values():
            site.release()
        for module in self._wrapped:
            module.__dict__.pop(_PATCH_ATTR, None)
        self._wrapped.clear()

    @property
    def patched_modules(self) -> list[nn.Module]:
        return list(self._wrapped)


def _restore(module: nn.Module, name: str, previous: object) -> None:
    if previous is _MISSING:
        del module.__dict__[name]
    else:
        module.__dict__[name] = previous


#: The name earlier releases used; a patch is the handle users hold.
TurboHandle = TurboPatch


def no_grad_checkpointing(module: nn.Module) -> None:
    """Gradient checkpointing re-runs blocks in backward, outside the call's state."""
    flag = getattr(module, "gradient_checkpointing", False) or getattr(
        module, "grad_checkpointing", False
    )
    if flag and module.training and torch.is_grad_enabled():
        raise RuntimeError(
            "Turbo cannot merge tokens under gradient checkpointing (the backward recompute "
            "runs outside the forward pass); disable it or call turbo_adapters.remove(model)"
        )
