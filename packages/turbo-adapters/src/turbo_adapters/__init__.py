"""Turbo adapters: token reduction for timm, torchvision and transformers models.

>>> import timm, turbo_adapters
>>> model = timm.create_model("vit_base_patch16_224")
>>> patch = turbo_adapters.apply(model, "reference", r=13)   # patch in place
>>> patch.r = 8                                              # change at any time
>>> turbo_adapters.remove(model)                             # exactly as before

Importing this package needs torch only; model libraries load when a model of theirs
is patched.
"""

from .api import apply, patched, remove, resolve_config
from .attention import QKVLayout, attend, layout_attention, use_turbo_attention
from .blocks import (
    BlockSpec,
    TurboBypassWarning,
    install_blocks,
    install_scope,
    run_block,
    size_weighted_mean,
    token_sizes,
)
from .patch import TurboPatch, UnpatchedCopyWarning, handle_of
from .registry import (
    ENTRY_POINT_GROUP,
    Adapter,
    adapter_for_model,
    get_adapter,
    list_adapters,
    register_adapter,
)
from .site import Observation, ReductionSite, SiteCall

__version__ = "0.2.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "VLM_METHODS",
    "Adapter",
    "BlockSpec",
    "Observation",
    "QKVLayout",
    "ReductionSite",
    "SiteCall",
    "TurboBypassWarning",
    "TurboPatch",
    "UnpatchedCopyWarning",
    "adapter_for_model",
    "apply",
    "apply_vlm_method",
    "attend",
    "get_adapter",
    "handle_of",
    "install_blocks",
    "install_scope",
    "layout_attention",
    "list_adapters",
    "patched",
    "register_adapter",
    "remove",
    "resolve_config",
    "run_block",
    "size_weighted_mean",
    "token_sizes",
    "use_turbo_attention",
]


#: names loaded on first use: the VLM methods import transformers' cache classes
_LAZY = {"VLM_METHODS": "vlm_methods", "apply_vlm_method": "vlm_methods"}


def __getattr__(name: str) -> object:
    """The VLM method table on first use; ``TurboHandle``, :class:`TurboPatch`'s old name."""
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    from .patch import old_name

    return old_name(name, __name__)
