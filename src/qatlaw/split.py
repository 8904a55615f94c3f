"""The FP→QAT split (Dremov et al. 2025): how much of training to spend in QAT after full-precision training.

A run's ``qat_fraction`` f is the share of its D tokens trained in QAT: 1 is QAT from scratch (the paper this
project reproduces, and every run of a table without the column), 0 is post-training quantization (PTQ: the
final BF16 weights evaluated under the precision), 0 < f < 1 a branch of the BF16 baseline of its (size, tokens,
seed) cell that trains its last f·D tokens in QAT. δ is measured against that baseline, as everywhere in the
project (:func:`qatlaw.runtable.delta_table`), so the baseline's loss stands for the paper's Chinchilla-like term.

What is measured, per cell (precision, group, size, tokens; seeds pooled) — :func:`cell_optima`:

- ``f_measured``: the trained fraction with the lowest seed-mean δ (PTQ and f = 1 included);
- ``f_star``: the smooth optimum among the runs with 0 < f ≤ 1, the vertex of a parabola in ln f through the
  best fraction and its two neighbours (the best fraction itself when it is the smallest or 1); ``f_low``,
  ``f_high`` its spread over seeds (``spread``): the 90% interval over ``N_BOOT`` resamples of the seeds with 3
  or more seeds (a seed's runs share its trunk, so they are resampled together), the range of the two seeds'
  own optima with 2, none with 1. ``interior`` when the spread lies strictly between the smallest trained
  fraction and 1: the minimum is bracketed by trained fractions, not at an edge;
- ``scratch_gap``: δ(f = 1) − δ(f̂), f̂ the split fraction (0 < f < 1) with the lowest seed-mean δ (optimistic:
  f̂ is picked on the same runs; :func:`seed_gaps` measures it on runs that did not pick it); ``ptq_gap``:
  δ(PTQ) − the highest δ of any QAT fraction.

The paper's laws, fitted per precision and group with 90% intervals over resampled cells (:func:`fit_optimum_law`,
:func:`fit_loss_law`), constants in ``laws/paper.yaml`` (``split``):

- f*(S) = exp(−a / ln S), S = D / (N · B/8) the tokens per parameter byte, B the bit width of the precision
  (:func:`bits`); fitted as ln f* = a · (−1 / ln S) by :func:`qatlaw.fit.solver.solve_loglinear` on the cells'
  ``f_star``.
- δ(N, D, f) = θ + φ / (N^ψ S_qat^ω) + λ / (N^ν S_fp^ξ S_qat^ρ), S_qat = f·S, S_fp = (1 − f)·S, on the runs with
  0 < f < 1 (S_fp = 0 makes the last term infinite, so QAT from scratch lies outside the form). The paper's bit
  factors 2^(−κB), 2^(−χB), 2^(−μB) are folded into θ, φ, λ: one law per precision cannot tell them apart.

A constant the data cannot identify (too few cells, one S, collinear N and S) is reported in one line
(``reason``), never as a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import least_squares

from qatlaw import fit, laws, paper, resample, runtable
from qatlaw import precision as prec
from qatlaw.fit import solver
from qatlaw.fit.runs import bootstrap, identified
from qatlaw.runtable import QAT_FRACTION as FRACTION
from qatlaw.runtable import read_runs, with_qat_fraction

SCRATCH = 1.0  # QAT from scratch
GROUP = ["precision", "group"]  # one law per precision and group
CELL = [*GROUP, "size", "tokens_requested"]  # one loss-against-f curve, seeds pooled
N_BOOT = 2000  # resamples of the seeds of a cell (its optimum)
LAW_BOOT = 200  # resamples of cells for a law (each a refit)
SEED = 0
LOSS_CONSTANTS = ("theta", "phi", "psi", "omega", "lambda", "nu", "xi", "rho")
LOSS_STARTS = 32  # Halton starts of the loss-law fit
# Box of the starts: theta, log phi, psi, omega, log lambda, nu, xi, rho
LOSS_BOX = np.array([[0.0, 0.5], [-5.0, 5.0], [0.0, 1.0], [0.0, 1.5], [-5.0, 5.0], [0.0, 1.0], [0.0, 1.5], [0.0, 1.5]])
BAD_RESIDUAL = 1e3  # the residual of a run where the law overflows (far from any optimum)
MIN_EIGENVALUE = 1e-8  # smallest eigenvalue of the column-scaled JᵀJ at an identified loss-law optimum
OPTIMA_COLUMNS = ("precision", "group", "G", "size", "tokens_requested", "N", "D", "bits", "S", "n_seeds",
                  "fractions", "f_measured", "f_star", "f_low", "f_high", "spread", "interior", "scratch_gap",
                  "ptq_gap")
INTERVAL_90, SEED_RANGE = "90%", "seed range"  # what f_low–f_high is: a bootstrap interval, or 2 seeds' range


class SplitError(fit.FitError):
    """A split law cannot be fitted, loaded or applied."""


def fractions(runs: pd.DataFrame) -> pd.Series:
    """Every run's QAT fraction (1.0, QAT from scratch, where the table has no ``qat_fraction`` column)."""
    return with_qat_fraction(runs)[FRACTION].astype(float)


