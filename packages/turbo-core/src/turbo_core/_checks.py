"""Argument checks shared by the config and the schedule; errors name the parameter."""

from __future__ import annotations

import math
from typing import Any


def check_int(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum`` (bools are refused: ``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_float(
    value: Any, name: str, minimum: float | None = None, maximum: float | None = None
) -> float:
    """``value`` as a finite float within the given closed bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number
