"""The paper's published numbers (Chen et al. 2025): Table 1 and its Chinchilla row, the relative errors of
Tables 2 and 4, and the numbers its figures report, read from ``laws/paper.yaml`` (their one home, each key
commented there with its table or figure). Its ``split`` section holds those of the FP→QAT split (Dremov et al.
2025, read by :mod:`qatlaw.split`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from qatlaw.config import read_yaml

PATH = Path(__file__).with_name("laws") / "paper.yaml"


@functools.cache
def constants() -> dict[str, Any]:
    """The parsed ``laws/paper.yaml`` (shared between callers: read it, never change it)."""
    return read_yaml(PATH)
