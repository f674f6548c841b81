"""Argument checks shared by the whole package: a clear ``ValueError`` naming the argument."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def check_size(value: Any, name: str, minimum: int = 1, optional: bool = False) -> Any:
    """Return ``value`` as an ``int`` if it is an integer ``≥ minimum`` (or ``None`` with ``optional``), else raise.

    Raises:
        ValueError: naming the argument.

    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def check_real(value: Any, name: str, positive: bool = False, optional: bool = False) -> Any:
    """Return ``value`` as a ``float`` if finite (``> 0`` with ``positive``; ``None`` passes with ``optional``).

    Raises:
        ValueError: naming the argument.

    """
    if optional and value is None:
        return None
    number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not number or (positive and value <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
    return float(value)


def check_widths(value: Any, name: str, equal: bool = False) -> tuple[int, ...]:
    """Return hidden widths as a tuple of positive ints (all equal with ``equal``: residual networks), else raise."""
    if isinstance(value, int) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of positive integers (e.g. (64, 64)), got {value!r}")
    widths = tuple(check_size(width, f"every entry of {name}") for width in value)
    if equal and len(set(widths)) > 1:
        raise ValueError(f"a residual network needs equal hidden widths, got {name}={widths}")
    return widths
