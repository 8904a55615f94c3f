"""Fit the scaling laws: Chinchilla on the BF16 runs, the unified QAT law per precision, and the baselines.

Laws (N non-embedding parameters, D training tokens, G the integer group length of the run table; for
``channel`` runs G is already the hidden size, so no special case is needed here):

- ``chinchilla``  L(N, D) = E + A/N^α + B/D^β on BF16 runs (α = β when ``tie_exponents``, as the paper).
- ``unified``     δ(N, D, G) = k · D^γD · (log2 G)^γG / N^γN, one law per precision (paper Eq. 5).
- ``no_D``        the unified law without the D^γD factor (paper Table 4).
- ``epm``         δ(N) = A/(N·eff)^α − A/N^α (paper Eq. 3, Table 2): A and α are the Chinchilla fit's, and
                  eff ∈ (0, 1] is the only free parameter, one per granularity (the "5 laws" of Table 2; the
                  run table's ``group`` label, so all ``channel`` runs share one eff whatever their G).

Every law is fitted to one metric (``run_fits(metric=...)``, config ``fit.metric``): ``val_loss``, the
validation loss and its δ (the default: at CPU scale the smoothed training loss of a short run is far noisier),
or ``loss``, the smoothed training loss (the paper's).

Every law is fitted the Chinchilla way: the Huber loss (δ_H = 1e-3) of the log-space residuals
log(predicted) − log(observed), summed over runs, minimized with L-BFGS-B and the analytic gradient, keeping
the best of several starts. The Chinchilla law is non-convex (α, β ≥ 0 are its only bounds) and starts from
a quasi-random (Halton) grid of ``inits`` points; the δ laws are linear in (log k, γ) in log space, hence convex, and start from ordinary
least squares on log δ (plus ``inits`` − 1 points around it). Signs of the γ are not constrained, so a
wrong-signed exponent shows that the data disagree with the law. Runs that diverged, or whose value (loss or
δ) is NaN or ≤ 0, cannot enter a log: they are dropped with a warning and counted (``n_dropped``).

Bootstrap intervals resample the runs with replacement (seeded) and refit each resample, from the full-data
optimum (δ laws), or from the best distinct local optima of the full-data fit (Chinchilla, whose E, A and α
trade off along a flat valley on small grids); resamples that cannot identify every constant (e.g. a single
G) are skipped with a warning, and when fewer than half of them can be fitted no interval is reported (NaN).
EPM intervals hold A and α at their point estimates.

Outputs of :func:`run_fits` (``results/fit/``, written by :func:`write_fits`):

``params.parquet``, one row per fitted constant:

| column | meaning |
|---|---|
| ``law`` | ``chinchilla``, ``unified``, ``no_D`` or ``epm`` |
| ``precision`` | ``BF16`` for chinchilla, else the QAT precision string |
| ``constant`` | ``A B E alpha beta`` (chinchilla), ``k gamma_N gamma_D gamma_G`` (unified, no_D; γD = 0 there), ``eff_G<group>`` (epm: ``eff_G32``, ``eff_Gchannel``) |
| ``value`` | the fitted value; NaN when the law could not be fitted (too few valid runs: a warning is logged) |
| ``ci_low``, ``ci_high`` | 5th and 95th bootstrap percentiles (NaN without bootstrap, and for γD of no_D) |
| ``n_runs`` | runs the fit used (epm: over all its granularities) |
| ``n_dropped`` | runs dropped as diverged or with NaN or non-positive values |
| ``objective`` | summed Huber loss at the optimum (epm: summed over its granularities) |

``predictions.parquet``, one row per run a law used (dropped runs have none) and law: ``run_id``, ``law``, ``precision``, ``N``, ``D``,
``G`` (null for chinchilla), ``observed`` (loss for chinchilla, else δ), ``predicted``, ``residual``
(predicted − observed), ``rel_error`` (|residual| / observed), ``held_out`` (``none``: in-sample fit;
``largest_N`` / ``largest_D``: the run has the fit's largest N / D and the prediction comes from a refit
without those runs; for epm the held-out refit also refits A and α without them).

``bootstrap.parquet``, the bootstrap refits behind the intervals, one row per (law, precision, draw, constant):
``law``, ``precision``, ``draw`` (resample number; resamples that could not be fitted are absent), ``constant``,
``value``. A law's draws give its prediction bands (evaluate the law at each draw, take percentiles).

``comparison.parquet``, one row per law and precision: ``law``, ``precision``, ``rel_error`` (mean in-sample
|δ̂ − δ| / δ, or loss for chinchilla), ``n_runs``, ``heldout_largest_N_rel_error``,
``heldout_largest_D_rel_error`` (NaN where the refit is not possible).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.stats import qmc
from threadpoolctl import threadpool_limits

from qatlaw.errors import QatlawError
from qatlaw.io import read_parquet, write_parquet
from qatlaw.precision import BASELINE

log = logging.getLogger("qatlaw.fit")

HUBER_DELTA = 1e-3
CHINCHILLA_INITS = 128
DELTA_INITS = 16
# Start box of the Chinchilla parameters (a, b, e) = log(A, B, E) and the exponents (α, β).
CHINCHILLA_BOX = np.array([[0.0, 25.0], [0.0, 25.0], [-1.0, 1.5], [0.0, 2.0], [0.0, 2.0]])
# Half-widths of the start box around the least-squares solution: log k, then every exponent.
DELTA_SPREAD = (2.0, 0.5)
LBFGS_OPTIONS = {"maxiter": 1000}
# From DESCENT_MIN_STARTS starts on, _best_of first descends from all starts at once (one vectorized objective
# call per step for every start still moving) and then polishes only the best POLISH_STARTS distinct end points
# with L-BFGS-B; the descent stops where L-BFGS-B's default tolerances would (projected gradient, relative
# decrease). Fits with fewer starts (the defaults: 128 Chinchilla and 16 δ starts, bootstrap refits from at most
# BOOT_STARTS optima) run L-BFGS-B from every start, so their results do not depend on the descent.
DESCENT_MIN_STARTS = 256
POLISH_STARTS = 16
DESCENT_MAXITER = 1000
DESCENT_PGTOL = 1e-5
DESCENT_FTOL = 2.220446049250313e-09
DESCENT_BACKTRACKS = 40
ARMIJO_C1 = 1e-4
BOOT_STARTS = 4
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


# ---------------------------------------------------------------------------------------------- objectives

def _huber(r: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber loss of residuals r in units of delta² (so L-BFGS-B's tolerances see O(1) values), and its
    derivative per residual."""
    z = r / delta
    c = np.clip(z, -1.0, 1.0)
    return float(c @ (z - 0.5 * c)), c / delta


