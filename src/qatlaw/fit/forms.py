"""The laws of the study (N non-embedding parameters, D training tokens, G the integer group length of the run
table; for ``channel`` runs G is already the hidden size, so no special case is needed here):

- ``chinchilla``  L(N, D) = E + A/N^α + B/D^β on BF16 runs (α = β when ``tie``, as the paper).
- ``unified``     δ(N, D, G) = k · D^γD · (log2 G)^γG / N^γN, one law per precision (paper Eq. 5).
- ``no_D``        the unified law without the D^γD factor (paper Table 4).
- ``epm``         δ(N) = A/(N·eff)^α − A/N^α (paper Eq. 3, Table 2): A and α are the Chinchilla fit's, and
                  eff ∈ (0, 1] is the only free parameter, one per granularity (the "5 laws" of Table 2; the
                  run table's ``group`` label, so all ``channel`` runs share one eff whatever their G).

:class:`ChinchillaParams` and :class:`DeltaParams` name the constants of the solver's parameter vectors
(:mod:`qatlaw.fit.solver`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from qatlaw.fit.runs import BOOT_QUANTILES, bootstrap, design, fit_name, identified, qat_loss, usable_runs
from qatlaw.fit.solver import FitError, Objective, halton, huber, identified_optima

log = logging.getLogger("qatlaw.fit")

CHINCHILLA_HUBER = 1e-3
CHINCHILLA_INITS = 128
# Start box of the Chinchilla parameters (a, b, e) = log(A, B, E) and the exponents (α, β).
CHINCHILLA_BOX = np.array([[0.0, 25.0], [0.0, 25.0], [-1.0, 1.5], [0.0, 2.0], [0.0, 2.0]])
# Chinchilla: a term (A/N^α, B/D^β or E) below this share of every run's loss is heading for zero, a limit that
# log-space parameters reach only at infinity, so the optimum is not attained
MIN_TERM_SHARE = 1e-6
# Chinchilla bootstrap refits start from the fit's optima and from this many Halton points of the start box: one
# L-BFGS path from a single start can end at a saddle or at another optimum depending on rounding
BOOT_HALTON = 16


class ChinchillaParams(NamedTuple):
    """The constants of the Chinchilla law L = E + A/N^α + B/D^β."""

    A: float
    B: float
    E: float
    alpha: float
    beta: float

    @classmethod
    def from_theta(cls, theta: np.ndarray, tie: bool) -> ChinchillaParams:
        """The constants of the solver's θ = (log A, log B, log E, α[, β]), whose β is α when ``tie``."""
        a, b, e, alpha = (float(t) for t in theta[:4])
        beta = alpha if tie else float(theta[4])
        return cls(float(np.exp(a)), float(np.exp(b)), float(np.exp(e)), alpha, beta)


class DeltaParams(NamedTuple):
    """The constants of the δ law δ = k·D^γD·(log2 G)^γG/N^γN."""

    k: float
    gamma_N: float
    gamma_D: float
    gamma_G: float

    @classmethod
    def from_theta(cls, theta: np.ndarray, use_D: bool, with_g: bool) -> DeltaParams:
        """The constants of the solver's θ = (log k, γN[, γD][, γG]) (the columns of :meth:`DeltaLaw.design_matrix`):
        γD is 0 without ``use_D``, γG NaN without ``with_g``."""
        log_k, gamma_N, *rest = (float(t) for t in theta)
        gamma_D = rest.pop(0) if use_D else 0.0
        gamma_G = rest[0] if with_g else math.nan
        return cls(float(np.exp(log_k)), gamma_N, gamma_D, gamma_G)


