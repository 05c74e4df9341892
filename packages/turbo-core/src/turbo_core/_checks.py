"""Argument checks shared by the config and the schedule; errors name the parameter."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch


def as_integer(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer scalar, else None.

    Integer scalars are ints, numpy integers (anything with ``__index__``) and 0-d integer
    tensors; bools of any kind are not (``True`` is not a count).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or not _is_integer_dtype(value.dtype):
            return None
        return int(value.item())
    try:
        return operator.index(value)  # numpy's bool refuses __index__
    except TypeError:
        return None


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


def check_int(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum`` (numpy integers and 0-d integer tensors too)."""
    number = as_integer(value)
    if number is None:
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


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