def _chinchilla_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                          tie: bool, huber_delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of log L̂ − log L, log L̂ = LSE(a − α log N, b − β log D, e), and its gradient."""
    a, b, e, alpha = theta[:4]
    beta = alpha if tie else theta[4]
    u1, u2 = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(u1, u2), e)
    t1, t2, t3 = np.exp(u1 - top), np.exp(u2 - top), np.exp(e - top)
    total = t1 + t2 + t3
    loss, psi = _huber(top + np.log(total) - log_l, huber_delta)
    q = psi / total
    p1, p2 = q * t1, q * t2
    g_alpha, g_beta = -(p1 @ log_n), -(p2 @ log_d)
    grad = [p1.sum(), p2.sum(), q @ t3] + ([g_alpha + g_beta] if tie else [g_alpha, g_beta])
    return loss, np.array(grad)


def _loglinear_objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray,
                         huber_delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of the log-space residuals x·θ − y of a law linear in its log parameters, and its gradient."""
    loss, psi = _huber(x @ theta - y, huber_delta)
    return loss, x.T @ psi


def _huber_rows(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_huber` of every row of r (one row per parameter vector): the row sums and the derivatives."""
    z = r / delta
    c = np.clip(z, -1.0, 1.0)
    return np.einsum("ij,ij->i", c, z - 0.5 * c), c / delta


def _chinchilla_objective_rows(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                               tie: bool, huber_delta: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_chinchilla_objective` of every row of theta (starts × parameters) in one pass: (S,) losses and
    (S, p) gradients."""
    a, b, e, alpha = (theta[:, i:i + 1] for i in range(4))
    beta = alpha if tie else theta[:, 4:5]
    u1, u2 = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(u1, u2), e)
    t1, t2, t3 = np.exp(u1 - top), np.exp(u2 - top), np.exp(e - top)
    total = t1 + t2 + t3
    loss, psi = _huber_rows(top + np.log(total) - log_l, huber_delta)
    q = psi / total
    p1, p2 = q * t1, q * t2
    g_alpha, g_beta = -(p1 @ log_n), -(p2 @ log_d)
    grad = [p1.sum(1), p2.sum(1), np.einsum("ij,ij->i", q, t3)] + ([g_alpha + g_beta] if tie else [g_alpha, g_beta])
    return loss, np.column_stack(grad)


def _loglinear_objective_rows(theta: np.ndarray, x: np.ndarray, y: np.ndarray,
                              huber_delta: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_loglinear_objective` of every row of theta in one pass."""
    loss, psi = _huber_rows(theta @ x.T - y, huber_delta)
    return loss, psi @ x


# The per-start objectives and their vectorized forms (same value and gradient, rows of parameters)
_ROWS = {_chinchilla_objective: _chinchilla_objective_rows, _loglinear_objective: _loglinear_objective_rows}


def _descend(objective_rows: Callable, starts: np.ndarray, args: tuple,
             lower: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projected BFGS with Armijo backtracking from every start at once, each step one call of the vectorized
    objective for the starts still moving. Returns the end points' objectives (inf where a start never had a
    finite one) and parameters. Variables at their lower bound whose gradient points outwards stay fixed for the
    step; a start stops at L-BFGS-B's default tolerances or when backtracking finds no decrease."""
    x = np.maximum(np.array(starts, dtype=float), lower)
    n_starts, p = x.shape
    f, g = objective_rows(x, *args)
    f = np.where(np.isfinite(f) & np.isfinite(g).all(1), f, np.inf)
    moving = np.isfinite(f)
    inv_h = np.tile(np.eye(p), (n_starts, 1, 1))
    first = np.ones(n_starts, dtype=bool)
    for _ in range(DESCENT_MAXITER):
        fixed = (x <= lower) & (g > 0)
        moving &= np.abs(np.where(fixed, 0.0, g)).max(1) > DESCENT_PGTOL
        idx = np.flatnonzero(moving)
        if not idx.size:
            break
        xa, fa, ga, ha, fx = x[idx], f[idx], g[idx], inv_h[idx], fixed[idx]
        gf = np.where(fx, 0.0, ga)
        d = np.where(fx, 0.0, -np.einsum("sij,sj->si", ha, gf))
        reset = ~((d * ga).sum(1) < 0)  # not a descent direction: steepest descent, forget the curvature
        d[reset], ha[reset] = -gf[reset], np.eye(p)
        step = np.where(first[idx], np.minimum(1.0, 1.0 / np.linalg.norm(gf, axis=1)), 1.0)
        xn, fn, gn = xa.copy(), fa.copy(), ga.copy()
        todo = np.arange(len(idx))
        for _ in range(DESCENT_BACKTRACKS):
            cand = np.maximum(xa[todo] + step[todo, None] * d[todo], lower)
            fc, gc = objective_rows(cand, *args)
            ok = np.isfinite(fc) & np.isfinite(gc).all(1)
            ok &= fc <= fa[todo] + ARMIJO_C1 * ((cand - xa[todo]) * ga[todo]).sum(1)
            done = todo[ok]
            xn[done], fn[done], gn[done] = cand[ok], fc[ok], gc[ok]
            todo = todo[~ok]
            if not todo.size:
                break
            step[todo] *= 0.5
        stuck = np.zeros(len(idx), dtype=bool)
        stuck[todo] = True
        s, yv = xn - xa, gn - ga
        sy = (s * yv).sum(1)
        update = ~stuck & (sy > 1e-10 * np.linalg.norm(s, axis=1) * np.linalg.norm(yv, axis=1))
        if update.any():
            s_u, y_u, h_u = s[update], yv[update], ha[update]
            rho = 1.0 / sy[update]
            scale = np.where(first[idx][update], sy[update] / (y_u * y_u).sum(1), 1.0)
            h_u = h_u * scale[:, None, None]
            v = np.eye(p) - rho[:, None, None] * s_u[:, :, None] * y_u[:, None, :]
            ha[update] = v @ h_u @ v.transpose(0, 2, 1) + rho[:, None, None] * s_u[:, :, None] * s_u[:, None, :]
        flat = (fa - fn) <= DESCENT_FTOL * np.maximum(np.maximum(np.abs(fa), np.abs(fn)), 1.0)
        x[idx], f[idx], g[idx], inv_h[idx] = xn, fn, gn, ha
        first[idx] = False
        moving[idx[stuck | flat]] = False
    return f, x


def _best_of(objective: Callable, starts: np.ndarray, args: tuple, huber_delta: float,
             bounds: list | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """L-BFGS-B from every start: the best parameters, their summed Huber loss, and the best local optima with
    distinct objectives (at most BOOT_STARTS, best first), from which bootstrap refits start.

    From DESCENT_MIN_STARTS starts on, all of them first descend together (:func:`_descend`, vectorized over
    the starts) and L-BFGS-B then polishes the best POLISH_STARTS end points with distinct objectives: 1000
    starts then take seconds instead of tens of seconds, and reach the same best optimum."""
    starts = np.atleast_2d(np.asarray(starts, dtype=float))
    ends = []
    # L-BFGS-B makes many tiny BLAS calls; waking BLAS threads for each makes a fit 10-30x slower on a busy machine
    with threadpool_limits(limits=1, user_api="blas"):
        lower = _lower_bounds(bounds, starts.shape[1])
        if len(starts) >= DESCENT_MIN_STARTS and objective in _ROWS and lower is not None:
            f, x = _descend(_ROWS[objective], starts, args, lower)
            picked: dict[str, np.ndarray] = {}
            for i in np.argsort(f, kind="stable"):
                if not np.isfinite(f[i]) or len(picked) == POLISH_STARTS:
                    break
                picked.setdefault(f"{f[i]:.6g}", x[i])
            starts = np.array(list(picked.values())) if picked else starts[:0]
        for x0 in starts:
            res = minimize(objective, x0, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                           options=LBFGS_OPTIONS)
            if np.isfinite(res.fun):
                ends.append((float(res.fun), res.x))
    if not ends:
        raise FitError("no start reached a finite objective")
    ends.sort(key=lambda end: end[0])
    optima: dict[str, np.ndarray] = {}
    for f, x in ends:
        optima.setdefault(f"{f:.6g}", x)
        if len(optima) == BOOT_STARTS:
            break
    return ends[0][1], ends[0][0] * huber_delta**2, np.array(list(optima.values()))


def _lower_bounds(bounds: list | None, n_params: int) -> np.ndarray | None:
    """Lower bounds as an array (-inf where free) for :func:`_descend`; None if some variable has an upper
    bound, which the vectorized descent does not handle."""
    if bounds is None:
        return np.full(n_params, -np.inf)
    if any(high is not None for _, high in bounds):
        return None
    return np.array([-np.inf if low is None else float(low) for low, _ in bounds])


def _halton(n: int, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """n deterministic quasi-random points in the box [low, high]."""
    if n < 1:
        raise FitError(f"inits must be at least 1, got {n}")
    return low + (high - low) * qmc.Halton(len(low), scramble=False).random(n)


# ------------------------------------------------------------------------------------------------- inputs

def _numeric(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> tuple[pd.DataFrame, pd.Series]:
    """The columns as floats (original index) and which runs a log-space fit can use."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FitError(f"{what}: run table lacks columns {', '.join(missing)}")
    data = pd.DataFrame({c: pd.to_numeric(df[c], errors="coerce").astype(float) for c in columns}, index=df.index)
    ok = np.isfinite(data).all(axis=1) & (data > 0).all(axis=1)
    if "G" in columns:
        ok &= data["G"] >= 2
    if "diverged" in df.columns:
        ok &= ~df["diverged"].fillna(False).astype(bool)
    return data, ok


def _label(df: pd.DataFrame, what: str) -> str:
    """Name of a fit for messages: the function, and the precision when the runs share one."""
    if "precision" in df.columns and df["precision"].nunique() == 1:
        return f"{what} ({df['precision'].iloc[0]})"
    return what


def _usable(df: pd.DataFrame, value: str, columns: tuple[str, ...], what: str,
            n_params: int) -> tuple[pd.DataFrame, int]:
    """The runs a log-space fit can use and how many were dropped; too few for n_params is an error."""
    data, ok = _numeric(df, columns, what)
    n_ok, n_dropped = int(ok.sum()), int((~ok).sum())
    if n_dropped:
        log.warning("%s: dropped %d of %d runs (diverged, or NaN or non-positive %s or %s)", what, n_dropped,
                    len(df), ", ".join(columns[:-1]), columns[-1])
    if n_ok < n_params:
        dropped = f" ({n_dropped} of {len(df)} diverged or have NaN or non-positive {value})" if n_dropped else ""
        raise FitError(f"{what}: {n_ok} usable runs for {n_params} parameter{'s' * (n_params > 1)}{dropped}")
    return data[ok], n_dropped


def _bootstrap(refit: Callable[[np.ndarray], dict | None], n: int, names: tuple[str, ...], n_boot: int,
               seed: int, what: str) -> tuple[dict[str, tuple[float, float]], pd.DataFrame]:
    """5th/95th percentiles of every constant over n_boot refits on resampled runs (refit gives None for a
    resample that cannot identify every constant), and the refits themselves (one row per usable resample, one
    column per constant); NaN intervals and no draws when fewer than MIN_BOOT_SHARE of them could be fitted,
    since the usable resamples would then be a biased few."""
    rng = np.random.default_rng(seed)
    samples = [s for s in (refit(rng.integers(0, n, n)) for _ in range(n_boot)) if s is not None]
    if len(samples) < n_boot:
        log.warning("%s: %d of %d bootstrap resamples could not identify every constant and were skipped",
                    what, n_boot - len(samples), n_boot)
    if len(samples) < MIN_BOOT_SHARE * n_boot:
        log.warning("%s: no intervals: only %d of %d resamples could be fitted (too few runs for the constants)",
                    what, len(samples), n_boot)
        return {name: (np.nan, np.nan) for name in names}, pd.DataFrame(columns=list(names), dtype=float)
    table = pd.DataFrame(samples, columns=list(names))
    low, high = (table.quantile(q) for q in BOOT_QUANTILES)
    return {name: (float(low[name]), float(high[name])) for name in names}, table


# ------------------------------------------------------------------------------------------------- chinchilla

def _chinchilla_constants(theta: np.ndarray, tie: bool) -> dict[str, float]:
    a, b, e, alpha = (float(t) for t in theta[:4])
    beta = alpha if tie else float(theta[4])
    return {"A": float(np.exp(a)), "B": float(np.exp(b)), "E": float(np.exp(e)), "alpha": alpha, "beta": beta}


def fit_chinchilla(df: pd.DataFrame, tie_exponents: bool = True, *, n_boot: int = 0, seed: int = 0,
                   huber_delta: float = HUBER_DELTA, inits: int | np.ndarray | None = None) -> dict:
    """Fit L = E + A/N^α + B/D^β to columns N, D, loss. ``inits``: number of grid starts, or an array of
    starts (a, b, e, α[, β]) with a, b, e the logs of A, B, E. Returns A, B, E, alpha, beta, objective,
    n_runs, n_dropped and, with ``n_boot``, ``ci`` = {constant: (low, high)}."""
    n_params, what = (4 if tie_exponents else 5), _label(df, "fit_chinchilla")
    data, n_dropped = _usable(df, "loss", ("N", "D", "loss"), what, n_params)
    for col in ("N", "D"):
        if data[col].nunique() < 2:
            raise FitError(f"{what}: column {col} takes a single value among the valid runs")
    logs = tuple(np.log(data[c].to_numpy()) for c in ("N", "D", "loss"))
    if inits is None or np.ndim(inits) == 0:
        box = CHINCHILLA_BOX[:n_params]
        starts = _halton(CHINCHILLA_INITS if inits is None else int(inits), box[:, 0], box[:, 1])
    else:
        starts = np.atleast_2d(np.asarray(inits, dtype=float))
    bounds = [(None, None)] * 3 + [(0.0, None)] * (n_params - 3)
    theta, objective, optima = _best_of(_chinchilla_objective, starts, (*logs, tie_exponents, huber_delta),
                                        huber_delta, bounds)
    out = _chinchilla_constants(theta, tie_exponents) | {
        "objective": objective, "n_runs": len(data), "n_dropped": n_dropped}
    if n_boot:
        def refit(idx: np.ndarray) -> dict | None:
            if len(np.unique(idx)) < n_params or min(len(np.unique(lg[idx])) for lg in logs[:2]) < 2:
                return None
            args = (*(lg[idx] for lg in logs), tie_exponents, huber_delta)
            best = _best_of(_chinchilla_objective, optima, args, huber_delta, bounds)[0]
            return _chinchilla_constants(best, tie_exponents)
        out["ci"], out["draws"] = _bootstrap(refit, len(data), CHINCHILLA_CONSTANTS, n_boot, seed, what)
    return out


def predict_loss(chin_params: dict, N: ArrayLike, D: ArrayLike) -> np.ndarray | float:
    """BF16 loss E + A/N^α + B/D^β."""
    p = chin_params
    return p["E"] + p["A"] / np.power(N, p["alpha"]) + p["B"] / np.power(D, p["beta"])


# ------------------------------------------------------------------------------------------------- δ laws

def _delta_design(data: pd.DataFrame, use_D: bool) -> np.ndarray:
    """Columns of log δ̂ = log k − γN log N [+ γD log D] + γG log log2 G."""
    cols = [np.ones(len(data)), -np.log(data["N"].to_numpy())]
    if use_D:
        cols.append(np.log(data["D"].to_numpy()))
    cols.append(np.log(np.log2(data["G"].to_numpy())))
    return np.column_stack(cols)


def _fit_loglinear(x: np.ndarray, y: np.ndarray, huber_delta: float, inits: int) -> tuple[np.ndarray, float]:
    """Huber fit of y ≈ x·θ from least squares plus inits − 1 starts around it."""
    theta0 = np.linalg.lstsq(x, y, rcond=None)[0]
    spread = np.array([DELTA_SPREAD[0]] + [DELTA_SPREAD[1]] * (len(theta0) - 1))
    starts = np.vstack([theta0, _halton(inits, theta0 - spread, theta0 + spread)[1:]]) if inits > 1 else [theta0]
    return _best_of(_loglinear_objective, starts, (x, y, huber_delta), huber_delta)[:2]


def _delta_constants(theta: np.ndarray, use_D: bool) -> dict[str, float]:
    theta = [float(t) for t in theta]
    gamma_D = theta.pop(2) if use_D else 0.0
    return {"k": float(np.exp(theta[0])), "gamma_N": theta[1], "gamma_D": gamma_D, "gamma_G": theta[2]}


def fit_delta(df: pd.DataFrame, *, use_D: bool = True, n_boot: int = 0, seed: int = 0,
              huber_delta: float = HUBER_DELTA, inits: int = DELTA_INITS) -> dict:
    """Fit δ = k·D^γD·(log2 G)^γG/N^γN to columns N, D, G, delta (γD fixed at 0 unless ``use_D``).
    Returns k, gamma_N, gamma_D, gamma_G, objective, n_runs, n_dropped and, with ``n_boot``, ``ci``."""
    names = DELTA_CONSTANTS if use_D else tuple(c for c in DELTA_CONSTANTS if c != "gamma_D")
    what = _label(df, "fit_delta")
    data, n_dropped = _usable(df, "delta", ("N", "D", "G", "delta"), what, len(names))
    x, y = _delta_design(data, use_D), np.log(data["delta"].to_numpy())
    if np.linalg.matrix_rank(x) < x.shape[1]:
        single = [c for c in ("N", "D", "G") if (use_D or c != "D") and data[c].nunique() < 2]
        why = f"column {', '.join(single)} takes a single value" if single else "N, D and G are collinear"
        raise FitError(f"{what}: cannot identify every exponent: {why} among the valid runs")
    theta, objective = _fit_loglinear(x, y, huber_delta, inits)
    out = _delta_constants(theta, use_D) | {"objective": objective, "n_runs": len(data), "n_dropped": n_dropped}
    if n_boot:
        def refit(idx: np.ndarray) -> dict | None:
            if np.linalg.matrix_rank(x[idx]) < x.shape[1]:
                return None
            best = _best_of(_loglinear_objective, [theta], (x[idx], y[idx], huber_delta), huber_delta)[0]
            return _delta_constants(best, use_D)
        out["ci"], out["draws"] = _bootstrap(refit, len(data), names, n_boot, seed, what)
    return out


def predict_delta(params: dict, N: ArrayLike, D: ArrayLike, G: ArrayLike) -> np.ndarray | float:
    """δ = k · D^γD · (log2 G)^γG / N^γN."""
    p = params
    return p["k"] * np.power(D, p["gamma_D"]) * np.power(np.log2(G), p["gamma_G"]) / np.power(N, p["gamma_N"])


def draw_predictions(draws: pd.DataFrame, law: str, precision: str, *args: ArrayLike) -> np.ndarray | None:
    """A law's prediction at every one of its bootstrap draws (one row per draw), or None without draws:
    ``unified`` laws take (N, D, G), ``chinchilla`` (N, D)."""
    rows = draws[(draws["law"] == law) & (draws["precision"] == precision)]
    if rows.empty:
        return None
    wide = rows.pivot(index="draw", columns="constant", values="value")
    predict = predict_loss if law == "chinchilla" else predict_delta
    return np.array([predict(draw, *args) for draw in wide.to_dict("records")])


# ------------------------------------------------------------------------------------------------- EPM

def _epm_labels(df: pd.DataFrame, G: pd.Series) -> pd.Series:
    """The granularity each run belongs to: the run table's ``group`` label where present, else G."""
    if "group" in df.columns:
        return df.loc[G.index, "group"].astype(str)
    return G.astype(int).astype(str)


def _epm_fits(df: pd.DataFrame, chin_params: dict, *, n_boot: int = 0, seed: int = 0,
              huber_delta: float = HUBER_DELTA) -> tuple[dict[str, dict], int]:
    """Per granularity: eff, objective, n_runs (and ci with n_boot) of the EPM law; and the dropped runs."""
    alpha, log_a, what = chin_params["alpha"], np.log(chin_params["A"]), _label(df, "fit_epm")
    if not alpha > 0:
        raise FitError(f"{what}: the Chinchilla exponent alpha must be positive, got {alpha}")
    data, n_dropped = _usable(df, "delta", ("N", "G", "delta"), what, 1)
    fits = {}
    for label, grp in data.groupby(_epm_labels(df, data["G"]), sort=False):
        # log δ = log A − α log N + c, with c = log(eff^−α − 1)
        y = np.log(grp["delta"].to_numpy()) + alpha * np.log(grp["N"].to_numpy()) - log_a
        x = np.ones((len(y), 1))
        theta, objective = _fit_loglinear(x, y, huber_delta, 1)
        result = {"eff": _eff(theta[0], alpha), "objective": objective, "n_runs": len(y)}
        if n_boot:
            def refit(idx: np.ndarray, x=x, y=y, theta=theta) -> dict:
                c = _best_of(_loglinear_objective, [theta], (x[idx], y[idx], huber_delta), huber_delta)[0][0]
                return {"eff": _eff(c, alpha)}
            result["ci"] = _bootstrap(refit, len(y), ("eff",), n_boot, seed, f"{what} G {label}")[0]["eff"]
        fits[label] = result
    return fits, n_dropped


def _eff(c: float, alpha: float) -> float:
    """eff from c = log(eff^−α − 1)."""
    return float((1.0 + np.exp(c)) ** (-1.0 / alpha))


def fit_epm(df: pd.DataFrame, chin_params: dict) -> dict[str, float]:
    """The EPM baseline: per granularity, the eff ∈ (0, 1] of δ(N) = A/(N·eff)^α − A/N^α with A and α from
    the Chinchilla fit. Keyed by the ``group`` label ('32', 'channel') when the table has one, else by G."""
    return {g: fit["eff"] for g, fit in _epm_fits(df, chin_params)[0].items()}


def epm_delta(chin_params: dict, eff: ArrayLike, N: ArrayLike) -> np.ndarray | float:
    """δ implied by an effective parameter multiplier: A/(N·eff)^α − A/N^α."""
    a, alpha = chin_params["A"], chin_params["alpha"]
    return a * np.power(N, -alpha) * (eff ** -alpha - 1.0)


def epm(N: ArrayLike, D: ArrayLike, G: ArrayLike, delta_params: dict, chinchilla_params: dict) -> np.ndarray | float:
    """Effective parameter multiplier implied by the unified law (paper App. H): (A / (A + δ·N^α))^(1/α)."""
    a, alpha = chinchilla_params["A"], chinchilla_params["alpha"]
    return np.power(a / (a + predict_delta(delta_params, N, D, G) * np.power(N, alpha)), 1.0 / alpha)


def relative_error(pred: ArrayLike, obs: ArrayLike) -> float:
    """Mean of |pred − obs| / obs."""
    pred, obs = np.asarray(pred, dtype=float), np.asarray(obs, dtype=float)
    return float(np.mean(np.abs(pred - obs) / obs)) if obs.size else float("nan")


# ------------------------------------------------------------------------------------------------- run_fits

def _record(fit: dict, names: tuple[str, ...]) -> dict:
    """The parts of a fitter's result that the output tables need."""
    return {"values": {c: fit[c] for c in names}, "ci": fit.get("ci", {}), "n_runs": fit["n_runs"],
            "n_dropped": fit["n_dropped"], "objective": fit["objective"],
            "draws": fit.get("draws", pd.DataFrame(columns=list(names), dtype=float))}


def _draw_rows(law: str, precision: str, rec: dict) -> pd.DataFrame:
    """The bootstrap refits of a law, one row per (draw, constant)."""
    draws = rec.get("draws")
    if draws is None or draws.empty:
        return pd.DataFrame(columns=list(BOOTSTRAP_COLUMNS))
    long = draws.reset_index(names="draw").melt(id_vars="draw", var_name="constant", value_name="value")
    return long.assign(law=law, precision=precision).loc[:, list(BOOTSTRAP_COLUMNS)]


def _param_rows(law: str, precision: str, rec: dict) -> list[dict]:
    nan2 = (np.nan, np.nan)
    return [{"law": law, "precision": precision, "constant": name, "value": value,
             "ci_low": rec["ci"].get(name, nan2)[0], "ci_high": rec["ci"].get(name, nan2)[1],
             "n_runs": rec["n_runs"], "n_dropped": rec["n_dropped"], "objective": rec["objective"]}
            for name, value in rec["values"].items()]


def _prediction_rows(law: str, precision: str, runs: pd.DataFrame, predicted: np.ndarray,
                     held_out: str) -> pd.DataFrame:
    observed = runs["observed"].to_numpy(float)
    predicted = np.asarray(predicted, dtype=float)
    return pd.DataFrame({
        "run_id": runs["run_id"].to_numpy(), "law": law, "precision": precision,
        "N": runs["N"].to_numpy(), "D": runs["D"].to_numpy(), "G": runs["G"].to_numpy(),
        "observed": observed, "predicted": predicted, "residual": predicted - observed,
        "rel_error": np.abs(predicted - observed) / observed, "held_out": held_out,
    })


Fitter = Callable[[pd.DataFrame, int, tuple[str, float] | None], dict]
Predictor = Callable[[dict, pd.DataFrame], np.ndarray]


def _assess(law: str, precision: str, runs: pd.DataFrame, columns: tuple[str, ...], fit: Fitter,
            predict: Predictor, constants: tuple[str, ...], n_boot: int) -> tuple[list[dict], list, dict,
                                                                                  pd.DataFrame]:
    """Params rows, prediction frames, comparison row and bootstrap draws of one law: fitted in-sample (with
    bootstrap), then
    refitted without the runs of the largest N, and without those of the largest D, to predict them.
    ``fit(runs, n_boot, held_out)`` gets held_out = (column, value) of the runs left out, or None."""
    data, ok = _numeric(runs, columns, f"{law} {precision}")
    comparison = {"law": law, "precision": precision, "rel_error": np.nan, "n_runs": int(ok.sum()),
                  "heldout_largest_N_rel_error": np.nan, "heldout_largest_D_rel_error": np.nan}
    try:
        rec = fit(runs, n_boot, None)
    except FitError as exc:
        log.warning("%s law for %s not fitted: %s", law, precision, exc)
        skipped = {"values": dict.fromkeys(constants, np.nan), "ci": {}, "n_runs": int(ok.sum()),
                   "n_dropped": int((~ok).sum()), "objective": np.nan}
        return _param_rows(law, precision, skipped), [], comparison, _draw_rows(law, precision, skipped)
    valid = runs[ok].assign(observed=data.loc[ok, columns[-1]])
    preds = [_prediction_rows(law, precision, valid, predict(rec, valid), "none")]
    comparison["rel_error"] = float(preds[0]["rel_error"].mean())
    for held_out, col in HELD_OUT.items():
        largest = valid[col].max()
        test = valid[col] == largest
        try:
            refit = fit(valid[~test], 0, (col, largest))
        except FitError as exc:
            log.warning("%s law for %s: no %s prediction: %s", law, precision, held_out, exc)
            continue
        rows = _prediction_rows(law, precision, valid[test], predict(refit, valid[test]), held_out)
        preds.append(rows)
        comparison[f"heldout_{held_out}_rel_error"] = float(rows["rel_error"].mean())
    return _param_rows(law, precision, rec), preds, comparison, _draw_rows(law, precision, rec)


def _table(rows: list, columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns))


def _require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FitError(f"run_fits: {what} lacks columns {', '.join(missing)}")


class FitTables(NamedTuple):
    """The outputs of :func:`run_fits` (schemas in the module docstring)."""

    params: pd.DataFrame
    predictions: pd.DataFrame
    comparison: pd.DataFrame
    bootstrap: pd.DataFrame


# metric -> (loss column of the run table, δ column of the delta table) that the laws are fitted to
METRIC_COLUMNS = {"val_loss": ("val_loss", "delta_val"), "loss": ("loss", "delta")}


def run_fits(deltas: pd.DataFrame, runs: pd.DataFrame, *, n_boot: int = 200, seed: int = 0,
             metric: str = "val_loss") -> FitTables:
    """Every law of the study: Chinchilla on the non-diverged BF16 runs of ``runs``, and for every precision of
    ``deltas`` (:func:`qatlaw.decompose.delta_table`) the unified, no_D and EPM laws, all on ``metric``:
    ``val_loss`` (the validation loss and its δ, ``delta_val``) or ``loss`` (the smoothed training loss and
    ``delta``). Returns the params, predictions and comparison tables of the module docstring; a law that
    cannot be fitted leaves NaN rows and a warning."""
    if metric not in METRIC_COLUMNS:
        raise FitError(f"run_fits: metric must be one of {', '.join(METRIC_COLUMNS)}, got {metric!r}")
    loss_col, delta_col = METRIC_COLUMNS[metric]
    _require(runs, ("run_id", "precision", "N", "D", "G", loss_col), "run table")
    _require(deltas, ("run_id", "precision", "N", "D", "G", delta_col), "delta table")
    runs, deltas = runs.assign(loss=runs[loss_col]), deltas.assign(delta=deltas[delta_col])
    bf16 = runs[runs["precision"] == BASELINE]
    chin_fits: dict[tuple, dict | FitError] = {}

    def chinchilla(train: pd.DataFrame, boot: int) -> dict:
        """fit_chinchilla, once per set of runs (the EPM laws of every precision reuse it)."""
        key = (tuple(train.index), boot)
        if key not in chin_fits:
            try:
                chin_fits[key] = fit_chinchilla(train, n_boot=boot, seed=seed)
            except FitError as exc:
                chin_fits[key] = exc
        if isinstance(chin_fits[key], FitError):
            raise chin_fits[key]
        return chin_fits[key]

    def fit_chin(train: pd.DataFrame, boot: int, held_out: tuple | None) -> dict:
        return _record(chinchilla(train, boot), CHINCHILLA_CONSTANTS)

    def predict_chin(rec: dict, r: pd.DataFrame) -> np.ndarray:
        return predict_loss(rec["values"], r["N"].to_numpy(float), r["D"].to_numpy(float))

    def delta_fitter(use_D: bool) -> Fitter:
        def fit(train: pd.DataFrame, boot: int, held_out: tuple | None) -> dict:
            return _record(fit_delta(train, use_D=use_D, n_boot=boot, seed=seed), DELTA_CONSTANTS)
        return fit

    def predict_law(rec: dict, r: pd.DataFrame) -> np.ndarray:
        return predict_delta(rec["values"], r["N"].to_numpy(float), r["D"].to_numpy(float), r["G"].to_numpy(float))

    def fit_epm_law(train: pd.DataFrame, boot: int, held_out: tuple | None) -> dict:
        # A and α from the BF16 fit; with runs held out, from a refit without the BF16 runs of their N or D
        base = bf16 if held_out is None else bf16[pd.to_numeric(bf16[held_out[0]]) < held_out[1]]
        chin = chinchilla(base, n_boot if held_out is None else 0)
        fits, n_dropped = _epm_fits(train, chin, n_boot=boot, seed=seed)
        return {"values": {f"eff_G{g}": f["eff"] for g, f in fits.items()},
                "ci": {f"eff_G{g}": f.get("ci", (np.nan, np.nan)) for g, f in fits.items()},
                "n_runs": sum(f["n_runs"] for f in fits.values()), "n_dropped": n_dropped,
                "objective": sum(f["objective"] for f in fits.values()),
                "eff": {g: f["eff"] for g, f in fits.items()}, "chin": chin}

    def predict_epm(rec: dict, r: pd.DataFrame) -> np.ndarray:
        eff = _epm_labels(r, pd.to_numeric(r["G"]).astype(float)).map(rec["eff"]).to_numpy(float)
        return epm_delta(rec["chin"], eff, r["N"].to_numpy(float))

    params, preds, comp, draws = _assess("chinchilla", BASELINE, bf16, ("N", "D", "loss"), fit_chin, predict_chin,
                                         CHINCHILLA_CONSTANTS, n_boot)
    comparison, boot = [comp], [draws]
    for precision in sorted(p for p in deltas["precision"].dropna().unique() if p != BASELINE):
        sub = deltas[deltas["precision"] == precision]
        granularities = sorted(set(_epm_labels(sub, pd.to_numeric(sub["G"], errors="coerce").dropna())))
        laws = (("unified", ("N", "D", "G", "delta"), delta_fitter(True), predict_law, DELTA_CONSTANTS),
                ("no_D", ("N", "D", "G", "delta"), delta_fitter(False), predict_law, DELTA_CONSTANTS),
                ("epm", ("N", "G", "delta"), fit_epm_law, predict_epm, tuple(f"eff_G{g}" for g in granularities)))
        for law, columns, fit, predict, constants in laws:
            rows, frames, comp, draws = _assess(law, precision, sub, columns, fit, predict, constants, n_boot)
            params += rows
            preds += frames
            comparison.append(comp)
            boot.append(draws)

    predictions = pd.concat(preds, ignore_index=True) if preds else _table([], PREDICTIONS_COLUMNS)
    predictions["G"] = pd.to_numeric(predictions["G"]).astype("Int64")
    bootstrap = pd.concat([b for b in boot if not b.empty] or [_table([], BOOTSTRAP_COLUMNS)], ignore_index=True)
    return FitTables(_table(params, PARAMS_COLUMNS), predictions.loc[:, list(PREDICTIONS_COLUMNS)],
                     _table(comparison, COMPARISON_COLUMNS), bootstrap.astype({"draw": int, "value": float}))


def write_fits(tables: FitTables, out_dir: str | Path) -> None:
    """Write params, predictions, comparison and bootstrap as ``<out_dir>/<name>.parquet``, each atomically."""
    for name, table in tables._asdict().items():
        write_parquet(table, Path(out_dir) / f"{name}.parquet")


def read_params(path: str | Path) -> pd.DataFrame:
    """A params table (``params.parquet``), checked: FitError naming the file and ``PARAMS_COLUMNS`` when it is
    missing, unreadable (e.g. truncated) or lacks a column."""
    return read_parquet(path, PARAMS_COLUMNS, "params table", kinds={"value": "number"}, error=FitError)


def _law_constants(params: pd.DataFrame, law: str, precision: str) -> dict[str, float]:
    """The fitted constants of one law from a params table."""
    missing = [c for c in ("law", "precision", "constant", "value") if c not in params.columns]
    if missing:
        raise FitError(f"params table lacks columns {', '.join(missing)}")
    rows = params[(params["law"] == law) & (params["precision"] == precision)]
    if rows.empty:
        have = sorted(params.loc[params["law"] == law, "precision"].unique())
        raise FitError(f"params table has no {law} law for precision {precision} (it has: {', '.join(have)})")
    values = dict(zip(rows["constant"], rows["value"].astype(float)))
    if not np.isfinite(list(values.values())).all():
        raise FitError(f"params table: the {law} law for {precision} was not fitted (too few valid runs)")
    return values


def predict_from_params(params: pd.DataFrame, N: ArrayLike, D: ArrayLike, G: ArrayLike, precision: str) -> dict:
    """Predictions of a params table for a precision: ``delta`` (unified law), ``bf16_loss`` (Chinchilla),
    ``qat_loss`` = bf16_loss + delta and ``epm``; the last three are NaN without a Chinchilla fit."""
    delta_params = _law_constants(params, "unified", precision)
    delta = predict_delta(delta_params, N, D, G)
    try:
        chin = _law_constants(params, "chinchilla", BASELINE)
    except FitError as exc:
        log.warning("no BF16 loss or EPM prediction: %s", exc)
        nan = np.full(np.shape(delta), np.nan)
        bf16, eff = nan, nan
    else:
        bf16, eff = predict_loss(chin, N, D), epm(N, D, G, delta_params, chin)
    out = {"delta": delta, "bf16_loss": bf16, "qat_loss": bf16 + delta, "epm": eff}
    return {k: float(v) if np.ndim(v) == 0 else np.asarray(v) for k, v in out.items()}
