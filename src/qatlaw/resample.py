"""Bootstrap resamples at the level of the design: cells, and the seeds inside each cell.

The runs of one (cell, seed) share one BF16 baseline (their δ share its noise), so they are one unit and
move together. A resample draws the cells with replacement, then, inside every drawn cell, its seeds with
replacement (a two-stage cluster bootstrap); with one seed per cell it is a resample of cells. Every interval
of the fit (:mod:`qatlaw.fit`), the findings (:mod:`qatlaw.findings`) and the split (:mod:`qatlaw.split`)
comes from here, so they all resample the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike


class Design:
    """The rows of a table grouped into cells and, inside each cell, seeds (row indices 0..n-1)."""

    def __init__(self, cells: ArrayLike, seeds: ArrayLike | None = None) -> None:
        cell_ids = pd.factorize(np.asarray(cells), sort=True)[0]
        seed_ids = np.zeros(len(cell_ids), int) if seeds is None else pd.factorize(np.asarray(seeds), sort=True)[0]
        self.n_rows = len(cell_ids)
        units = pd.DataFrame({"cell": cell_ids, "seed": seed_ids}).groupby(["cell", "seed"], sort=True).indices
        self.cells: list[list[np.ndarray]] = [[] for _ in range(cell_ids.max() + 1 if len(cell_ids) else 0)]
        for (cell, _), rows in units.items():
            self.cells[cell].append(np.asarray(rows, int))

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    @property
    def max_seeds(self) -> int:
        """The most seeds any cell has."""
        return max((len(seeds) for seeds in self.cells), default=0)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One resample: the row indices of cells drawn with replacement and, inside each, seeds drawn with
        replacement."""
        parts = []
        for cell in rng.integers(0, self.n_cells, self.n_cells):
            seeds = self.cells[cell]
            parts.extend(seeds[s] for s in rng.integers(0, len(seeds), len(seeds)))
        return np.concatenate(parts) if parts else np.zeros(0, int)

    def draws(self, n_boot: int, seed: int) -> Iterator[np.ndarray]:
        """``n_boot`` resamples from a generator seeded with ``seed``."""
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            yield self.draw(rng)


def of_table(table: pd.DataFrame, cell: list[str], seed: str | None = "seed") -> Design:
    """The design of a table: cells by the ``cell`` columns, seeds by ``seed`` (one seed per cell when the
    column is absent or None)."""
    if not len(table):
        return Design(np.zeros(0, int))
    cells = table.groupby(cell, sort=True, dropna=False).ngroup().to_numpy()
    seeds = table[seed].to_numpy() if seed is not None and seed in table.columns else None
    return Design(cells, seeds)


def runs(n: int) -> Design:
    """n independent rows, each its own cell (a plain bootstrap of rows)."""
    return Design(np.arange(n))
