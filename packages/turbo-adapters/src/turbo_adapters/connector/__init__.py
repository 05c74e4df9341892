"""The connector stage: one reduction of each image's tokens between the vision side and
the language model, to a deterministic budget.

:mod:`.budget` (settings and counts), :mod:`.stage` (running a method of
:mod:`turbo_core.connector` on a call's images) and :mod:`.runs` (placeholder runs
shortened, rows re-padded). Families wire these into their entry points.
"""

from .budget import Budget, ConnectorReduction, connector_counts
from .record import ConnectorRecord, last_connector
from .runs import Shortened, shorten_runs
from .stage import ImageTokens, KeptTokens, reduce_images

__all__ = [
    "Budget",
    "ConnectorRecord",
    "ConnectorReduction",
    "ImageTokens",
    "KeptTokens",
    "Shortened",
    "connector_counts",
    "last_connector",
    "reduce_images",
    "shorten_runs",
]
