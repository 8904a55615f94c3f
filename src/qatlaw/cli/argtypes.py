"""The types of the options that take numbers: a comma-separated list of positive numbers, or one."""

from __future__ import annotations

import argparse


def numbers(text: str) -> list[float]:
    """A comma-separated list of numbers: '1e9,7e9'."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def positive(text: str) -> float:
    """One positive number."""
    values = numbers(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive number, got {text!r}")
    return values[0]
