"""The seed noise of a study: how much δ and the BF16 loss of one run spread over seeds, as a function of N and D.

A :class:`NoiseModel` holds two spreads, each log sd = a + b·log N + c·log D (b = c = 0: a constant):

- ``delta``: the standard deviation of δ over seeds of one cell (one precision, G, N and D). δ is paired (the QAT
  loss minus its own seed's BF16 loss), so this is the spread of the difference, which is what a fit of δ sees.
- ``loss``: the standard deviation of the BF16 loss over seeds of one (N, D) cell (the Chinchilla fit's noise).

Where a model comes from, always named by its ``source``:

- :func:`constant`: numbers a user gives (e.g. the final-loss spread of reruns on their cluster);
- :func:`from_runs`: a run table with repeated seeds. Every cell with two or more finite values gives a sample sd
  s with n − 1 degrees of freedom; log s is corrected for its bias under Gaussian noise (E log s = log σ +
  ½(ψ((n−1)/2) − log((n−1)/2)), −0.635 at n = 2) and the spread is the least-squares fit of the corrected log s
  on (1, log N, log D) when at least ``MIN_CELLS_FOR_TREND`` cells span N and D; otherwise (too few cells, or one
  N or D among them) the pooled sd √(Σ(n−1)s² / Σ(n−1)), a constant. A table with no repeated cell is a
  :class:`NoiseError`: a noise model needs repeated seeds.
- :func:`from_fit`: the residual spread of a fit folder's in-sample predictions (robust: 1.4826 · median
  |residual|, scaled by √(n / (n − p))), for a table without repeated seeds. It counts lack of fit as noise, so
  it bounds the seed noise from above, but as independent noise: lack of fit that is largest where a constant is
  measured widens a real study's interval more than this noise does (quartet: predicted 0.56–0.75 of the actual
  widths with as many resamples as its fit; the root mean square of its residuals, 1.16× this robust sd, gives
  0.66–0.88; docs/design.md).

No relative model (sd of δ proportional to δ): laptop-v2's repeated cells show the seed sd falling with D and not
following δ (docs/design.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.special import digamma

from qatlaw import fit, runtable
from qatlaw.errors import QatlawError
from qatlaw.fit.solver import MAD_TO_SD
from qatlaw.io import read_parquet
from qatlaw.precision import BASELINE

MIN_CELLS_FOR_TREND = 4  # cells with repeated seeds for a trend in N and D (3 constants) rather than a constant


class NoiseError(QatlawError):
    """A noise model cannot be made from what was given."""


@dataclass(frozen=True)
class Spread:
    """A standard deviation as a function of N and D: exp(a + b·log N + c·log D)."""

    a: float
    b: float = 0.0
    c: float = 0.0
    cells: int = 0  # the cells it was estimated from (0: given)

    def sd(self, N: ArrayLike, D: ArrayLike) -> np.ndarray:
        return np.exp(self.a + self.b * np.log(np.asarray(N, float)) + self.c * np.log(np.asarray(D, float)))

    def describe(self) -> str:
        if self.b == 0 and self.c == 0:
            return f"{math.exp(self.a):.3g}"
        return f"exp({self.a:.3g} {self.b:+.3g}·log N {self.c:+.3g}·log D)"


@dataclass(frozen=True)
class NoiseModel:
    """The seed spread of δ and of the BF16 loss, and where it comes from."""

    delta: Spread
    loss: Spread
    source: str

    def describe(self) -> str:
        """One line naming the model: its source and both spreads."""
        return (f"noise model: {self.source}; sd of δ {self.delta.describe()}, "
                f"sd of the BF16 loss {self.loss.describe()}")


def constant(delta_sd: float, loss_sd: float | None = None) -> NoiseModel:
    """A given spread of δ (and of the BF16 loss, the same when not given), the same at every N and D."""
    loss_sd = delta_sd if loss_sd is None else loss_sd
    for name, value in (("δ", delta_sd), ("BF16 loss", loss_sd)):
        if not (np.isfinite(value) and value > 0):
            raise NoiseError(f"the noise sd of the {name} must be a positive number, got {value}")
    return NoiseModel(Spread(math.log(delta_sd)), Spread(math.log(loss_sd)),
                      f"given (sd of δ {delta_sd:g}, of the BF16 loss {loss_sd:g} nats, at every N and D)")


def _cell_sds(table: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Per cell with two or more finite values: N, D, n and the sample sd."""
    ok = table[np.isfinite(pd.to_numeric(table[value], errors="coerce").astype(float))]
    stats = ok.groupby(keys, dropna=False)[value].agg(["count", "std"]).reset_index()
    stats = stats[(stats["count"] >= 2) & (stats["std"] > 0)]
    return stats.rename(columns={"count": "n", "std": "s"})


