"""The connector-stage contract: reduce each image's tokens to a budget before the language model.

A connector method sees the image tokens that would enter the language model and returns at
most ``budget`` tokens per image, each standing for one or more input tokens. The adapters own
everything model-specific (placeholder runs, masks, position ids); the methods own only the
choice of tokens, so every method runs on every family through the same two types below.

Methods register by name in :data:`CONNECTOR_METHODS` with :func:`register_connector_method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

__all__ = [
    "CONNECTOR_METHODS",
    "ConnectorInputs",
    "ConnectorMethod",
    "ReducedTokens",
    "check_reduced",
    "get_connector_method",
    "register_connector_method",
]


@dataclass(frozen=True)
class ConnectorInputs:
    """What a connector method may look at, for a batch of B images of N tokens each.

    Attributes:
        features: ``(B, N, D)`` the image tokens as they would enter the language model.
        keys: ``(B, N, Dk)`` features to measure token similarity with (for example the
            tower's last-layer keys); ``None`` means use ``features``.
        guide: ``(B, N)`` non-negative semantic attention of each token (CLS attention, a
            pooling probe's attention, or the prompt's attention); ``None`` if the family has
            no guide.
        text: ``(B, T, D)`` instruction embeddings in the space of ``features``, for
            instruction-aware methods; ``None`` if no prompt is known.
        text_mask: ``(B, T)`` bool, True for real (non-padding) text tokens; ``None`` means all.
    """

    features: Tensor
    keys: Tensor | None = None
    guide: Tensor | None = None
    text: Tensor | None = None
    text_mask: Tensor | None = None


class ReducedTokens(NamedTuple):
    """The output of a connector method: K tokens per image, in ascending order of ``index``.

    Attributes:
        tokens: ``(B, K, D)`` the tokens passed on to the language model.
        sizes: ``(B, K)`` float, how many input tokens each output token stands for (1 for a
            kept token, more for a merged one); they sum to N per image when every input
            token is accounted for, less when a method drops tokens.
        index: ``(B, K)`` long, the input position each output token takes its position id
            from, strictly ascending per row.
    """

    tokens: Tensor
    sizes: Tensor
    # the field shadows tuple.index (the method), which nothing here needs
    index: Tensor  # type: ignore[assignment]


ConnectorMethod = Callable[[ConnectorInputs, int], ReducedTokens]
"""A method: ``method(inputs, budget) -> ReducedTokens`` with exactly ``min(budget, N)`` tokens."""

CONNECTOR_METHODS: dict[str, ConnectorMethod] = {}


def register_connector_method(
    name: str, method: ConnectorMethod | None = None, *, replace: bool = False
) -> object:
    """Register ``method`` under ``name`` (usable as a decorator when ``method`` is omitted)."""

    def add(fn: ConnectorMethod) -> ConnectorMethod:
        if name in CONNECTOR_METHODS and not replace:
            raise ValueError(f"connector method {name!r} is already registered; pass replace=True")
        CONNECTOR_METHODS[name] = fn
        return fn

    return add if method is None else add(method)


def get_connector_method(name: str) -> ConnectorMethod:
    """The registered method called ``name``; a clear error lists the known names."""
    try:
        return CONNECTOR_METHODS[name]
    except KeyError:
        known = ", ".join(sorted(CONNECTOR_METHODS)) or "none registered"
        raise ValueError(f"unknown connector method {name!r}; known: {known}") from None


def check_reduced(inputs: ConnectorInputs, budget: int, out: ReducedTokens) -> None:
    """Raise if ``out`` breaks the contract for ``inputs`` and ``budget`` (used by tests and kits)."""
    batch, count, width = inputs.features.shape
    expected = min(budget, count)
    if out.tokens.shape != (batch, expected, width):
        raise AssertionError(f"tokens {tuple(out.tokens.shape)} != {(batch, expected, width)}")
    if out.sizes.shape != (batch, expected) or out.index.shape != (batch, expected):
        raise AssertionError("sizes and index must be (B, K)")
    if expected > 1 and not bool((out.index[:, 1:] > out.index[:, :-1]).all()):
        raise AssertionError("index must be strictly ascending per row")
    if bool((out.index < 0).any()) or bool((out.index >= count).any()):
        raise AssertionError("index out of range")
    if bool((out.sizes <= 0).any()) or bool((out.sizes.sum(-1) > count + 1e-4).any()):
        raise AssertionError("sizes must be positive and sum to at most N")
