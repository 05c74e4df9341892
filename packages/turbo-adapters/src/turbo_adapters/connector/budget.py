"""The connector stage's settings and its budget rule: how many tokens each image keeps.

The counts depend only on the budget and each image's token count, never on the pixels,
so a serving engine can compute them in advance with :func:`connector_counts`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from .guides import GUIDES

__all__ = ["Budget", "ConnectorReduction", "connector_counts"]

#: a count per image (int >= 1), a fraction of each image's tokens (float in (0, 1]), or
#: one count per image of the call (a tuple of ints >= 1, images in batch order)
Budget = int | float | tuple[int, ...]


def _check_budget(budget: object) -> Budget:
    if isinstance(budget, bool):
        raise ValueError(f"budget must be an int >= 1, a float in (0, 1] or counts, got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget must be an int >= 1 (tokens per image), got {budget}")
        return budget
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget as a fraction must be in (0, 1], got {budget}")
        return budget
    if isinstance(budget, Sequence) and not isinstance(budget, str):
        counts = tuple(budget)
        if not counts or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts
        ):
            raise ValueError(f"budget as per-image counts must be ints >= 1, got {budget!r}")
        return counts
    raise ValueError(
        f"budget must be an int >= 1, a float in (0, 1] or a tuple of per-image counts, "
        f"got {budget!r}"
    )


def connector_counts(budget: Budget, tokens: Sequence[int]) -> list[int]:
    """Tokens kept per image for ``budget`` when the images have ``tokens`` tokens each.

    A count keeps ``min(budget, N)``; a fraction keeps ``ceil(fraction * N)`` (at least 1);
    per-image counts give one count per image (``min(count, N)``).

    Raises:
        ValueError: for a bad budget, or per-image counts whose length differs from the
            number of images.
    """
    budget = _check_budget(budget)
    if isinstance(budget, tuple):
        if len(budget) != len(tokens):
            raise ValueError(
                f"budget gives {len(budget)} per-image counts but the call has {len(tokens)} images"
            )
        return [min(k, n) for k, n in zip(budget, tokens, strict=True)]
    if isinstance(budget, float):
        return [min(n, max(1, math.ceil(budget * n - 1e-9))) for n in tokens]
    return [min(budget, n) for n in tokens]


@dataclasses.dataclass(frozen=True)
class ConnectorReduction:
    """Settings of the connector stage (one reduction between the vision side and the LLM).

    Attributes:
        budget: tokens kept per image: a count, a fraction, or per-image counts
            (see :func:`connector_counts`).
        method: a connector method's name in :data:`turbo_core.connector.CONNECTOR_METHODS`
            (looked up when a call runs, so methods registered later are found).
        guide: where the method's guide (each token's semantic value) comes from:
            ``"auto"`` (the family's default, see docs/connector.md), ``"none"``,
            ``"cls"``, ``"probe"``, ``"mean"`` or ``"text"`` (:mod:`.guides`). A guide
            the family lacks raises a ValueError naming the available ones.
        size_bias: ``log(size)`` of merged tokens in the language model's attention
            (:mod:`.size_bias`): None where the family's decoder carries it, True to
            require it (a ValueError with the reason where it cannot), False never.
    """

    budget: Budget = 0.25
    method: str = "turbo"
    guide: str = "auto"
    size_bias: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", _check_budget(self.budget))
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a connector method's name, got {self.method!r}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide must be one of {', '.join(GUIDES)}; got {self.guide!r}")
        if self.size_bias not in (None, True, False):
            raise ValueError(f"size_bias must be None, True or False, got {self.size_bias!r}")

    def counts(self, tokens: Sequence[int]) -> list[int]:
        """Tokens kept per image (see :func:`connector_counts`)."""
        return connector_counts(self.budget, tokens)
