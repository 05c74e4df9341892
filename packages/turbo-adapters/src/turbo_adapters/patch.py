"""TurboPatch: what `apply` returns. Holds the sites, installs and removes everything.

Injection is per instance, never by class swap: a method is replaced by a wrapper
stored on the module itself. accelerate's hooks (``dispatch_model``, ``cpu_offload``,
``add_hook_to_module``) call ``module._old_forward``; when such a hook is present the
wrapper goes there instead, so a dispatched model still merges, and a hook added
after ``apply`` captures the wrapper as its ``_old_forward``. ``remove`` puts back
exactly what was there.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from turbo_core import ReductionState, TurboConfig

from .site import ROLE_NAMES, ReductionSite, refuse_copy

__all__ = ["TurboPatch", "UnpatchedCopyWarning", "handle_of"]

_PATCH_ATTR = "_turbo_patch"
_MISSING = object()


class UnpatchedCopyWarning(UserWarning):
    """A patched model was deep-copied, pickled or saved: the copy is the unpatched model."""


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
        # per module (by id): (name, what Turbo put there, what was there before)
        self._changes: dict[int, list[tuple[str, Any, Any]]] = {}
        # what a family's options keep for this patch (never in module globals)
        self._family_state: dict[str, Any] = {}
        self.claim(model)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise refuse_copy("a Turbo patch")

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
        # deepcopy, pickle and torch.save read this: they copy the unpatched module
        self._set(module, "__getstate__", functools.partial(self._unpatched_state, module))

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
        if module not in self._wrapped:
            self.claim(module)
        if hooked:
            self._set(module, "_old_forward", wrapper)
        else:
            self._set(module, name, wrapper)
            # a hook added later captures the wrapper as its _old_forward: a copy gets
            # the original there (remove does the same, below)
            self._changes[id(module)].append(("_old_forward", wrapper, original))

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
        if module not in self._wrapped:
            self.claim(module)
        previous = self._set(module, name, value)

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

    def _set(self, module: nn.Module, name: str, value: Any) -> Any:
        """``module.__dict__[name] = value``, noted for unpatched copies; returns the previous."""
        previous = module.__dict__.get(name, _MISSING)
        module.__dict__[name] = value
        self._changes.setdefault(id(module), []).append((name, value, previous))
        if name == "__getstate__":  # the other names are undone by their own callers

            def undo() -> None:
                if module.__dict__.get(name) is value:
                    _restore(module, name, previous)

            self._undo.append(undo)
        return previous

    def _unpatched_state(self, module: nn.Module) -> dict[str, Any]:
        """``module``'s pickle state as it was before patching (what copies and saves get)."""
        getstate = getattr(type(module), "__getstate__", None)
        state = getstate(module) if getstate is not None else None
        state = dict(state if isinstance(state, dict) else module.__dict__)
        for name, ours, previous in reversed(self._changes.get(id(module), [])):
            if state.get(name, _MISSING) is ours:
                if previous is _MISSING:
                    del state[name]
                else:
                    state[name] = previous
        state.pop(_PATCH_ATTR, None)
        if module is self.model:
            warnings.warn(
                f"{type(module).__name__} is patched by Turbo, its copy (deepcopy, pickle, "
                "torch.save) is not patched: apply Turbo to it again if it should merge",
                UnpatchedCopyWarning,
                stacklevel=_stacklevel_outside(_COPYING),
            )
        return state

    def family_state(self, key: str, make: Callable[[], Any]) -> Any:
        """What a family option keeps for this patch under ``key`` (``make()`` on first use).

        The state lives on the patch, so it goes with the patch: :meth:`remove` drops it,
        and two patched models never share it.
        """
        if key not in self._family_state:
            self._family_state[key] = make()
        return self._family_state[key]

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
        self._changes.clear()
        self._family_state.clear()

    @property
    def patched_modules(self) -> list[nn.Module]:
        return list(self._wrapped)


# Frames of these packages make a copy or a save; the warning points at the caller's line.
_COPYING = frozenset({"copy", "copyreg", "pickle", "torch", "turbo_adapters"})


def _stacklevel_outside(packages: frozenset[str]) -> int:
    """Stack level, for the function calling this one, of the first frame outside ``packages``."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None:
        name = frame.f_globals.get("__name__", "")
        if not isinstance(name, str) or name.split(".", 1)[0] not in packages:
            break
        frame, level = frame.f_back, level + 1
    return level


def _restore(module: nn.Module, name: str, previous: object) -> None:
    if previous is _MISSING:
        del module.__dict__[name]
    else:
        module.__dict__[name] = previous


def old_name(name: str, module: str, stacklevel: int = 3) -> type[TurboPatch]:
    """``TurboHandle``, the name releases before 0.3 used for :class:`TurboPatch` (warns);
    any other name is an AttributeError of ``module``."""
    if name != "TurboHandle":
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        "TurboHandle is TurboPatch's old name; use turbo_adapters.TurboPatch",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return TurboPatch


def __getattr__(name: str) -> Any:
    return old_name(name, __name__)


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