def spread_of_cells(cells: pd.DataFrame) -> Spread:
    """The spread of cells with columns N, D, n, s (:func:`from_runs`'s rule)."""
    dof = cells["n"].to_numpy(float) - 1
    logN, logD = (np.log(cells[c].to_numpy(float)) for c in ("N", "D"))
    x = np.column_stack([np.ones(len(cells)), logN, logD])
    if len(cells) >= MIN_CELLS_FOR_TREND and np.linalg.matrix_rank(x) == 3:
        corrected = np.log(cells["s"].to_numpy(float)) - 0.5 * (digamma(dof / 2) - np.log(dof / 2))
        a, b, c = np.linalg.lstsq(x, corrected, rcond=None)[0]
        return Spread(float(a), float(b), float(c), len(cells))
    pooled = math.sqrt(float((dof * cells["s"].to_numpy(float) ** 2).sum() / dof.sum()))
    return Spread(math.log(pooled), cells=len(cells))


def from_runs(runs: pd.DataFrame, metric: str, source: str) -> NoiseModel:
    """The noise model of a run table (:func:`qatlaw.runtable.read_runs`) on ``metric``; NoiseError naming
    ``source`` when no cell of δ, or none of the BF16 loss, has two or more seeds."""
    loss_col, delta_col = runtable.metric_columns(metric)
    deltas = runtable.delta_table(runs)
    delta_cells = _cell_sds(deltas, ["precision", "G", "N", "D"], delta_col)
    loss_cells = _cell_sds(runs[runs["precision"] == BASELINE], ["N", "D"], loss_col)
    for cells, what in ((delta_cells, "δ"), (loss_cells, "BF16 loss")):
        if cells.empty:
            raise NoiseError(f"noise model from {source}: no cell has its {what} measured at two or more seeds; a "
                             "noise model needs repeated seeds (give --noise SD, or a fit folder for its residual "
                             "spread)")
    delta, loss = spread_of_cells(delta_cells), spread_of_cells(loss_cells)
    how = "trend in N and D" if delta.b or delta.c else "pooled, constant"
    return NoiseModel(delta, loss, f"seed spread of {source} ({metric}; δ from {delta.cells} cells with repeated "
                                   f"seeds, {how}; BF16 loss from {loss.cells} cells)")


def _residual_sd(rows: pd.DataFrame, n_params: int) -> float:
    r = rows["residual"].to_numpy(float)
    r = r[np.isfinite(r)]
    n = len(r)
    if n <= n_params:
        return math.nan
    return MAD_TO_SD * float(np.median(np.abs(r))) * math.sqrt(n / (n - n_params))


def from_fit(folder: str | Path) -> NoiseModel:
    """The residual spread of a fit folder (``predictions.parquet``): of δ over every precision's unified law
    (pooled), of the loss over the Chinchilla law; both constants."""
    path = Path(folder) / "predictions.parquet"
    preds = read_parquet(path, fit.PREDICTIONS_COLUMNS, "predictions table", error=NoiseError)
    inside = preds[preds["held_out"] == "none"]
    delta_sd = _residual_sd(inside[inside["law"] == "unified"], len(fit.DELTA_CONSTANTS))
    loss_sd = _residual_sd(inside[inside["law"] == "chinchilla"], 4)
    for sd, what in ((delta_sd, "unified"), (loss_sd, "chinchilla")):
        if not (np.isfinite(sd) and sd > 0):
            raise NoiseError(f"noise model from {path}: its {what} law has too few fitted runs for a residual spread")
    return NoiseModel(Spread(math.log(delta_sd)), Spread(math.log(loss_sd)),
                      f"residual spread of the fit {folder} (lack of fit counted as independent noise)")


def load(spec: str, metric: str) -> NoiseModel:
    """A noise model from ``--noise``: a number (sd of δ and of the BF16 loss, in nats), a run table (Parquet
    file) with repeated seeds, or a fit folder (its residual spread)."""
    try:
        number = float(spec)
    except ValueError:
        number = None
    if number is not None:
        return constant(number)
    path = Path(spec)
    if path.is_file():
        table = runtable.read_runs(path)
        return from_runs(table, metric, str(path))
    if path.is_dir() and (path / "predictions.parquet").is_file():
        return from_fit(path)
    raise NoiseError(f"--noise {spec}: neither a number, a run table (runs.parquet) nor a fit folder with "
                     "predictions.parquet")
