"""Connector methods: Turbo and its peers, registered by name in ``CONNECTOR_METHODS``.

Each is a frozen settings object called as ``method(inputs, budget)``; the registry holds
one with default settings under its name (``turbo``, ``visionzip``, ``divprune``,
``cdpruner``). Register another configuration with
:func:`~turbo_core.connector.register_connector_method`.
"""

from __future__ import annotations

from ..connector import register_connector_method
from .cdpruner import CDPruner, dpp_greedy_map, instruction_relevance
from .divprune import DivPrune
from .turbo import TurboSelection
from .visionzip import VisionZip

__all__ = [
    "CDPruner",
    "DivPrune",
    "TurboSelection",
    "VisionZip",
    "dpp_greedy_map",
    "instruction_relevance",
]

for _name, _method in (
    ("turbo", TurboSelection()),
    ("visionzip", VisionZip()),
    ("divprune", DivPrune()),
    ("cdpruner", CDPruner()),
):
    register_connector_method(_name, _method)
