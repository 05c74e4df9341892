"""The base of every transformers family: matching by class without importing transformers
needlessly, the one submodule of a class, and layers on the block runner with their
attention on Turbo's registered function."""

from __future__ import annotations

import abc
import sys
from typing import Any

from torch import nn

from ..adapter import FamilyAdapter
from ..attention import use_turbo_attention
from ..blocks import BlockSpec, install_blocks
from ..patch import TurboPatch
from ..site import ReductionSite

__all__ = ["HFAdapter", "find_one", "install_hf_layers"]


def find_one(model: nn.Module, classes: tuple[type, ...], what: str) -> nn.Module:
    """The single submodule (or ``model`` itself) that is an instance of ``classes``."""
    found = [m for m in model.modules() if isinstance(m, classes)]
    if len(found) != 1:
        raise TypeError(
            f"expected exactly one {what} in {type(model).__name__}, found {len(found)}"
        )
    return found[0]


def install_hf_layers(
    patch: TurboPatch, site: ReductionSite, layers: list[nn.Module], spec: BlockSpec
) -> None:
    """Layers on the block runner, their attention on Turbo's registered function."""
    if not layers:
        raise TypeError("found no transformer layers to patch")
    for layer in layers:
        spec.check(layer)
    use_turbo_attention(
        patch, site, [spec.part(layer, spec.owner or spec.attn) for layer in layers]
    )
    install_blocks(patch, site, layers, spec)


class HFAdapter(FamilyAdapter):
    """A hand-written transformers family with a ``classes()`` table.

    New tower families are declared (:class:`~turbo_adapters.families.tower.TowerFamily`);
    this base stays for families that are not towers (LLaVA) and for adapters written
    against it. Matching is :meth:`FamilyAdapter.matches` on :attr:`models`; a subclass
    that declares no ``models`` is matched on ``classes()["models"]``, turned into the
    same ``"module:Class"`` references.
    """

    @abc.abstractmethod
    def classes(self) -> dict[str, Any]:
        """``{"models": (...), ...}``: the transformers classes (imported lazily)."""

    def model_refs(self) -> tuple[str, ...]:
        refs = super().model_refs()
        if refs or "transformers" not in sys.modules:
            return refs
        try:
            models = self.classes()["models"]
        except ImportError:
            return ()
        return tuple(f"{c.__module__}:{c.__qualname__}" for c in models)