def has_split(runs: pd.DataFrame) -> bool:
    """Whether the run table has QAT runs that are not from scratch (a fraction below 1)."""
    return bool((fractions(runs) < SCRATCH).any())


def bits(precision: str) -> int:
    """B of S: the lowest bit width among the precision's quantized weights (the paper quantizes weights), or
    among its activations when every weight stays 16-bit."""
    try:
        layers = prec.parse(precision).layers.values()
    except ValueError as exc:
        raise SplitError(f"precision {precision}: {exc}") from None
    weights = [lq.weight.bits for lq in layers if lq.weight.enabled]
    acts = [lq.act.bits for lq in layers if lq.act.enabled]
    if not (weights or acts):
        raise SplitError(f"precision {precision} quantizes nothing: it has no QAT fraction")
    return min(weights or acts)


def tokens_per_parameter_byte(N: ArrayLike, D: ArrayLike, B: ArrayLike) -> np.ndarray | float:
    """S = D / (N · B/8)."""
    return np.asarray(D, float) / (np.asarray(N, float) * np.asarray(B, float) / 8)


def optimum(S: ArrayLike, a: float) -> np.ndarray | float:
    """The optimal QAT fraction f*(S) = exp(−a / ln S); SplitError for S ≤ 1, where the form has no meaning."""
    S = np.asarray(S, float)
    if not (S > 1).all():
        raise SplitError(f"S = D / (N·B/8) = {S.min():.3g} <= 1: outside the domain of f* = exp(-a / ln S)")
    return np.exp(-a / np.log(S))


def predict_delta(constants: dict[str, float], N: ArrayLike, S: ArrayLike, f: ArrayLike) -> np.ndarray | float:
    """δ(N, S, f) = θ + φ / (N^ψ (fS)^ω) + λ / (N^ν ((1 − f)S)^ξ (fS)^ρ)."""
    c, N, S, f = constants, np.asarray(N, float), np.asarray(S, float), np.asarray(f, float)
    s_qat, s_fp = f * S, (1 - f) * S
    return (c["theta"] + c["phi"] / (N ** c["psi"] * s_qat ** c["omega"])
            + c["lambda"] / (N ** c["nu"] * s_fp ** c["xi"] * s_qat ** c["rho"]))


# ------------------------------------------------------------------------------------------- measured optima

