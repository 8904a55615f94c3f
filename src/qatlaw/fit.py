"""Fit the scaling laws: Chinchilla on the BF16 runs, the unified QAT law per precision, and the baselines.

Laws (N non-embedding parameters, D training tokens, G the integer group length of the run table; for
``channel`` runs G is already the hidden size, so no special case is needed here):

- ``chinchilla``  L(N, D) = E + A/N^α + B/D^β on BF16 runs (α = β when ``tie``, as the paper).
- ``unified``     δ(N, D, G) = k · D^γD · (log2 G)^γG / N^γN, one law per precision (paper Eq. 5).
- ``no_D``        the unified law without the D^γD factor (paper Table 4).
- ``epm``         δ(N) = A/(N·eff)^α − A/N^α (paper Eq. 3, Table 2): A and α are the Chinchilla fit's, and
                  eff ∈ (0, 1] is the only free parameter, one per granularity (the "5 laws" of Table 2; the
                  run table's ``group`` label, so all ``channel`` runs share one eff whatever their G).

Every law is fitted to one metric (``run_fits(metric=...)``, config ``fit.metric``): ``val_loss``, the
validation loss and its δ (the default), or ``loss``, the smoothed training loss (the paper's).

How, and why the result is a property of the data rather than of the machine:

- Every law minimizes the summed Huber loss of its log-space residuals log(predicted) − log(observed).
- **δ laws** (unified, no_D, epm) are fitted to the QAT loss as the paper's law writes it, L_QAT = L_BF16 + δ̂:
  the residual of a run is log(L_BF16 + δ̂) − log(L_QAT), with its own BF16 baseline's measured loss (the δ
  table's ``baseline`` column; :class:`QatLoss`). A run whose δ came out ≤ 0 has a QAT loss like any other, so
  it enters the fit; leaving it out would drop the smallest δ, which sit at the largest N, and bias γN down. δ̂
  is linear in its log parameters (log k, γ; or log(eff^−α − 1)); without a baseline column the residual is
  log δ̂ − log δ, whose objective is convex, and a δ ≤ 0 cannot enter. The Huber threshold is set from the
  data's own scale: c = 1.345 σ̂, with σ̂ = 1.4826 · median |r| · √(n / (n − p)) from the least-squares
  residuals r (at least ``MIN_THRESHOLD``). A threshold of
  1e-3 on residuals of 0.1–1 (δ's seed noise at small scale) would make the loss almost L1, which is flat along
  whole segments, so its minimizer is not unique; at 1.345 σ̂ most runs sit in the quadratic part (the usual
  choice: 95% efficiency for Gaussian noise, bounded influence for the runs far off the law).
- **Chinchilla** keeps the paper's and Hoffmann et al.'s threshold, 1e-3 on log-loss residuals. It is not
  convex: L-BFGS-B runs from a quasi-random (Halton) grid of starts with α, β ≥ 0.
- Every candidate optimum is then **polished with Newton's method** on the exact gradient and Hessian until the
  step is below 1e-12 of the parameters, so it is the optimum itself, not wherever an optimizer's tolerances
  stopped. It counts as **identified** only if the Hessian is positive definite with every Jacobi-scaled
  eigenvalue above ``MIN_CURVATURE`` (for a δ law: enough runs strictly inside the threshold, spanning every
  parameter), and, for Chinchilla, if no other local optimum comes within a relative 1e-9 of its objective.
  A law that fails this is reported as not identified (NaN constants and a warning), never as a number.
- Signs of the γ are not constrained, so a wrong-signed exponent shows that the data disagree with the law.
  Runs that diverged, or whose loss (or, without a baseline, δ) is NaN or ≤ 0, are left out with a warning that
  names them and counted (``n_dropped``).

Bootstrap intervals resample the design (:mod:`qatlaw.resample`: cells by (N, D) with replacement, then the
seeds inside each, the runs of one seed of a cell kept together since they share a BF16 baseline; seeded) and
refit each resample with the full data's
Huber threshold, from the full-data optimum (δ laws), or from the best distinct local optima of the full-data
fit and ``BOOT_HALTON`` Halton starts (Chinchilla, whose E, A and α trade off along a flat valley on small grids:
one L-BFGS path from one start may end at a saddle or another optimum depending on rounding). Resamples whose fit is not
identified are skipped with a warning, and when fewer than half of them can be fitted no interval is reported
(NaN). EPM intervals hold A and α at their point estimates.

Outputs of :func:`run_fits` (``results/fit/``, written by :func:`write_fits`):

``params.parquet``, one row per fitted constant:

| column | meaning |
|---|---|
| ``law`` | ``chinchilla``, ``unified``, ``no_D`` or ``epm`` |
| ``precision`` | ``BF16`` for chinchilla, else the QAT precision string |
| ``constant`` | ``A B E alpha beta`` (chinchilla), ``k gamma_N gamma_D gamma_G`` (unified, no_D; γD = 0 there), ``eff_G<group>`` (epm: ``eff_G32``, ``eff_Gchannel``) |
| ``value`` | the fitted value; NaN when the law could not be fitted or is not identified (a warning is logged) |
| ``ci_low``, ``ci_high`` | 5th and 95th bootstrap percentiles (NaN without bootstrap, and for γD of no_D) |
| ``n_runs`` | runs the fit used (epm: over all its granularities) |
| ``n_dropped`` | runs left out as diverged or with a NaN or non-positive loss |
| ``objective`` | summed Huber loss at the optimum (epm: summed over its granularities) |

``predictions.parquet``, one row per run a law used (left-out runs have none) and law: ``run_id``, ``law``,
``precision``, ``N``, ``D``, ``G`` (null for chinchilla), ``observed`` (loss for chinchilla, else δ),
``predicted``, ``residual`` (predicted − observed), ``rel_error`` (|residual| / observed; NaN where observed ≤ 0),
``held_out`` (``none``: in-sample fit; ``largest_N`` / ``largest_D``: the run has the fit's largest N / D and the prediction
comes from a refit without those runs; for epm the held-out refit also refits A and α without them).

``bootstrap.parquet``, the bootstrap refits behind the intervals, one row per (law, precision, draw, constant):
``law``, ``precision``, ``draw`` (resample number; resamples that could not be fitted are absent), ``constant``,
``value``. A law's draws give its prediction bands (evaluate the law at each draw, take percentiles).

``comparison.parquet``, one row per law and precision: ``law``, ``precision``, ``rel_error`` (mean in-sample
|δ̂ − δ| / δ over the runs with δ > 0, or loss for chinchilla), ``n_runs``, ``heldout_largest_N_rel_error``,
``heldout_largest_D_rel_error`` (NaN where the refit is not possible).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import least_squares, minimize
from scipy.special import expit
from scipy.stats import qmc
from threadpoolctl import threadpool_limits

from qatlaw import config, resample, runtable
from qatlaw.errors import QatlawError
from qatlaw.io import read_parquet, write_parquet
from qatlaw.precision import BASELINE

log = logging.getLogger("qatlaw.fit")

CHINCHILLA_HUBER = 1e-3
CHINCHILLA_INITS = 128
# Start box of the Chinchilla parameters (a, b, e) = log(A, B, E) and the exponents (α, β).
CHINCHILLA_BOX = np.array([[0.0, 25.0], [0.0, 25.0], [-1.0, 1.5], [0.0, 2.0], [0.0, 2.0]])
HUBER_K = 1.345  # δ laws: Huber threshold in units of the residuals' robust standard deviation
MAD_TO_SD = 1.4826  # robust standard deviation per median absolute residual (Gaussian)
MIN_THRESHOLD = 1e-6  # δ laws: the threshold never falls below this (exact data: residuals of rounding size)
NEWTON_MAXITER = 100
NEWTON_XTOL = 1e-12  # polish until the Newton step is below this share of the parameters,
NEWTON_HALVINGS = 40  # or until no step halved up to this many times decreases the objective
KINK_RTOL = 1e-8  # a residual this close (relative) to the Huber threshold counts as on its edge
MIN_CURVATURE = 1e-10  # smallest Jacobi-scaled Hessian eigenvalue of an identified optimum
# Chinchilla: a term (A/N^α, B/D^β or E) below this share of every run's loss is heading for zero, a limit that
# log-space parameters reach only at infinity, so the optimum is not attained
MIN_TERM_SHARE = 1e-6
TIE_RTOL = 1e-9  # two distinct local optima this close in objective leave the law not identified
BOOT_STARTS = 4
# Chinchilla bootstrap refits start from the fit's optima and from this many Halton points of the start box: one
# L-BFGS path from a single start can end at a saddle or at another optimum depending on rounding
BOOT_HALTON = 16
BOOT_QUANTILES = (0.05, 0.95)
MIN_BOOT_SHARE = 0.5
HELD_OUT = {"largest_N": "N", "largest_D": "D"}
CHINCHILLA_CONSTANTS = ("A", "B", "E", "alpha", "beta")
DELTA_CONSTANTS = ("k", "gamma_N", "gamma_D", "gamma_G")
PARAMS_COLUMNS = ("law", "precision", "constant", "value", "ci_low", "ci_high", "n_runs", "n_dropped", "objective")
PREDICTIONS_COLUMNS = ("run_id", "law", "precision", "N", "D", "G", "observed", "predicted", "residual",
                       "rel_error", "held_out")
BOOTSTRAP_COLUMNS = ("law", "precision", "draw", "constant", "value")
COMPARISON_COLUMNS = ("law", "precision", "rel_error", "n_runs", "heldout_largest_N_rel_error",
                      "heldout_largest_D_rel_error")


class FitError(QatlawError):
    """A law cannot be fitted: missing columns, too few valid runs, or constants the data cannot identify."""


@dataclass(frozen=True)
class Fit:
    """One law fitted to one set of runs: its constants, and the bootstrap refits behind their intervals."""

    constants: dict[str, float]
    objective: float
    n_runs: int
    n_dropped: int
    draws: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per usable resample, one column per constant
    base: dict[str, float] | None = None  # epm: the Chinchilla constants its A and α come from

    @property
    def ci(self) -> dict[str, tuple[float, float]]:
        """5th/95th bootstrap percentile of every constant that has draws."""
        if self.draws.empty:
            return {}
        low, high = (self.draws.quantile(q) for q in BOOT_QUANTILES)
        return {c: (float(low[c]), float(high[c])) for c in self.draws.columns}


# ---------------------------------------------------------------------------------------------- the solver

def _huber(r: np.ndarray, c: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Summed Huber loss of residuals r at threshold c, its derivative per residual, and which residuals lie
    inside the quadratic part, clear of its edge by KINK_RTOL (the Hessian counts only those: a residual on the
    edge adds no curvature in the direction that moves it outwards)."""
    psi = np.clip(r, -c, c)
    return float(psi @ (r - 0.5 * psi)), psi, np.abs(r) < c * (1.0 - KINK_RTOL)


