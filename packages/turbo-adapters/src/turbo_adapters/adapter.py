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

__all__ = ["FamilyAdapter", "is_instance", "is_model_of", "model_defaults", "resolve"]


def resolve(refs: tuple[str, ...]) -> tuple[type, ...]:
    """The classes named by ``"module:Class"`` references (imports their modules).

    Raises ImportError naming the reference when its module or class is missing.
    """
    found = []
    for ref in refs:
        module, sep, name = ref.partition(":")
        if not sep or not name:
            raise ValueError(f"class reference must be 'module:Class', got {ref!r}")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except AttributeError as error:
            raise ImportError(f"{module} has no class {name!r} (from {ref!r})") from error
    return tuple(found)


def is_model_of(model: nn.Module, refs: tuple[str, ...]) -> bool:
    """``isinstance(model, <any class in refs>)`` without importing a library needlessly.

    The one way a built-in adapter recognises a model. A model can only be an instance
    of a library's class if that library is already imported, so references into
    libraries that are not loaded answer False at once; a class that this version of the
    library lacks is skipped (it cannot be the model's class either).
    """
    classes = []
    for ref in refs:
        module = ref.partition(":")[0]
        if module.split(".")[0] not in sys.modules:
            continue
        try:
            classes.extend(resolve((ref,)))
        except ImportError:
            continue
    return bool(classes) and isinstance(model, tuple(classes))


def is_instance(model: nn.Module, module: str, *class_names: str) -> bool:
    """``isinstance(model, module.ClassName)``: :func:`is_model_of` with the names split."""
    return is_model_of(model, tuple(f"{module}:{name}" for name in class_names))


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
    (``config.model_type`` values), ``models`` (``"module:Class"`` references of the
    model classes it patches, imported lazily) and implement :meth:`install`.
    ``patch_class`` is the patch :meth:`patch` creates (a subclass adds family
    controls, e.g. the vision-language modes). Tower families are declared instead
    (:class:`~turbo_adapters.families.tower.TowerFamily`).
    """

    name: str = ""
    model_names: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    #: ``"module:Class"`` references of the models this family patches
    models: tuple[str, ...] = ()
    #: deprecated spelling of :attr:`models`: ``(module, *class names)``
    model_classes: tuple[str, ...] = ()
    patch_class: type[TurboPatch] = TurboPatch
    #: where the family can reduce tokens: ``"tower"`` (inside the vision or text
    #: encoder), ``"connector"`` (between the vision side and the language model),
    #: ``"llm"`` (inside the language model's decoder), ``"denoiser"`` (diffusion)
    stages: tuple[str, ...] = ("tower",)
    #: stage -> which of the family's models it does not cover (a stage offered on some)
    stage_limits: Mapping[str, str] = MappingProxyType({})
    #: keyword settings of the family's own (none: everything is a config field)
    options: frozenset[str] = frozenset()
    #: named sets of such settings
    presets: Mapping[str, Mapping[str, Any]] = MappingProxyType({})

    def model_refs(self) -> tuple[str, ...]:
        """:attr:`models`, plus the deprecated ``model_classes`` spelled as references."""
        if not self.model_classes:
            return self.models
        module, *names = self.model_classes
        return self.models + tuple(f"{module}:{name}" for name in names)

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` is an instance of one of :meth:`model_refs` (never imports)."""
        return is_model_of(model, self.model_refs())

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