def split_deltas(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per QAT run that did not diverge: its cell, seed, N, D, B, S, ``qat_fraction`` and δ of ``metric``
    (against the BF16 baseline of its size, tokens and seed)."""
    try:
        delta_col = runtable.metric_columns(metric)[1]
        deltas = runtable.delta_table(runs)
    except runtable.RunTableError as exc:
        raise SplitError(f"split: {exc}") from None
    f = fractions(runs).set_axis(runs["run_id"])
    deltas = deltas[~deltas["diverged"]].assign(**{FRACTION: lambda d: d["run_id"].map(f).to_numpy(float)})
    deltas = deltas.assign(delta=deltas[delta_col].astype(float), group=deltas["group"].astype(str),
                           bits=deltas["precision"].map(bits))
    deltas["S"] = tokens_per_parameter_byte(deltas["N"], deltas["D"], deltas["bits"])
    return deltas.dropna(subset=["delta"]).reset_index(drop=True)


def _parabola_optimum(log_f: np.ndarray, values: np.ndarray) -> float:
    """The optimum of one cell's seed × fraction table of δ (fractions > 0, as ln f): the vertex of the parabola
    in ln f fitted to the fraction with the lowest seed-mean δ and its two neighbours, or that fraction when it
    is the smallest or the largest."""
    mean = np.nanmean(values, axis=0)
    best = int(np.nanargmin(mean))
    if best in (0, len(log_f) - 1):
        return float(np.exp(log_f[best]))
    near = slice(best - 1, best + 2)
    x, y = np.broadcast_to(log_f[near], values[:, near].shape).ravel(), values[:, near].ravel()
    ok = np.isfinite(y)
    c2, c1, _ = np.polyfit(x[ok], y[ok], 2)
    vertex = -c1 / (2 * c2) if c2 > 0 else log_f[best]
    return float(np.exp(np.clip(vertex, log_f[best - 1], log_f[best + 1])))


def _cell_optimum(curves: pd.DataFrame, rng: np.random.Generator) -> tuple[float, float, float, str]:
    """The smooth optimum of one cell (a seed × fraction table of δ, fractions > 0) and its spread over seeds:
    the 90% interval over resampled seeds with 3 or more seeds, the range of the seeds' own optima with 2 (a
    resample of 2 seeds can only give those two or their mean), none with 1; and which of these it is."""
    log_f, values = np.log(curves.columns.to_numpy(float)), curves.to_numpy(float)
    n = len(values)
    point = _parabola_optimum(log_f, values)
    if n < 2:
        return point, math.nan, math.nan, ""
    if n == 2:
        each = [_parabola_optimum(log_f, values[[i]]) for i in range(n)]
        return point, float(min(each)), float(max(each)), SEED_RANGE
    draws = np.array([_parabola_optimum(log_f, values[rng.integers(0, n, n)]) for _ in range(N_BOOT)])
    low, high = np.quantile(draws, fit.BOOT_QUANTILES)
    return point, float(low), float(high), INTERVAL_90


def _cells(deltas: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame, pd.DataFrame]]:
    """Every cell with at least 3 trained fractions above 0: its key (``CELL``), its rows and its seed ×
    fraction table of δ."""
    out = []
    for key, cell in deltas.groupby(CELL, sort=True):
        table = cell.pivot_table(index="seed", columns=FRACTION, values="delta", aggfunc="mean")
        if (table.columns > 0).sum() >= 3:
            out.append((key, cell, table))
    return out


def _split_fractions(table: pd.DataFrame) -> pd.DataFrame:
    return table.loc[:, (table.columns > 0) & (table.columns < SCRATCH)]


def cell_optima(deltas: pd.DataFrame) -> pd.DataFrame:
    """The measured and smooth optimum of every cell with at least 3 trained fractions above 0 (columns
    ``OPTIMA_COLUMNS``, see the module docstring), from :func:`split_deltas`."""
    rng = np.random.default_rng(SEED)
    rows = []
    for key, cell, table in _cells(deltas):
        trained = table.loc[:, table.columns > 0]
        mean = table.mean()
        split = _split_fractions(table).mean()
        f_star, f_low, f_high, spread = _cell_optimum(trained, rng)
        first = cell.iloc[0]
        rows.append(dict(zip(CELL, key), G=first["G"], N=float(first["N"]), D=float(first["D"]),
                         bits=int(first["bits"]), S=float(first["S"]), n_seeds=len(table),
                         fractions=" ".join(f"{f:g}" for f in table.columns), f_measured=float(mean.idxmin()),
                         f_star=f_star, f_low=f_low, f_high=f_high, spread=spread,
                         interior=bool(f_low > trained.columns.min() and f_high < SCRATCH),
                         scratch_gap=float(mean.get(SCRATCH, math.nan) - split.min()) if len(split) else math.nan,
                         ptq_gap=float(mean.get(0.0, math.nan) - trained.mean().max())))
    return pd.DataFrame(rows, columns=list(OPTIMA_COLUMNS))


def seed_gaps(deltas: pd.DataFrame) -> pd.DataFrame:
    """Per cell and seed (columns ``CELL``, ``seed``, ``S``): ``scratch_gap`` = δ(f = 1) − δ(f̂) of that seed,
    f̂ the split fraction (0 < f < 1) with the lowest mean δ over the cell's *other* seeds, so the fraction is
    not chosen on the runs that measure its gap (NaN in a cell of one seed), ``f_hat`` that fraction; and
    ``ptq_gap`` = δ(PTQ) − the highest δ of any QAT fraction of that seed."""
    rows = []
    for key, cell, table in _cells(deltas):
        split, trained = _split_fractions(table), table.loc[:, table.columns > 0]
        for seed in table.index:
            others = split.drop(index=seed).mean()
            f_hat = float(others.idxmin()) if others.notna().any() else math.nan
            own = table.loc[seed]
            rows.append(dict(zip(CELL, key), seed=seed, S=float(cell["S"].iloc[0]), f_hat=f_hat,
                             scratch_gap=float(own.get(SCRATCH, math.nan) - own[f_hat]) if math.isfinite(f_hat)
                             else math.nan,
                             ptq_gap=float(own.get(0.0, math.nan) - trained.loc[seed].max())))
    return pd.DataFrame(rows, columns=[*CELL, "seed", "S", "f_hat", "scratch_gap", "ptq_gap"])


def optimum_slope(deltas: pd.DataFrame, precision: str, group: str, n_boot: int = N_BOOT,
                  seed: int = SEED) -> tuple[float, np.ndarray]:
    """The slope of ln f* on ln S over the cells of one precision and group, and its value on ``n_boot``
    resamples of the design (cells with replacement, and the seeds inside each; the cell's f* recomputed from
    the drawn seeds; NaN where a resample has fewer than 2 distinct S)."""
    cells = [(np.log(c["S"].iloc[0]), t.loc[:, t.columns > 0]) for key, c, t in _cells(deltas)
             if key[0] == precision and str(key[1]) == str(group)]
    log_s = np.array([s for s, _ in cells])
    curves = [(np.log(t.columns.to_numpy(float)), t.to_numpy(float)) for _, t in cells]

    def slope(xs: np.ndarray, ys: np.ndarray) -> float:
        return float(np.polyfit(xs, ys, 1)[0]) if len(np.unique(xs)) > 1 else math.nan

    point = slope(log_s, np.log([_parabola_optimum(lf, v) for lf, v in curves]))
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        picked = rng.integers(0, len(cells), len(cells))
        f_star = [_parabola_optimum(curves[i][0], curves[i][1][rng.integers(0, len(curves[i][1]),
                                                                             len(curves[i][1]))]) for i in picked]
        draws[b] = slope(log_s[picked], np.log(f_star))
    return point, draws


# ------------------------------------------------------------------------------------------------ the laws

@dataclass(frozen=True)
class LawFit:
    """One fitted law of one precision and group: its constants (NaN when not identified, with ``reason``),
    their 90% intervals, and the cells and runs behind them."""

    precision: str
    group: str
    constants: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    n_cells: int = 0
    n_runs: int = 0
    reason: str = ""

    @property
    def identified(self) -> bool:
        """Whether every constant was identified."""
        return not self.reason


def _intervals(draws: pd.DataFrame) -> dict[str, tuple[float, float]]:
    if draws.empty:
        return {}
    low, high = (draws.quantile(q) for q in fit.BOOT_QUANTILES)
    return {c: (float(low[c]), float(high[c])) for c in draws.columns}


def fit_optimum_law(optima: pd.DataFrame, precision: str, group: str, n_boot: int | None = None,
                    seed: int = SEED) -> LawFit:
    """a of f*(S) = exp(−a / ln S) fitted to the cells' smooth optima of one precision and group, with a 90%
    interval over ``n_boot`` (default ``LAW_BOOT``) resampled cells; not identified (NaN, ``reason``) without 2
    cells of distinct S > 1."""
    n_boot = LAW_BOOT if n_boot is None else n_boot
    cells = optima[(optima["precision"] == precision) & (optima["group"] == group)]
    cells = cells[(cells["S"] > 1) & (cells["f_star"] > 0)]
    nan = {"a": math.nan}
    if cells["S"].nunique() < 2:
        return LawFit(precision, group, nan, n_cells=len(cells),
                      reason=f"a not identified: {cells['S'].nunique()} distinct S among the cells with an "
                             "optimum (need 2)")
    x = (-1.0 / np.log(cells["S"].to_numpy(float)))[:, None]
    y = np.log(cells["f_star"].to_numpy(float))
    c = solver.huber_threshold(x, y)
    theta, _ = solver.solve_loglinear(x, y, c)

    def refit(idx: np.ndarray) -> dict[str, float] | None:
        if len(np.unique(x[idx])) < 2:
            return None
        return identified(lambda: {"a": float(solver.solve_loglinear(x[idx], y[idx], c, theta)[0][0])})

    draws = bootstrap(refit, resample.runs(len(cells)), ("a",), n_boot, seed, f"f*(S) law ({precision})") \
        if n_boot else pd.DataFrame()
    return LawFit(precision, group, {"a": float(theta[0])}, _intervals(draws), len(cells), int(len(cells)))


def _loss_constants(theta: np.ndarray) -> dict[str, float]:
    values = np.asarray(theta, float).copy()
    with np.errstate(over="ignore"):
        values[[1, 4]] = np.exp(values[[1, 4]])  # phi and lambda are fitted as logs
    return dict(zip(LOSS_CONSTANTS, (float(v) for v in values)))


def _solve_loss(N: np.ndarray, S: np.ndarray, f: np.ndarray, delta: np.ndarray,
                starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares optimum of the loss law over ``starts``, refitted with a Huber loss at 1.345 robust
    standard deviations of its residuals (as the δ laws of :mod:`qatlaw.fit`); its parameters and Jacobian."""
    def residuals(theta: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            r = predict_delta(_loss_constants(theta), N, S, f) - delta
        return np.clip(np.nan_to_num(r, nan=BAD_RESIDUAL), -BAD_RESIDUAL, BAD_RESIDUAL)

    best = min((least_squares(residuals, s, method="trf", x_scale="jac") for s in starts), key=lambda r: r.cost)
    n, p = len(delta), len(best.x)
    scale = solver.MAD_TO_SD * float(np.median(np.abs(best.fun))) * math.sqrt(n / max(n - p, 1))
    c = max(solver.MIN_THRESHOLD, solver.HUBER_K * scale)
    robust = least_squares(residuals, best.x, loss="huber", f_scale=c, method="trf", x_scale="jac")
    return robust.x, robust.jac


def _unidentified(jac: np.ndarray) -> list[str]:
    """The constants along the flattest direction of the column-scaled JᵀJ when it is not positive definite
    beyond MIN_EIGENVALUE (empty when every constant is identified)."""
    norms = np.linalg.norm(jac, axis=0)
    if not (norms > 0).all():
        return [name for name, n in zip(LOSS_CONSTANTS, norms) if not n > 0]
    scaled = jac / norms
    values, vectors = np.linalg.eigh(scaled.T @ scaled)
    if values[0] > MIN_EIGENVALUE:
        return []
    weights = np.abs(vectors[:, 0])
    return [name for name, w in zip(LOSS_CONSTANTS, weights) if w > 0.3 * weights.max()]


def fit_loss_law(deltas: pd.DataFrame, precision: str, group: str, n_boot: int | None = None,
                 seed: int = SEED) -> LawFit:
    """The loss law δ(N, S, f) (module docstring) fitted to the runs with 0 < f < 1 of one precision and group,
    with 90% intervals over ``n_boot`` (default ``LAW_BOOT``) resampled cells; NaN constants and a one-line
    ``reason`` when the data cannot identify them."""
    n_boot = LAW_BOOT if n_boot is None else n_boot
    runs = deltas[(deltas["precision"] == precision) & (deltas["group"] == group)]
    runs = runs[(runs[FRACTION] > 0) & (runs[FRACTION] < SCRATCH)]
    n_cells, nan = runs.groupby(["size", "tokens_requested"]).ngroups, dict.fromkeys(LOSS_CONSTANTS, math.nan)
    if len(runs) <= len(LOSS_CONSTANTS):
        return LawFit(precision, group, nan, n_cells=n_cells, n_runs=len(runs),
                      reason=f"loss law not identified: {len(runs)} runs with 0 < f < 1 for "
                             f"{len(LOSS_CONSTANTS)} constants")
    N, S, f, delta = (runs[c].to_numpy(float) for c in ("N", "S", FRACTION, "delta"))
    starts = solver.halton(LOSS_STARTS, LOSS_BOX[:, 0], LOSS_BOX[:, 1])
    theta, jac = _solve_loss(N, S, f, delta, starts)
    if flat := _unidentified(jac):
        return LawFit(precision, group, nan, n_cells=n_cells, n_runs=len(runs),
                      reason=f"loss law not identified: the runs do not constrain {', '.join(flat)} "
                             f"({n_cells} cells, {runs['N'].nunique()} N, {runs['S'].nunique()} S)")
    def refit(rows: np.ndarray) -> dict[str, float] | None:
        solved, j = _solve_loss(N[rows], S[rows], f[rows], delta[rows], theta[None, :])
        return None if _unidentified(j) else _loss_constants(solved)

    plan = resample.of_table(runs, ["size", "tokens_requested"], "seed")
    draws = bootstrap(refit, plan, LOSS_CONSTANTS, n_boot, seed, f"split loss law ({precision})") \
        if n_boot else pd.DataFrame()
    return LawFit(precision, group, _loss_constants(theta), _intervals(draws), n_cells, len(runs))


# ---------------------------------------------------------------------------------------------- for planning

@dataclass(frozen=True)
class SplitLaw:
    """The split law a plan uses: a of f*(S), the loss-law constants per precision where known, and why the
    paper's law stands in for a fitted one (``fallback``)."""

    name: str
    source: str
    a: float
    loss: dict[str, dict[str, float]] = field(default_factory=dict)  # precision -> loss-law constants
    notes: dict[str, str] = field(default_factory=dict)  # precision -> why its loss law is missing
    fallback: str = ""


def paper_law(fallback: str = "") -> SplitLaw:
    """The paper's f*(S) (its loss-law constants are not in this project's sources)."""
    spec = paper.constants()["split"]
    return SplitLaw("paper", spec["source"], float(spec["optimum"]["a"]), fallback=fallback)


def _run_table(spec: str) -> Path | None:
    """The run table of a ``--law`` path: a runs.parquet itself, the one in its folder, or the one beside a fit
    folder (a folder holding params.parquet); None for a shipped law's name or a path without one."""
    if spec in laws.SHIPPED:
        return None
    path = Path(spec)
    if path.name == "runs.parquet" and path.is_file():
        return path
    folder = path.parent if path.is_file() else path
    candidates = [folder / "runs.parquet"] + ([folder.parent / "runs.parquet"]
                                              if (folder / "params.parquet").is_file() else [])
    return next((p for p in candidates if p.is_file()), None)


def load_law(spec: str, metric: str) -> SplitLaw:
    """The split law of ``--law``: fitted (one f*(S) over every precision, a loss law per precision) to the
    split runs of the run table a path points at, else the paper's, saying why (``fallback``). SplitError when
    the fitted f*(S) is not identified."""
    path = _run_table(spec)
    if path is None:
        return paper_law("" if spec == "paper" else f"law {spec} has no run table to fit a split law on")
    runs = read_runs(path, all_fractions=True)
    if not has_split(runs):
        return paper_law(f"{path} has no runs with {FRACTION} < 1")
    deltas = split_deltas(runs, metric)
    pooled = fit_optimum_law(cell_optima(deltas).assign(precision="all", group="all"), "all", "all", n_boot=0)
    if not pooled.identified:
        raise SplitError(f"--law {spec}: {pooled.reason}")
    loss, notes = {}, {}
    for precision, group in deltas[GROUP].drop_duplicates().itertuples(index=False):
        law = fit_loss_law(deltas, precision, group, n_boot=0)
        if law.identified:
            loss.setdefault(precision, law.constants)
        else:
            notes.setdefault(precision, law.reason)
    return SplitLaw(path.parent.name or str(path), f"fitted to {path}", pooled.constants["a"], loss, notes)


def recommend(split_law: SplitLaw, law: laws.Law, precision: str, N: float, D: float, G: float) -> dict:
    """The recommended QAT fraction of a precision for N parameters on D tokens: ``S``, ``bits``, ``f`` (f*(S)),
    ``loss_f`` (the split loss law's, over law's BF16 loss; NaN without one, ``why`` says why) and
    ``loss_scratch`` (law's QAT loss at f = 1)."""
    B = bits(precision)
    S = float(tokens_per_parameter_byte(N, D, B))
    f = float(optimum(S, split_law.a))
    point = laws.predict(law, [N], [D], [G], [precision]).iloc[0]
    constants = split_law.loss.get(precision)
    if constants is None:
        why = split_law.notes.get(precision, "the paper's loss-law constants are not in this project's sources"
                                  if split_law.name == "paper" else f"no split runs of {precision}")
        loss_f = math.nan
    else:
        why, loss_f = "", float(point["bf16_loss"] + predict_delta(constants, N, S, f))
    return {"precision": precision, "G": G, "bits": B, "S": S, "f": f, "loss_f": loss_f, "why": why,
            "loss_scratch": float(point["qat_loss"])}
