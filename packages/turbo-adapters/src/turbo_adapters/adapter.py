"""The base every built-in adapter derives from: matching by class, patch creation, undo on error."""

from __future__ import annotations

import abc
import importlib
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from torch import nn

from turbo_core import TurboConfig

from .patch import TurboPatch

__all__ = ["FamilyAdapter", "is_instance", "model_defaults"]


def is_instance(model: nn.Module, module: str, *class_names: str) -> bool:
    """``isinstance(model, module.ClassName)`` without importing a library needlessly.

    A model can only be an instance of a library's class if that library is already
    imported, so adapters of libraries that are not loaded answer False at once.
    """
    if module.split(".")[0] not in sys.modules:
        return False
    try:
        found = importlib.import_module(module)
    except ImportError:
        return False
    classes = tuple(getattr(found, name) for name in class_names if hasattr(found, name))
    return bool(classes) and isinstance(model, classes)


def model_defaults(config: TurboConfig, prefix_tokens: int) -> TurboConfig:
    """Fill what the user left to the model: ``protected`` = the model's prefix tokens.

    Precedence: preset < these defaults < an explicit config < keyword overrides; an
    explicit value is never replaced.
    """
    if config.protected is None:
        return config.replace(protected=prefix_tokens)
    if config.protected < prefix_tokens:
        # a prefix token that merges would be pooled or read as CLS by the model's head
        raise ValueError(
            f"protected must be >= {prefix_tokens} for this model (its CLS/distillation/"
            f"register tokens), got {config.protected}"
        )
    return config


class FamilyAdapter(abc.ABC):
    """A model family: ``matches`` by class, ``install`` sites and wrappers on a patch.

    Subclasses set ``name``, ``model_names`` (glob patterns), ``model_types``
    (``config.model_type`` values), ``model_classes`` (``(module, *class names)``)
    and implement :meth:`install`. ``patch_class`` is the patch :meth:`patch` creates
    (a subclass adds family controls, e.g. the vision-language modes).
    """

    name: str = ""
    model_names: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    model_classes: tuple[str, ...] = ()
    patch_class: type[TurboPatch] = TurboPatch
    #: keyword settings of the family's own (none: everything is a config field)
    options: frozenset[str] = frozenset()
    #: named sets of such settings
    presets: Mapping[str, Mapping[str, Any]] = MappingProxyType({})

    def matches(self, model: nn.Module) -> bool:
        return is_instance(model, *self.model_classes)

    def patch(
        self,
        model: nn.Module,
        config: TurboConfig,
        explicit: frozenset[str] = frozenset(),
        **options: Any,
    ) -> TurboPatch:
        if options:  # a family with options of its own overrides this method
            raise TypeError(f"adapter {self.name!r} takes no options; got {sorted(options)}")
        patch = self.patch_class(model, self.name)
        try:
            self.install(patch, model, config)
        except BaseException:
            patch.remove()  # nothing half-patched stays behind
            raise
        return patch

    @abc.abstractmethod
    def install(self, patch: TurboPatch, model: nn.Module, config: TurboConfig) -> None:
        """Add the model's sites and wrappers to ``patch`` (checks first, then patches)."""

    def __repr__(self) -> str:
        return f"<adapter {self.name}>"
