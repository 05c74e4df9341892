"""Adapter registry: model names, model types and model objects -> the adapter that patches them.

Third-party packages add adapters with the :func:`register_adapter` decorator or
through the ``turbo_adapters.adapters`` entry-point group (an entry point names a
module or callable; loading it registers its adapters)::

    [project.entry-points."turbo_adapters.adapters"]
    my_model = "my_package.turbo_adapter"

Such an adapter proves itself with the conformance kit the built-in ones pass:
:mod:`turbo_adapters.testing` (one ``Case`` per model, ``run_check`` per check).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from torch import nn

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "adapter_for_model",
    "get_adapter",
    "list_adapters",
    "register_adapter",
]

ENTRY_POINT_GROUP = "turbo_adapters.adapters"

#: The adapters shipped here, as ``module:Class``, imported on first look-up. Order
#: matters only for `adapter_for_model` (the first whose class check passes). The
#: family modules import nothing from this one, so there is no import cycle, and each
#: names its model classes as ``"module:Class"`` references, imported lazily.
BUILTIN_ADAPTERS = (
    "turbo_adapters.families.timm_vit:TimmViTAdapter",
    "turbo_adapters.families.torchvision_vit:TorchvisionViTAdapter",
    "turbo_adapters.families.hf_vit:HFViTAdapter",
    "turbo_adapters.families.hf_vit:HFDinov2Adapter",
    "turbo_adapters.families.clip:HFCLIPVisionAdapter",
    "turbo_adapters.families.siglip:SiglipVisionAdapter",
    "turbo_adapters.families.siglip2:Siglip2VisionAdapter",
    "turbo_adapters.families.internvl_vision:InternVLVisionAdapter",
    "turbo_adapters.families.bert:BertAdapter",
    "turbo_adapters.families.timm_eva:TimmEvaAdapter",
    "turbo_adapters.families.blip.v1:BlipAdapter",
    "turbo_adapters.families.blip.v2:Blip2Adapter",
    "turbo_adapters.families.blip.v2:InstructBlipAdapter",
    "turbo_adapters.families.lavis:LavisViTAdapter",
    "turbo_adapters.families.llava:LlavaAdapter",
    "turbo_adapters.families.minigpt:MiniGPTv2Adapter",
    "turbo_adapters.families.qwen_vl:QwenVLAdapter",
    "turbo_adapters.families.connector_vlm:PaliGemmaAdapter",
    "turbo_adapters.families.connector_vlm:Gemma3Adapter",
    "turbo_adapters.families.connector_vlm:LlavaOneVisionAdapter",
    "turbo_adapters.families.connector_vlm:Idefics3Adapter",
    "turbo_adapters.families.connector_vlm:InternVLAdapter",
    "turbo_adapters.families.stable_diffusion:StableDiffusionAdapter",
    "turbo_adapters.families.dit:PixArtAdapter",
    "turbo_adapters.families.dit:SD3Adapter",
    "turbo_adapters.families.dit:FluxAdapter",
    "turbo_adapters.families.dit:SanaAdapter",  # recognised to refuse with the reason
)


@runtime_checkable
class Adapter(Protocol):
    """What an adapter provides.

    Attributes:
        name: unique adapter name (``"timm-vit"``).
        model_names: glob patterns of names users write (``"vit_*"``, ``"google/vit-*"``).
        model_types: ``config.model_type`` values (transformers) it handles.
        stages: where it can reduce tokens (``"tower"``, ``"connector"``, ``"llm"``,
            ``"denoiser"``); optional, ``("tower",)`` when absent.
        options: keyword settings of the adapter's own that :func:`~turbo_adapters.apply`
            hands to :meth:`patch` instead of the config (Stable Diffusion's
            ``ratio_attn1`` ...); empty for most adapters.
        presets: named sets of such keyword settings (``"sd-fast"``), which
            :func:`~turbo_adapters.apply` accepts where a preset name goes.
    """

    name: str
    model_names: tuple[str, ...]
    model_types: tuple[str, ...]
    options: frozenset[str]
    presets: Mapping[str, Mapping[str, Any]]

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter can patch ``model`` (checked by class, not by path)."""
        ...

    def patch(
        self,
        model: nn.Module,
        config: Any,
        explicit: frozenset[str] = frozenset(),
        **options: Any,
    ) -> Any:
        """Patch ``model`` in place and return its :class:`~turbo_adapters.TurboPatch`.

        ``explicit`` names the config fields the user set by keyword; the adapter
        fills the others that depend on the model (``protected``) from the model;
        ``options`` are the adapter's own settings (names in :attr:`options`).
        """
        ...