CHINCHILLA_CONSTANTS = ChinchillaParams._fields
DELTA_CONSTANTS = DeltaParams._fields


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
        loss, psi, inside = huber(top[:, 0] + np.log(total) - log_l, c)
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
    """L = E + A/N^α + B/D^β on the BF16 runs (α = β when ``tie``), from ``inits`` Halton starts (None: as many
    as :data:`CHINCHILLA_INITS` says when it fits) or an array of starts (a, b, e, α[, β]) with a, b, e the logs
    of A, B, E. Fits are cached per set of runs, since the EPM law of every precision reuses them."""

    tie: bool = True
    inits: int | np.ndarray | None = None
    name: str = "chinchilla"
    columns: tuple[str, ...] = ("N", "D", "loss")
    _cache: dict = field(default_factory=dict, repr=False)

    def constant_names(self, runs: pd.DataFrame) -> tuple[str, ...]:
        return CHINCHILLA_CONSTANTS

    def _constants(self, theta: np.ndarray) -> dict[str, float]:
        return ChinchillaParams.from_theta(theta, self.tie)._asdict()

    def _degenerate(self, theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> str | None:
        """Why an optimum is not one of the law's own (a negative exponent, a term tending to 0), or None."""
        if (theta[3:] < 0).any():  # θ's exponents (α[, β])
            return "an exponent is negative"
        p = ChinchillaParams.from_theta(theta, self.tie)
        terms = np.column_stack([p.A * np.exp(-p.alpha * log_n), p.B * np.exp(-p.beta * log_d),
                                 np.full(len(log_n), p.E)])
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
        n_params, what = (4 if self.tie else 5), fit_name(runs, "chinchilla")
        data, n_dropped = usable_runs(runs, self.columns, what, n_params)
        for col in ("N", "D"):
            if data[col].nunique() < 2:
                raise FitError(f"{what}: column {col} takes a single value among the valid runs")
        logs = [np.log(data[c].to_numpy()) for c in self.columns]
        box = CHINCHILLA_BOX[:n_params]
        if self.inits is None or np.ndim(self.inits) == 0:
            starts = halton(CHINCHILLA_INITS if self.inits is None else int(self.inits), box[:, 0], box[:, 1])
        else:
            starts = np.atleast_2d(np.asarray(self.inits, dtype=float))
        bounds = [(None, None)] * 3 + [(0.0, None)] * (n_params - 3)
        try:
            optima = identified_optima(_chinchilla_objective(*logs, self.tie), starts, bounds,
                                       lambda theta: self._degenerate(theta, *logs[:2]))
        except FitError as exc:
            raise FitError(f"{what}: {exc}") from None
        objective, theta = optima[0]
        draws = pd.DataFrame()
        if n_boot:
            boot_starts = np.vstack([np.array([o[1] for o in optima]), halton(BOOT_HALTON, box[:, 0], box[:, 1])])

            def refit(idx: np.ndarray) -> dict[str, float] | None:
                if len(np.unique(idx)) < n_params or min(len(np.unique(lg[idx])) for lg in logs[:2]) < 2:
                    return None
                log_n, log_d, log_l = (lg[idx] for lg in logs)
                resampled = _chinchilla_objective(log_n, log_d, log_l, self.tie)
                return identified(lambda: self._constants(identified_optima(
                    resampled, boot_starts, bounds, lambda theta: self._degenerate(theta, log_n, log_d))[0][1]))
            draws = bootstrap(refit, design(runs.loc[data.index]), CHINCHILLA_CONSTANTS, n_boot, seed, what)
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
        slope = f"{along.optimum()[0][1]:.3g}"
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

    def design_matrix(self, data: pd.DataFrame, with_g: bool = True) -> np.ndarray:
        """Columns of log δ̂ = log k − γN log N [+ γD log D] [+ γG log log2 G]."""
        cols = [np.ones(len(data)), -np.log(data["N"].to_numpy())]
        if self.use_D:
            cols.append(np.log(data["D"].to_numpy()))
        if with_g:
            cols.append(np.log(np.log2(data["G"].to_numpy())))
        return np.column_stack(cols)

    def _constants(self, theta: np.ndarray, with_g: bool) -> dict[str, float]:
        return DeltaParams.from_theta(theta, self.use_D, with_g)._asdict()

    def fit(self, runs: pd.DataFrame, n_boot: int = 0, seed: int = 0,
            held_out: tuple[str, float] | None = None) -> Fit:
        """The law on ``runs``. With one G among them γG is not identified: it is NaN and k is the law's value at
        that G ((log2 G)^γG folded in; :func:`predict_delta` holds there only). FitError when the runs cannot
        identify the rest: too few, no more design points than constants, a single N or D, or every run on one
        D/N ray (only γD − γN is identified)."""
        what = fit_name(runs, self.name)
        data, n_dropped = usable_runs(runs, self.columns, what, 2 + self.use_D)
        with_g = data["G"].nunique() > 1
        free = tuple(c for c in DELTA_CONSTANTS if (self.use_D or c != "gamma_D") and (with_g or c != "gamma_G"))
        if len(data) < len(free):
            raise FitError(f"{what}: {len(data)} usable runs for {len(free)} parameters")
        if (points := design_points(data, self.use_D)) <= len(free):
            axes = "(N, D, G)" if self.use_D else "(N, G)"
            raise FitError(f"{what}: {points} distinct {axes} points for {len(free)} constants: an exact fit "
                           "through them, not a measurement")
        x = self.design_matrix(data, with_g)
        if np.linalg.matrix_rank(x) < x.shape[1]:
            single = [c for c in ("N", "D") if (self.use_D or c != "D") and data[c].nunique() < 2]
            why = f"column {', '.join(single)} takes a single value" if single else "N, D and G are collinear"
            raise FitError(f"{what}: cannot identify every exponent: {why} among the valid runs")
        if self.use_D and (ray := one_ray(data)):
            raise FitError(f"{what}: {ray}")
        runs_ = qat_loss(data, x)
        try:
            theta, c, objective = runs_.optimum()
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
                return identified(lambda: self._constants(runs_.take(idx).solve(c, theta)[0], with_g))
            plan = design(runs.loc[data.index])
            draws = bootstrap(refit, plan, DELTA_CONSTANTS, n_boot, seed, what)[list(free)]
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
    alpha, log_a, what = chin_params["alpha"], np.log(chin_params["A"]), fit_name(runs, "epm")
    if not alpha > 0:
        raise FitError(f"{what}: the Chinchilla exponent alpha must be positive, got {alpha}")
    data, n_dropped = usable_runs(runs, EPM.columns, what, 1)
    constants, objective, draws = {}, 0.0, []
    for label, grp in data.groupby(_granularity(runs.loc[data.index]), sort=False):
        x = np.ones((len(grp), 1))
        grp_runs = qat_loss(grp, x, log_a - alpha * np.log(grp["N"].to_numpy()))
        try:
            theta, c, f = grp_runs.optimum()
        except FitError as exc:
            raise FitError(f"{what} G {label}: {exc}") from None
        name = f"eff_G{label}"
        constants[name], objective = _eff(theta[0], alpha), objective + f * c**2
        if n_boot:
            def refit(idx: np.ndarray, grp_runs=grp_runs, c=c, theta=theta, name=name) -> dict[str, float] | None:
                return identified(lambda: {name: _eff(grp_runs.take(idx).solve(c, theta)[0][0], alpha)})
            draws.append(bootstrap(refit, design(runs.loc[grp.index]), (name,), n_boot, seed, f"{what} G {label}"))
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


