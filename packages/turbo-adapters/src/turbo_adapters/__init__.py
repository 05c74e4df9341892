"""Turbo adapters: token reduction for timm, torchvision, transformers and diffusers models.

>>> import timm, turbo_adapters
>>> model = timm.create_model("vit_base_patch16_224")
>>> handle = turbo_adapters.apply(model, "reference", r=13)   # patch in place
>>> handle.r = 8                                              # change at any time
>>> turbo_adapters.remove(model)                              # exactly as before
"""

from .api import apply, patched, remove, resolve_config
from .handle import TurboHandle, handle_of
from .registry import (
    ENTRY_POINT_GROUP,
    Adapter,
    adapter_for_model,
    get_adapter,
    list_adapters,
    register_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "TurboHandle",
    "adapter_for_model",
    "apply",
    "get_adapter",
    "handle_of",
    "list_adapters",
    "patched",
    "register_adapter",
    "remove",
    "resolve_config",
]
