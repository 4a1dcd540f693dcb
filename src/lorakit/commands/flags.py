"""Checked types for numeric flags: an out-of-range value is refused by argparse itself.

``type=positive_int`` makes ``--rank 0`` end as ``lorakit estimate: error: argument --rank: must
be a positive integer, got 0`` (exit 2) before any model is loaded, the same way argparse refuses
``--rank x``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (``what`` names it in the message)."""
    def check(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    check.__name__ = "int"
    return check


def float_between(low: float, high: float | None, what: str, *, open_low: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    def check(text: str) -> float:
        value = _number(float, text)
        if value < low or (open_low and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    check.__name__ = "float"
    return check


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")
finite_float = float_between(-math.inf, None, "a finite number")
fraction = float_between(0.0, 1.0, "between 0 and 1")
density = float_between(0.0, 1.0, "in (0, 1]", open_low=True)
percent = float_between(0.0, 100.0, "a percentage from 0 to 100")
dropout = float_between(0.0, 1.0, "a probability from 0 to 1")


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free port) to 65535."""
    value = _number(int, text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {value}")
    return value
