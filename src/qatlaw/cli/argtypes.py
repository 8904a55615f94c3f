"""The types of the options that take numbers: a comma-separated list of positive numbers, or one, or of positive
whole counts. Every number must be finite: ``inf`` and ``nan`` parse as floats but are no size, budget or count."""

from __future__ import annotations

import argparse
import math


def numbers(text: str) -> list[float]:
    """A comma-separated list of finite positive numbers: '1e9,7e9'."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def positive(text: str) -> float:
    """One finite positive number."""
    values = numbers(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive number, got {text!r}")
    return values[0]


def counts(text: str) -> list[int]:
    """A comma-separated list of positive whole numbers: '1,2'."""
    values = numbers(text)
    if not all(v.is_integer() for v in values):
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return [int(v) for v in values]