# An objective maps parameters to (value, gradient, Hessian or None when not asked for), scaled by 1/c² so the
# optimizers see O(1) values.
Objective = Callable[[np.ndarray, bool], tuple[float, np.ndarray, np.ndarray | None]]


def _newton(objective: Objective, theta: np.ndarray) -> tuple[np.ndarray, float]:
    """The optimum near theta, polished with Newton steps (halved until they do not increase the objective)
    until a step is below NEWTON_XTOL of the parameters. FitError if it does not converge or is not identified:
    its Hessian is not positive definite with every Jacobi-scaled eigenvalue above MIN_CURVATURE."""
    theta = minimize(lambda t: objective(t, False)[:2], theta, jac=True, hess=lambda t: objective(t, True)[2],
                     method="trust-exact", options={"gtol": 1e-12, "maxiter": NEWTON_MAXITER}).x
    for _ in range(NEWTON_MAXITER):
        f, g, h = objective(theta, True)
        step = np.linalg.lstsq(h, -g, rcond=None)[0]
        if np.abs(step).max() <= NEWTON_XTOL * (1.0 + np.abs(theta).max()):
            break
        for t in 0.5 ** np.arange(NEWTON_HALVINGS):
            if objective(theta + t * step, False)[0] < f:
                theta = theta + t * step
                break
        else:
            break  # no step decreases the objective: it is at its optimum to rounding
    else:
        raise FitError(f"not identified: Newton's method did not converge in {NEWTON_MAXITER} steps")
    diag = np.diag(h)
    if not (np.isfinite(h).all() and (diag > 0).all()):
        raise FitError("not identified: the objective is flat along some constant at the optimum")
    inv_sqrt = 1.0 / np.sqrt(diag)  # Jacobi scaling; the outer product of the diagonal itself may underflow
    scaled = h * np.outer(inv_sqrt, inv_sqrt)
    if not np.isfinite(scaled).all():
        raise FitError("not identified: the Hessian's scale spans more than floating point holds")
    curvature = np.linalg.eigvalsh(scaled).min()
    if not curvature > MIN_CURVATURE:
        raise FitError(f"not identified: the optimum is not unique (scaled Hessian eigenvalue {curvature:.1e})")
    return theta, f