_ADAPTERS: dict[str, Adapter] = {}
_loaded = False


def register_adapter(adapter: Any = None, *, replace: bool = False) -> Any:
    """Register an adapter class or instance; usable as a decorator.

    A class is instantiated without arguments. Registering a second adapter under
    an existing name is an error unless ``replace=True``.
    """

    def add(obj: Any) -> Any:
        instance = obj() if isinstance(obj, type) else obj
        missing = [
            a
            for a in ("name", "model_names", "model_types", "matches", "patch")
            if not hasattr(instance, a)
        ]
        if missing:
            raise TypeError(f"adapter {obj!r} lacks {missing}; see turbo_adapters.Adapter")
        for attribute, empty in (("options", frozenset()), ("presets", {})):
            if not hasattr(instance, attribute):  # adapters written before 0.3 declared neither
                warnings.warn(
                    f"adapter {instance.name!r} declares no {attribute!r}; taken as empty "
                    "(declare it: see turbo_adapters.Adapter)",
                    DeprecationWarning,
                    stacklevel=3,
                )
                setattr(instance, attribute, empty)
        if instance.name in _ADAPTERS and not replace:
            raise ValueError(
                f"an adapter named {instance.name!r} is already registered; "
                "pass replace=True to override it"
            )
        _ADAPTERS[instance.name] = instance
        return obj

    return add if adapter is None else add(adapter)


def _load_builtin_and_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for path in BUILTIN_ADAPTERS:
        module, _, name = path.partition(":")
        adapter = getattr(importlib.import_module(module), name)
        if adapter.name not in _ADAPTERS:
            register_adapter(adapter)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if isinstance(loaded, Callable) and not isinstance(loaded, type):  # type: ignore[arg-type]
            loaded()


def list_adapters() -> dict[str, tuple[str, ...]]:
    """Every adapter with the model names and types it answers to."""
    _load_builtin_and_entry_points()
    return {name: a.model_names + a.model_types for name, a in sorted(_ADAPTERS.items())}


def _supported_names() -> str:
    return "; ".join(f"{name}: {', '.join(pats)}" for name, pats in list_adapters().items())


def get_adapter(name: str) -> Adapter:
    """The adapter for a model name as users write it.

    Accepts adapter names, timm names (with or without a pretrained tag after the
    dot), hub ids (``google/vit-base-patch16-224``), ``config.model_type`` values
    and torchvision builder or weight names. Matching is case-insensitive.
    """
    _load_builtin_and_entry_points()
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name must be a non-empty model name")
    key = name.strip().lower()
    if key in _ADAPTERS:
        return _ADAPTERS[key]
    candidates = {key, key.split(".", 1)[0]}  # timm pretrained tags: name.tag
    for adapter in _ADAPTERS.values():
        if any(c == t for c in candidates for t in adapter.model_types):
            return adapter
    # the most specific matching pattern wins (most literal characters), not the first
    best: tuple[int, Adapter] | None = None
    for adapter in _ADAPTERS.values():
        for pattern in adapter.model_names:
            if any(fnmatch.fnmatchcase(c, pattern.lower()) for c in candidates):
                literal = len(re.sub(r"\[[^\]]*\]|[*?]", "", pattern))
                if best is None or literal > best[0]:
                    best = (literal, adapter)
    if best is not None:
        return best[1]
    raise KeyError(f"no Turbo adapter for {name!r}. Supported: {_supported_names()}")


def adapter_for_model(model: nn.Module) -> Adapter:
    """The adapter that recognises ``model`` by its classes.

    Every adapter answers through ``matches``. For the built-in family adapters
    (:class:`~turbo_adapters.adapter.FamilyAdapter`) that is one mechanism:
    ``is_model_of(model, adapter.models)`` over their ``"module:Class"`` references,
    which never imports a library the user has not imported.
    """
    _load_builtin_and_entry_points()
    for adapter in _ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    raise TypeError(
        f"no Turbo adapter recognises {type(model).__module__}.{type(model).__name__}. "
        f"Supported: {_supported_names()}"
    )