def _lbfgs(objective: Objective, start: np.ndarray, bounds: list | None) -> tuple[np.ndarray, float]:
    res = minimize(lambda t: objective(t, False)[:2], start, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 1000})
    return res.x, float(res.fun)


def _optima(objective: Objective, starts: np.ndarray, bounds: list,
            degenerate: Callable[[np.ndarray], str | None]) -> list[tuple[float, np.ndarray]]:
    """L-BFGS-B from every start, then Newton on the best BOOT_STARTS distinct end points: the identified
    optima (not ``degenerate``), best first. FitError if none is identified, or if the best is tied with a
    distinct other one."""
    ends: dict[str, np.ndarray] = {}
    with threadpool_limits(limits=1, user_api="blas"):  # many tiny BLAS calls: waking threads costs 10-30x
        finite = [(x, f) for x, f in (_lbfgs(objective, s, bounds) for s in starts) if np.isfinite(f)]
        for x, f in sorted(finite, key=lambda end: end[1]):
            if len(ends) < BOOT_STARTS:
                ends.setdefault(f"{f:.6g}", x)
        optima, why = [], "no start reached a finite objective"
        for x in ends.values():
            try:
                theta, f = _newton(objective, x)
            except FitError as exc:
                why = str(exc)
                continue
            if reason := degenerate(theta):
                why = f"not identified: {reason}"
                continue
            if not any(np.allclose(theta, other, rtol=1e-6, atol=1e-9) for _, other in optima):
                optima.append((f, theta))
    if not optima:
        raise FitError(why)
    optima.sort(key=lambda o: o[0])
    if len(optima) > 1 and optima[1][0] - optima[0][0] <= TIE_RTOL * abs(optima[0][0]):
        raise FitError("not identified: two distinct optima have the same objective")
    return optima


def _halton(n: int, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """n deterministic quasi-random points in the box [low, high]."""
    if n < 1:
        raise FitError(f"inits must be at least 1, got {n}")
    return low + (high - low) * qmc.Halton(len(low), scramble=False).random(n)


def _law_objective(x: np.ndarray, log_base: np.ndarray, log_obs: np.ndarray, c: float,
                   offset: np.ndarray | float = 0.0) -> Objective:
    """Huber objective of the log-loss residuals r = log(b + exp(x·θ + o)) − log(observed loss) of a law whose
    quantization error exp(x·θ + o) adds to a baseline loss b (log b = −inf: r = x·θ + o − log(observed), a law
    linear in its log parameters, whose objective is convex)."""
    def objective(theta: np.ndarray, hessian: bool) -> tuple[float, np.ndarray, np.ndarray | None]:
        u = x @ theta + offset
        share = expit(u - log_base)  # ∂r/∂u: the error's share of the predicted loss (1 without a baseline)
        loss, psi, inside = _huber(np.logaddexp(log_base, u) - log_obs, c)
        grad = x.T @ (psi * share) / c**2
        if not hessian:
            return loss / c**2, grad, None
        weight = np.where(inside, share**2, 0.0) + psi * share * (1.0 - share)
        return loss / c**2, grad, (x * weight[:, None]).T @ x / c**2
    return objective


def _threshold(r: np.ndarray, p: int) -> float:
    """The δ laws' Huber threshold from the least-squares residuals r of p parameters: 1.345 robust standard
    deviations."""
    n = len(r)
    if n <= p:
        return MIN_THRESHOLD
    return max(MIN_THRESHOLD, HUBER_K * MAD_TO_SD * float(np.median(np.abs(r))) * np.sqrt(n / (n - p)))


def huber_threshold(x: np.ndarray, y: np.ndarray) -> float:
    """The Huber threshold of a law linear in its log parameters (x·θ ≈ y)."""
    return _threshold(x @ np.linalg.lstsq(x, y, rcond=None)[0] - y, x.shape[1])


def solve_loglinear(x: np.ndarray, y: np.ndarray, c: float,
                    start: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The unique minimizer of the Huber loss (threshold c) of x·θ − y and its objective (in units of c²);
    FitError when it is not unique. Starts from ``start`` or the least-squares solution."""
    if start is None:
        start = np.linalg.lstsq(x, y, rcond=None)[0]
    return _solve(_law_objective(x, np.full(len(y), -np.inf), y, c), start)


def _solve(objective: Objective, start: np.ndarray) -> tuple[np.ndarray, float]:
    with threadpool_limits(limits=1, user_api="blas"):
        return _newton(objective, _lbfgs(objective, start, None)[0])


@dataclass(frozen=True)
class QatLoss:
    """The runs of a δ law as the paper's law writes them, L_QAT = L_BF16 + δ: per run its design row x
    (log δ̂ = x·θ + offset), the log of its baseline loss (−inf without one) and the log of its observed QAT
    loss (log δ without a baseline). A run whose δ ≤ 0 still has a QAT loss, so it enters the fit like any
    other run."""

    x: np.ndarray
    log_base: np.ndarray
    log_obs: np.ndarray
    offset: np.ndarray

    def take(self, idx: np.ndarray) -> QatLoss:
        return QatLoss(self.x[idx], self.log_base[idx], self.log_obs[idx], self.offset[idx])

    def objective(self, c: float) -> Objective:
        return _law_objective(self.x, self.log_base, self.log_obs, c, self.offset)

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return np.logaddexp(self.log_base, self.x @ theta + self.offset) - self.log_obs

    def start(self) -> np.ndarray:
        """The least-squares θ: of log δ on the runs with δ > 0 (every run without a baseline), then, with a
        baseline, of every run's log QAT loss from there."""
        with_base = np.isfinite(self.log_base).any()
        delta = np.exp(self.log_obs) - np.exp(self.log_base) if with_base else np.exp(self.log_obs)
        x, p, positive = self.x, self.x.shape[1], delta > 0
        if positive.sum() >= p and np.linalg.matrix_rank(x[positive]) == p:
            theta = np.linalg.lstsq(x[positive], np.log(delta[positive]) - self.offset[positive], rcond=None)[0]
        else:
            floor = np.log(max(float(np.abs(delta).mean()), 1e-6))
            theta = np.linalg.lstsq(x, floor - self.offset, rcond=None)[0]
        if not with_base:
            return theta

        def jac(t: np.ndarray) -> np.ndarray:
            return expit(x @ t + self.offset - self.log_base)[:, None] * x
        with threadpool_limits(limits=1, user_api="blas"):
            return least_squares(self.residuals, theta, jac=jac, method="trf", x_scale="jac").x

    def threshold(self, theta: np.ndarray) -> float:
        """The Huber threshold from the residuals at the least-squares θ."""
        return _threshold(self.residuals(theta), self.x.shape[1])

    def solve(self, c: float, start: np.ndarray) -> tuple[np.ndarray, float]:
        """The Huber optimum (threshold c) from ``start`` and its objective in units of c²; FitError when it is
        not identified."""
        return _solve(self.objective(c), start)


def qat_loss(data: pd.DataFrame, x: np.ndarray, offset: np.ndarray | None = None) -> QatLoss:
    """The QatLoss of a table of usable runs (:func:`_valid`) with columns ``delta`` and, where measured,
    ``baseline``."""
    delta = data["delta"].to_numpy(float)
    if BASE in data.columns:
        base = data[BASE].to_numpy(float)
        log_base, log_obs = np.log(base), np.log(base + delta)
    else:
        log_base, log_obs = np.full(len(delta), -np.inf), np.log(delta)
    return QatLoss(x, log_base, log_obs, np.zeros(len(delta)) if offset is None else offset)


# ---------------------------------------------------------------------------------------------- run tables

BASE = "baseline"  # a δ table's column of the BF16 baseline loss of every run (the QAT loss is baseline + delta)


def _valid(df: pd.DataFrame, columns: tuple[str, ...]) -> tuple[pd.DataFrame, pd.Series]:
    """The columns as floats (original index) and which runs a fit can use: finite, positive N, D and loss,
    G ≥ 2, not diverged; a δ must be finite and, without a baseline loss to add it to, positive (with one, the
    QAT loss baseline + δ must be positive, so a δ ≤ 0 is a run like any other)."""
    with_base = "delta" in columns and BASE in df.columns
    names = (*columns, BASE) if with_base else columns
    data = pd.DataFrame({c: pd.to_numeric(df[c], errors="coerce").astype(float) for c in names}, index=df.index)
    ok = np.isfinite(data).all(axis=1)
    positive = [c for c in columns if not (with_base and c == "delta")]
    ok &= (data[positive] > 0).all(axis=1)
    if with_base:
        ok &= (data[BASE] > 0) & (data[BASE] + data["delta"] > 0)
    if "G" in columns:
        ok &= data["G"] >= 2
    if "diverged" in df.columns:
        ok &= ~df["diverged"].fillna(False).astype(bool)
    return data, ok


def _usable(df: pd.DataFrame, columns: tuple[str, ...], what: str, n_params: int) -> tuple[pd.DataFrame, int]:
    """The runs a fit can use (columns as floats) and how many were left out; FitError for a missing column or
    too few runs for n_params."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FitError(f"{what}: run table lacks columns {', '.join(missing)}")
    data, ok = _valid(df, columns)
    n_ok, n_dropped = int(ok.sum()), int((~ok).sum())
    why = _why_left_out(columns, BASE in data.columns)
    if n_dropped:
        ids = df.loc[~ok, "run_id"].astype(str).tolist() if "run_id" in df.columns else []
        log.warning("%s: left out %d of %d runs (%s)%s", what, n_dropped, len(df), why,
                    f": {', '.join(ids)}" if ids else "")
    if n_ok < n_params:
        dropped = f" ({n_dropped} of {len(df)} left out: {why})" if n_dropped else ""
        raise FitError(f"{what}: {n_ok} usable runs for {n_params} parameter{'s' * (n_params > 1)}{dropped}")
    return data[ok], n_dropped


def _why_left_out(columns: tuple[str, ...], with_base: bool) -> str:
    value = columns[-1]
    if value == "delta" and with_base:
        return f"diverged, or NaN {value} or non-positive {', '.join(columns[:-1])}"
    return f"diverged, or NaN or non-positive {', '.join(columns[:-1])} or {value}"


def _label(df: pd.DataFrame, what: str) -> str:
    """Name of a fit for messages: the law, and the precision when the runs share one."""
    if "precision" in df.columns and df["precision"].nunique() == 1:
        return f"{what} ({df['precision'].iloc[0]})"
    return what


def design(runs: pd.DataFrame) -> resample.Design:
    """The resampling design of a run table (:mod:`qatlaw.resample`): cells by (N, D), the runs of one seed of
    a cell (they share a BF16 baseline) kept together."""
    return resample.of_table(runs, ["N", "D"], "seed")


def _bootstrap(refit: Callable[[np.ndarray], dict[str, float] | None], plan: resample.Design,
               names: tuple[str, ...], n_boot: int, seed: int, what: str) -> pd.DataFrame:
    """n_boot refits on seeded resamples of ``plan`` (cells, and seeds within them), one row per resample whose
    fit is identified (refit gives None otherwise), indexed by the resample's number; no rows when fewer than
    MIN_BOOT_SHARE of them are, since the rest would then be a biased few."""
    samples = {draw: s for draw, idx in enumerate(plan.draws(n_boot, seed)) if (s := refit(idx)) is not None}
    if len(samples) < n_boot:
        log.warning("%s: %d of %d bootstrap resamples could not identify every constant and were skipped",
                    what, n_boot - len(samples), n_boot)
    if len(samples) < MIN_BOOT_SHARE * n_boot:
        log.warning("%s: no intervals: only %d of %d resamples could be fitted (too few cells for the constants)",
                    what, len(samples), n_boot)
        return pd.DataFrame(columns=list(names), dtype=float)
    return pd.DataFrame.from_dict(samples, orient="index", columns=list(names))


def _identified(solve: Callable[[], dict[str, float]]) -> dict[str, float] | None:
    """A bootstrap refit, or None when it is not identified."""
    try:
        return solve()
    except FitError:
        return None


# ---------------------------------------------------------------------------------------------- the laws

class Law(Protocol):
    """A law of the study: its name, the run columns it needs (the last is what it predicts), its fit and its
    prediction."""

    name: str
    columns: tuple[str, ...]

    def constant_names(self, runs: pd.DataFrame) -> tuple[str, ...]: ...

    def fit(self, runs: pd.DataFrame, n_boot: int = 0, seed: int = 0,
            held_out: tuple[str, float] | None = None) -> Fit: ...

    def predict(self, fit: Fit, runs: pd.DataFrame) -> np.ndarray: ...


def predict_loss(chin_params: dict, N: ArrayLike, D: ArrayLike) -> np.ndarray | float:
    """BF16 loss E + A/N^α + B/D^β."""
    p = chin_params
    return p["E"] + p["A"] / np.power(N, p["alpha"]) + p["B"] / np.power(D, p["beta"])


def predict_delta(params: dict, N: ArrayLike, D: ArrayLike, G: ArrayLike) -> np.ndarray | float:
    """δ = k · D^γD · (log2 G)^γG / N^γN; a law fitted at one G (γG NaN) has (log2 G)^γG folded into k, so
    it holds at that G only."""
    p = params
    gamma_G = p.get("gamma_G", math.nan)
    g_term = np.power(np.log2(G), gamma_G) if np.isfinite(gamma_G) else 1.0  # NaN: k is the value at its one G
    return p["k"] * np.power(D, p["gamma_D"]) * g_term / np.power(N, p["gamma_N"])


def _chinchilla_objective(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, tie: bool) -> Objective:
    """Huber loss of log L̂ − log L, log L̂ = LSE(a − α log N, b − β log D, e), θ = (a, b, e, α[, β])."""
    n, p = len(log_l), 4 if tie else 5
    du = np.zeros((n, 3, p))  # ∂u/∂θ of the three terms u = (a − α log N, b − β log D, e)
    du[:, 0, 0] = du[:, 1, 1] = du[:, 2, 2] = 1.0
    du[:, 0, 3] = -log_n
    du[:, 1, 3 if tie else 4] = -log_d
    c = CHINCHILLA_HUBER

    def objective(theta: np.ndarray, hessian: bool) -> tuple[float, np.ndarray, np.ndarray | None]:
        u = du @ theta
        top = u.max(axis=1, keepdims=True)
        w = np.exp(u - top)
        total = w.sum(axis=1)
        loss, psi, inside = _huber(top[:, 0] + np.log(total) - log_l, c)
        share = w / total[:, None]  # ∂ log L̂ / ∂u
        grad_r = np.einsum("nk,nkp->np", share, du)
        if not hessian:
            return loss / c**2, grad_r.T @ psi / c**2, None
        curv = np.einsum("nkp,nk,nkq->npq", du, share, du) - np.einsum("np,nq->npq", grad_r, grad_r)
        hess = grad_r[inside].T @ grad_r[inside] + np.einsum("n,npq->pq", psi, curv)
        return loss / c**2, grad_r.T @ psi / c**2, hess / c**2
    return objective


@dataclass
class Chinchilla:
    """L = E + A/N^α + B/D^β on the BF16 runs (α = β when ``tie``), from ``inits`` Halton starts or an array
    of starts (a, b, e, α[, β]) with a, b, e the logs of A, B, E. Fits are cached per set of runs, since the
    EPM law of every precision reuses them."""

    tie: bool = True
    inits: int | np.ndarray = CHINCHILLA_INITS
    name: str = "chinchilla"
    columns: tuple[str, ...] = ("N", "D", "loss")
    _cache: dict = field(default_factory=dict, repr=False)

    def constant_names(self, runs: pd.DataFrame) -> tuple[str, ...]:
        return CHINCHILLA_CONSTANTS

    def _constants(self, theta: np.ndarray) -> dict[str, float]:
        a, b, e, alpha = (float(t) for t in theta[:4])
        beta = alpha if self.tie else float(theta[4])
        return {"A": float(np.exp(a)), "B": float(np.exp(b)), "E": float(np.exp(e)), "alpha": alpha, "beta": beta}

    def _degenerate(self, theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> str | None:
        """Why an optimum is not one of the law's own (a negative exponent, a term tending to 0), or None."""
        if (theta[3:] < 0).any():
            return "an exponent is negative"
        c = self._constants(theta)
        terms = np.column_stack([c["A"] * np.exp(-c["alpha"] * log_n), c["B"] * np.exp(-c["beta"] * log_d),
                                 np.full(len(log_n), c["E"])])
        share = (terms / terms.sum(axis=1, keepdims=True)).max(axis=0)
        vanishing = [name for name, s in zip(("A/N^alpha", "B/D^beta", "E"), share) if s < MIN_TERM_SHARE]
        return f"{', '.join(vanishing)} tends to 0" if vanishing else None

    def fit(self, runs: pd.DataFrame, n_boot: int = 0, seed: int = 0,
            held_out: tuple[str, float] | None = None) -> Fit:
        key = (tuple(runs.index), n_boot, seed)
        if key not in self._cache:
            try:
                self._cache[key] = self._fit(runs, n_boot, seed)
            except FitError as exc:
                self._cache[key] = exc
        if isinstance(self._cache[key], FitError):
            raise self._cache[key]
        return self._cache[key]

    def _fit(self, runs: pd.DataFrame, n_boot: int, seed: int) -> Fit:
        n_params, what = (4 if self.tie else 5), _label(runs, "chinchilla")
        data, n_dropped = _usable(runs, self.columns, what, n_params)
        for col in ("N", "D"):
            if data[col].nunique() < 2:
                raise FitError(f"{what}: column {col} takes a single value among the valid runs")
        logs = [np.log(data[c].to_numpy()) for c in self.columns]
        box = CHINCHILLA_BOX[:n_params]
        if np.ndim(self.inits) == 0:
            starts = _halton(int(self.inits), box[:, 0], box[:, 1])
        else:
            starts = np.atleast_2d(np.asarray(self.inits, dtype=float))
        bounds = [(None, None)] * 3 + [(0.0, None)] * (n_params - 3)
        try:
            optima = _optima(_chinchilla_objective(*logs, self.tie), starts, bounds,
                             lambda theta: self._degenerate(theta, *logs[:2]))
        except FitError as exc:
            raise FitError(f"{what}: {exc}") from None
        objective, theta = optima[0]
        draws = pd.DataFrame()
        if n_boot:
            boot_starts = np.vstack([np.array([o[1] for o in optima]), _halton(BOOT_HALTON, box[:, 0], box[:, 1])])

            def refit(idx: np.ndarray) -> dict[str, float] | None:
                if len(np.unique(idx)) < n_params or min(len(np.unique(lg[idx])) for lg in logs[:2]) < 2:
                    return None
                log_n, log_d, log_l = (lg[idx] for lg in logs)
                resampled = _chinchilla_objective(log_n, log_d, log_l, self.tie)
                return _identified(lambda: self._constants(_optima(
                    resampled, boot_starts, bounds, lambda theta: self._degenerate(theta, log_n, log_d))[0][1]))
            draws = _bootstrap(refit, design(runs.loc[data.index]), CHINCHILLA_CONSTANTS, n_boot, seed, what)
        return Fit(self._constants(theta), objective * CHINCHILLA_HUBER**2, len(data), n_dropped, draws)

    def predict(self, fit: Fit, runs: pd.DataFrame) -> np.ndarray:
        return predict_loss(fit.constants, runs["N"].to_numpy(float), runs["D"].to_numpy(float))


def design_points(runs: pd.DataFrame, use_D: bool = True) -> int:
    """Distinct points of the design a δ law is fitted at: (N, D, G), or (N, G) without D. Seeds repeat a point;
    a law needs more points than constants, or it passes through them whatever the noise."""
    return len(runs[["N", "D", "G"] if use_D else ["N", "G"]].drop_duplicates())


RAY_SPAN = 1.5  # runs whose D/N spans less than this factor lie on one D/N ray


def one_ray(runs: pd.DataFrame) -> str:
    """Why a δ law cannot separate γN from γD when every run lies on one D/N ray (D/N spanning less than
    RAY_SPAN while N varies), with γD − γN, the slope of log δ on log N, the one exponent they identify (fitted
    as the law is, to the QAT loss where a baseline is given); empty otherwise."""
    ratio = runs["D"].to_numpy(float) / runs["N"].to_numpy(float)
    if runs["N"].nunique() < 2 or ratio.max() / ratio.min() >= RAY_SPAN:
        return ""
    x = np.column_stack([np.ones(len(runs)), np.log(runs["N"].to_numpy(float))])
    if runs["G"].nunique() > 1:
        x = np.column_stack([x, np.log(np.log2(runs["G"].to_numpy(float)))])
    along = qat_loss(runs, x)
    try:
        start = along.start()
        slope = f"{along.solve(along.threshold(start), start)[0][1]:.3g}"
    except FitError:
        slope = "not identified either"
    return (f"every run lies on one D/N ray (D/N {ratio.min():.3g}–{ratio.max():.3g}): gamma_N and gamma_D are not "
            f"separately identified; gamma_D − gamma_N = {slope} (the slope of log δ on log N)")


@dataclass
class DeltaLaw:
    """δ = k·D^γD·(log2 G)^γG/N^γN (``unified``), or with γD fixed at 0 (``no_D``, when not ``use_D``)."""

    use_D: bool = True
    columns: tuple[str, ...] = ("N", "D", "G", "delta")

    @property
    def name(self) -> str:
        return "unified" if self.use_D else "no_D"

    def constant_names(self, runs: pd.DataFrame) -> tuple[str, ...]:
        return DELTA_CONSTANTS

    def _design(self, data: pd.DataFrame, with_g: bool = True) -> np.ndarray:
        """Columns of log δ̂ = log k − γN log N [+ γD log D] [+ γG log log2 G]."""
        cols = [np.ones(len(data)), -np.log(data["N"].to_numpy())]
        if self.use_D:
            cols.append(np.log(data["D"].to_numpy()))
        if with_g:
            cols.append(np.log(np.log2(data["G"].to_numpy())))
        return np.column_stack(cols)

    def _constants(self, theta: np.ndarray, with_g: bool = True) -> dict[str, float]:
        theta = [float(t) for t in theta]
        gamma_D = theta.pop(2) if self.use_D else 0.0
        gamma_G = theta[2] if with_g else math.nan
        return {"k": float(np.exp(theta[0])), "gamma_N": theta[1], "gamma_D": gamma_D, "gamma_G": gamma_G}

    def fit(self, runs: pd.DataFrame, n_boot: int = 0, seed: int = 0,
            held_out: tuple[str, float] | None = None) -> Fit:
        """The law on ``runs``. With one G among them γG is not identified: it is NaN and k is the law's value at
        that G ((log2 G)^γG folded in; :func:`predict_delta` holds there only). FitError when the runs cannot
        identify the rest: too few, no more design points than constants, a single N or D, or every run on one
        D/N ray (only γD − γN is identified)."""
        what = _label(runs, self.name)
        data, n_dropped = _usable(runs, self.columns, what, 2 + self.use_D)
        with_g = data["G"].nunique() > 1
        free = tuple(c for c in DELTA_CONSTANTS if (self.use_D or c != "gamma_D") and (with_g or c != "gamma_G"))
        if len(data) < len(free):
            raise FitError(f"{what}: {len(data)} usable runs for {len(free)} parameters")
        if (points := design_points(data, self.use_D)) <= len(free):
            axes = "(N, D, G)" if self.use_D else "(N, G)"
            raise FitError(f"{what}: {points} distinct {axes} points for {len(free)} constants: an exact fit "
                           "through them, not a measurement")
        x = self._design(data, with_g)
        if np.linalg.matrix_rank(x) < x.shape[1]:
            single = [c for c in ("N", "D") if (self.use_D or c != "D") and data[c].nunique() < 2]
            why = f"column {', '.join(single)} takes a single value" if single else "N, D and G are collinear"
            raise FitError(f"{what}: cannot identify every exponent: {why} among the valid runs")
        if self.use_D and (ray := one_ray(data)):
            raise FitError(f"{what}: {ray}")
        runs_ = qat_loss(data, x)
        try:
            theta = runs_.start()
            c = runs_.threshold(theta)
            theta, objective = runs_.solve(c, theta)
        except FitError as exc:
            raise FitError(f"{what}: {exc}") from None
        if not with_g:
            log.warning("%s: one G (%g) among its runs: gamma_G is not identified; k is the law's value at that G",
                        what, data["G"].iloc[0])
        draws = pd.DataFrame()
        if n_boot:
            def refit(idx: np.ndarray) -> dict[str, float] | None:
                if np.linalg.matrix_rank(x[idx]) < x.shape[1]:
                    return None
                return _identified(lambda: self._constants(runs_.take(idx).solve(c, theta)[0], with_g))
            plan = design(runs.loc[data.index])
            draws = _bootstrap(refit, plan, DELTA_CONSTANTS, n_boot, seed, what)[list(free)]
        return Fit(self._constants(theta, with_g), objective * c**2, len(data), n_dropped, draws)

    def predict(self, fit: Fit, runs: pd.DataFrame) -> np.ndarray:
        return predict_delta(fit.constants, *(runs[c].to_numpy(float) for c in ("N", "D", "G")))


def epm_delta(chin_params: dict, eff: ArrayLike, N: ArrayLike) -> np.ndarray | float:
    """δ implied by an effective parameter multiplier: A/(N·eff)^α − A/N^α."""
    a, alpha = chin_params["A"], chin_params["alpha"]
    return a * np.power(N, -alpha) * (eff ** -alpha - 1.0)


def epm(N: ArrayLike, D: ArrayLike, G: ArrayLike, delta_params: dict, chinchilla_params: dict) -> np.ndarray | float:
    """Effective parameter multiplier implied by the unified law (paper App. H): (A / (A + δ·N^α))^(1/α)."""
    a, alpha = chinchilla_params["A"], chinchilla_params["alpha"]
    return np.power(a / (a + predict_delta(delta_params, N, D, G) * np.power(N, alpha)), 1.0 / alpha)


def _granularity(runs: pd.DataFrame) -> pd.Series:
    """The granularity each run belongs to: the run table's ``group`` label where present, else G."""
    if "group" in runs.columns:
        return runs["group"].astype(str)
    return pd.to_numeric(runs["G"], errors="coerce").astype("Int64").astype(str)


@dataclass
class EPM:
    """δ(N) = A/(N·eff)^α − A/N^α per granularity, with A and α from the Chinchilla law fitted to ``bf16``
    (without the BF16 runs at or above a held-out N or D)."""

    bf16: pd.DataFrame
    chinchilla: Chinchilla
    name: str = "epm"
    columns: tuple[str, ...] = ("N", "G", "delta")

    def constant_names(self, runs: pd.DataFrame) -> tuple[str, ...]:
        with_g = runs[pd.to_numeric(runs["G"], errors="coerce").notna()]
        return tuple(f"eff_G{g}" for g in sorted(set(_granularity(with_g))))

    def fit(self, runs: pd.DataFrame, n_boot: int = 0, seed: int = 0,
            held_out: tuple[str, float] | None = None) -> Fit:
        base = self.bf16
        if held_out is not None:
            base = base[pd.to_numeric(base[held_out[0]]) < held_out[1]]
        chin = self.chinchilla.fit(base, n_boot if held_out is None else 0, seed).constants
        return fit_epm(runs, chin, n_boot=n_boot, seed=seed)

    def predict(self, fit: Fit, runs: pd.DataFrame) -> np.ndarray:
        eff = _granularity(runs).map(lambda g: fit.constants[f"eff_G{g}"]).to_numpy(float)
        return epm_delta(fit.base, eff, runs["N"].to_numpy(float))


def fit_epm(runs: pd.DataFrame, chin_params: dict, *, n_boot: int = 0, seed: int = 0) -> Fit:
    """The EPM law given Chinchilla's A and α: per granularity, δ = exp(θ) · A / N^α with θ = log(eff^−α − 1)
    one constant, fitted to the QAT losses as the δ laws are; its constants are ``eff_G<granularity>``."""
    alpha, log_a, what = chin_params["alpha"], np.log(chin_params["A"]), _label(runs, "epm")
    if not alpha > 0:
        raise FitError(f"{what}: the Chinchilla exponent alpha must be positive, got {alpha}")
    data, n_dropped = _usable(runs, EPM.columns, what, 1)
    constants, objective, draws = {}, 0.0, []
    for label, grp in data.groupby(_granularity(runs.loc[data.index]), sort=False):
        x = np.ones((len(grp), 1))
        grp_runs = qat_loss(grp, x, log_a - alpha * np.log(grp["N"].to_numpy()))
        try:
            theta = grp_runs.start()
            c = grp_runs.threshold(theta)
            theta, f = grp_runs.solve(c, theta)
        except FitError as exc:
            raise FitError(f"{what} G {label}: {exc}") from None
        name = f"eff_G{label}"
        constants[name], objective = _eff(theta[0], alpha), objective + f * c**2
        if n_boot:
            def refit(idx: np.ndarray, grp_runs=grp_runs, c=c, theta=theta, name=name) -> dict[str, float] | None:
                return _identified(lambda: {name: _eff(grp_runs.take(idx).solve(c, theta)[0][0], alpha)})
            draws.append(_bootstrap(refit, design(runs.loc[grp.index]), (name,), n_boot, seed, f"{what} G {label}"))
    table = pd.concat(draws, axis=1) if draws else pd.DataFrame()
    return Fit(constants, objective, len(data), n_dropped, table, base=dict(chin_params))


def _eff(c: float, alpha: float) -> float:
    """eff from c = log(eff^−α − 1)."""
    return float((1.0 + np.exp(c)) ** (-1.0 / alpha))


def relative_error(pred: ArrayLike, obs: ArrayLike) -> float:
    """Mean of |pred − obs| / obs."""
    pred, obs = np.asarray(pred, dtype=float), np.asarray(obs, dtype=float)
    return float(np.mean(np.abs(pred - obs) / obs)) if obs.size else float("nan")


def draw_predictions(draws: pd.DataFrame, law: str, precision: str, *args: ArrayLike) -> np.ndarray | None:
    """A law's prediction at every one of its bootstrap draws (one row per draw), or None without draws:
    ``unified`` laws take (N, D, G), ``chinchilla`` (N, D)."""
    rows = draws[(draws["law"] == law) & (draws["precision"] == precision)]
    if rows.empty:
        return None
    wide = rows.pivot(index="draw", columns="constant", values="value")
    predict = predict_loss if law == "chinchilla" else predict_delta
    return np.array([predict(draw, *args) for draw in wide.to_dict("records")])


# ------------------------------------------------------------------------------------------------- run_fits

class FitTables(NamedTuple):
    """The outputs of :func:`run_fits` (schemas in the module docstring)."""

    params: pd.DataFrame
    predictions: pd.DataFrame
    comparison: pd.DataFrame
    bootstrap: pd.DataFrame


@dataclass
class _Assessment:
    """What one law of one precision adds to each output table."""

    params: list[dict]
    predictions: list[pd.DataFrame]
    comparison: dict
    bootstrap: pd.DataFrame


def _prediction_rows(law: Law, precision: str, fit: Fit, runs: pd.DataFrame, held_out: str) -> pd.DataFrame:
    observed = runs[law.columns[-1]].to_numpy(float)
    predicted = np.asarray(law.predict(fit, runs), dtype=float)
    return pd.DataFrame({
        "run_id": runs["run_id"].to_numpy(), "law": law.name, "precision": precision,
        "N": runs["N"].to_numpy(), "D": runs["D"].to_numpy(), "G": runs["G"].to_numpy(),
        "observed": observed, "predicted": predicted, "residual": predicted - observed,
        "rel_error": np.where(observed > 0, np.abs(predicted - observed) / np.where(observed > 0, observed, 1.0),
                              np.nan), "held_out": held_out,
    })


def _assess(law: Law, precision: str, runs: pd.DataFrame, n_boot: int, seed: int) -> _Assessment:
    """One law of one precision: fitted in-sample (with bootstrap), then refitted without the runs of the
    largest N, and without those of the largest D, to predict them. A law that cannot be fitted or is not
    identified leaves NaN rows and a warning."""
    ok = _valid(runs, law.columns)[1]
    comparison = {"law": law.name, "precision": precision, "rel_error": np.nan, "n_runs": int(ok.sum()),
                  "heldout_largest_N_rel_error": np.nan, "heldout_largest_D_rel_error": np.nan}
    try:
        fit = law.fit(runs, n_boot, seed)
    except FitError as exc:
        log.warning("%s law for %s not fitted: %s", law.name, precision, exc)
        names = law.constant_names(runs)
        fit = Fit(dict.fromkeys(names, np.nan), np.nan, int(ok.sum()), int((~ok).sum()))
        return _Assessment(_param_rows(law.name, precision, fit), [], comparison, _draw_rows(law.name, precision, fit))
    valid = runs[ok]
    preds = [_prediction_rows(law, precision, fit, valid, "none")]
    comparison["rel_error"] = float(preds[0]["rel_error"].mean())
    for held_out, col in HELD_OUT.items():
        values = pd.to_numeric(valid[col]).astype(float)
        largest = values.max()
        test = values == largest
        try:
            refit = law.fit(valid[~test], 0, seed, (col, largest))
        except FitError as exc:
            log.warning("%s law for %s: no %s prediction: %s", law.name, precision, held_out, exc)
            continue
        rows = _prediction_rows(law, precision, refit, valid[test], held_out)
        preds.append(rows)
        comparison[f"heldout_{held_out}_rel_error"] = float(rows["rel_error"].mean())
    return _Assessment(_param_rows(law.name, precision, fit), preds, comparison, _draw_rows(law.name, precision, fit))


def _param_rows(law: str, precision: str, fit: Fit) -> list[dict]:
    ci = fit.ci
    return [{"law": law, "precision": precision, "constant": name, "value": value,
             "ci_low": ci.get(name, (np.nan, np.nan))[0], "ci_high": ci.get(name, (np.nan, np.nan))[1],
             "n_runs": fit.n_runs, "n_dropped": fit.n_dropped, "objective": fit.objective}
            for name, value in fit.constants.items()]


def _draw_rows(law: str, precision: str, fit: Fit) -> pd.DataFrame:
    """The bootstrap refits of a law, one row per (draw, constant)."""
    if fit.draws.empty:
        return pd.DataFrame(columns=list(BOOTSTRAP_COLUMNS))
    long = fit.draws.reset_index(names="draw").melt(id_vars="draw", var_name="constant", value_name="value")
    return long.dropna(subset=["value"]).assign(law=law, precision=precision).loc[:, list(BOOTSTRAP_COLUMNS)]


def run_fits(deltas: pd.DataFrame, runs: pd.DataFrame, *, n_boot: int = 200, seed: int = 0,
             metric: str = config.schema_default("fit", "metric"),
             tie: bool = config.schema_default("fit", "tie")) -> FitTables:
    """Every law of the study: Chinchilla on the non-diverged BF16 runs of ``runs``, and for every precision of
    ``deltas`` (:func:`qatlaw.runtable.delta_table`) the unified, no_D and EPM laws, all on ``metric``: ``val_loss``
    (the validation loss and its δ, ``delta_val``) or ``loss`` (the smoothed training loss and ``delta``).
    Chinchilla's α and β are tied unless not ``tie``. Returns the tables of the module docstring; a law that
    cannot be fitted leaves NaN rows and a warning."""
    try:
        loss_col, delta_col = runtable.metric_columns(metric)
    except runtable.RunTableError as exc:
        raise FitError(f"run_fits: {exc}") from None
    for table, what, value in ((runs, "run table", loss_col), (deltas, "delta table", delta_col)):
        missing = [c for c in ("run_id", "precision", "N", "D", "G", value) if c not in table.columns]
        if missing:
            raise FitError(f"run_fits: {what} lacks columns {', '.join(missing)}")
    numerics = sorted(runs["numerics"].dropna().unique()) if "numerics" in runs.columns else []
    if len(numerics) > 1:
        raise FitError(f"run_fits: the run table mixes numerics {', '.join(numerics)}: a law is fitted to runs of one "
                       "numerics (training.numerics), so fit each apart")
    runs = runs.assign(loss=runs[loss_col])
    deltas = deltas.assign(delta=deltas[delta_col], **{BASE: deltas[f"baseline_{loss_col}"]})
    bf16 = runs[runs["precision"] == BASELINE]
    chinchilla = Chinchilla(tie=tie)
    parts = [_assess(chinchilla, BASELINE, bf16, n_boot, seed)]
    for precision in sorted(p for p in deltas["precision"].dropna().unique() if p != BASELINE):
        sub = deltas[deltas["precision"] == precision]
        for law in (DeltaLaw(use_D=True), DeltaLaw(use_D=False), EPM(bf16, chinchilla)):
            parts.append(_assess(law, precision, sub, n_boot, seed))
    params = pd.DataFrame([row for p in parts for row in p.params], columns=list(PARAMS_COLUMNS))
    preds = [frame for p in parts for frame in p.predictions]
    predictions = (pd.concat(preds, ignore_index=True) if preds
                   else pd.DataFrame(columns=list(PREDICTIONS_COLUMNS)))
    predictions["G"] = pd.to_numeric(predictions["G"]).astype("Int64")
    comparison = pd.DataFrame([p.comparison for p in parts], columns=list(COMPARISON_COLUMNS))
    draws = [p.bootstrap for p in parts if not p.bootstrap.empty]
    bootstrap = pd.concat(draws, ignore_index=True) if draws else pd.DataFrame(columns=list(BOOTSTRAP_COLUMNS))
    return FitTables(params, predictions.loc[:, list(PREDICTIONS_COLUMNS)], comparison,
                     bootstrap.astype({"draw": int, "value": float}))


def write_fits(tables: FitTables, out_dir: str | Path) -> None:
    """Write params, predictions, comparison and bootstrap as ``<out_dir>/<name>.parquet``, each atomically."""
    for name, table in tables._asdict().items():
        write_parquet(table, Path(out_dir) / f"{name}.parquet")


def read_params(path: str | Path) -> pd.DataFrame:
    """A params table (``params.parquet``), checked: FitError naming the file and ``PARAMS_COLUMNS`` when it is
    missing, unreadable (e.g. truncated) or lacks a column."""
    return read_parquet(path, PARAMS_COLUMNS, "params table", kinds={"value": "number"}, error=FitError)
