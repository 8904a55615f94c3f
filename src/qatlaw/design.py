"""What a grid will resolve before it runs: its runs simulated from a law plus seed noise, fitted by the project's
own fitter, many times over.

A **design** is a table of the runs a grid trains (``DESIGN_COLUMNS``: precision, N, D, G, seed; the BF16
baselines with G NaN), read from a config (:func:`of_config`, QAT from scratch only) or from a run table
(:func:`of_runs`, the design a study actually ran). A **truth** is the law it is simulated from: per precision the
unified law's constants and the Chinchilla law (:func:`truth`; bad input is one line before any simulation: a
precision the law has no constants for, a G it cannot evaluate).

One **replicate** (:func:`replicate`) draws, for every (N, D, seed) unit, the BF16 loss = Chinchilla(N, D) +
σ_L(N, D)·z and, for every QAT run of the unit, δ = δ_law + e_run − e_unit with e of sd σ_δ(N, D)/√2: the
baseline's own part e_unit is shared by every QAT run of the unit, as in the real paired design, and δ's sd over
seeds is σ_δ (:mod:`qatlaw.noise`). The QAT loss is baseline + δ. It then fits each precision's runs with
``fit.DeltaLaw(use_D=True).fit`` and the BF16 runs with ``fit.Chinchilla(tie=...).fit``, the code ``qatlaw fit``
runs (its Huber threshold, its handling of δ ≤ 0 runs through the baseline column ``fit.BASE``, its
identification checks). A replicate whose fit raises ``fit.FitError`` is *not identified*; when every run lies on
one D/N ray (``fit.one_ray``) it is *not separable* (γN and γD).

The **prediction** (:func:`predict`) over R replicates, per law, precision and constant: the bias (median
estimate − true value), the spread of the estimate (``spread_width``: 5th–95th percentile of the replicate
estimates, the true 90% uncertainty of the design), the share of replicates not identified, the predicted 90%
interval a study would report (``low``, ``high``, ``width``) and, for the exponents (γ, α, β; the other constants
are positive by construction), P(excl. 0), the chance that the study's interval excludes 0. Two ways, named in
column ``interval``:

- ``bootstrap`` (``boot`` > 0): every replicate's unified law is fitted with ``boot`` bootstrap resamples, the
  fit's own (cells, then seeds inside them: ``qatlaw.resample``); the interval is the median of the replicates'
  bounds, its width their median width (a typical study's: k's widths are skewed), ``width_low``–``width_high``
  the 5th–95th percentile of those widths (what one study's interval may come out as: a realized width outside
  them is one the noise model does not explain), and P(excl. 0) the share of replicate intervals that exclude 0.
  This is what a study gets, and it is wider than the spread where cells have several seeds (the two-stage
  resampling counts the seed noise at both stages: the spread was 0.71–0.92 of the bootstrap's width on 20 cells
  × 2 seeds, ``tests/test_design.py``); with 20 resamples per replicate it comes out 0.82–0.90 of a 200-resample
  bootstrap's width (a 5–95% interval of few draws is narrow). The Chinchilla law is never bootstrapped per
  replicate (its fit restarts from 16 points per resample): its rows are ``spread``.
- ``spread`` (``boot`` = 0, ~``boot`` times cheaper, what the search uses): the interval is the spread of the
  estimates, and each replicate's interval is its estimate shifted by the spread's offsets from the median. With
  one seed per cell it matches the fit's bootstrap (``tests/test_design.py``: 0.84–0.98 of its width).

Replicate r draws from ``numpy.random.default_rng([seed, r])``, so a prediction does not depend on how many
worker processes share the replicates.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from qatlaw import cost, fit, grid, laws
from qatlaw.noise import NoiseModel
from qatlaw.precision import BASELINE

DESIGN_COLUMNS = ("precision", "N", "D", "G", "seed")
BATCH = 5  # replicates per worker between two looks of a stopping rule (predict's ``stop``)
NARROW = 0.8  # a bootstrap interval below this share of the estimate's spread is noted as under-covering
EXPONENTS = ("gamma_N", "gamma_D", "gamma_G")
PREDICTION_COLUMNS = ("law", "precision", "constant", "true", "median", "low", "high", "width", "width_low",
                      "width_high", "spread_width",
                      "bias", "coverage", "p_excludes_0", "p_excludes_0_spread", "not_identified", "interval", "note")


class DesignError(laws.LawError):
    """A grid the law cannot evaluate, or a design or target that cannot be simulated."""


# ---------------------------------------------------------------------------------------------- designs

def of_config(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """The design of a validated config: every run of its grid trained in QAT from scratch (and the baselines)."""
    return of_settings(grid.grid_runs(cfg))


def of_settings(runs: list[grid.RunSettings]) -> pd.DataFrame:
    """The design of runs (those trained in QAT from scratch, and the baselines)."""
    rows = []
    for run in runs:
        if run.qat_fraction != 1:
            continue
        G = grid.effective_group(run)
        rows.append({"precision": run.precision, "size": run.size,
                     "N": float(grid.non_embedding_count(run.layers, run.hidden, run.ffn, run.heads, run.kv_heads)),
                     "D": float(run.steps * run.tokens_per_step), "G": math.nan if G is None else float(G),
                     "seed": run.seed})
    return pd.DataFrame(rows)


def of_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The design a run table ran (:func:`qatlaw.runtable.read_runs`)."""
    table = runs.loc[:, ["precision", "size", "N", "D", "G", "seed"]].copy()
    for col in ("N", "D", "G"):
        table[col] = pd.to_numeric(table[col], errors="coerce").astype(float)
    return table.reset_index(drop=True)


def cost_lines(cfg: dict) -> list[str]:
    """What a config's grid costs: ``qatlaw cost``'s report on GPUs, the summed job estimates on CPU."""
    if grid.on_gpu(cfg["training"]):
        return cost.report(cfg)[0].splitlines()
    minutes = sum(cost.wall_minutes(run, cfg["data"]["vocab_size"], cfg["training"]) for run in grid.grid_runs(cfg))
    return [f"cost: estimated {minutes / 60:.1f} hours of training on CPU, one run at a time on "
            f"{cfg['training']['threads']} threads (the job estimates of grid.estimate_resources, with their margin)"]


def fitted_precisions(design: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The QAT precisions of a design with more distinct (N, D, G) points than the unified law's constants (the
    others, e.g. one-run ablations, are no law to fit), and one line per precision left out."""
    kept, skipped = [], []
    for name, rows in design[design["precision"] != BASELINE].groupby("precision", sort=True):
        points = fit.design_points(rows)
        if points > len(fit.DELTA_CONSTANTS):
            kept.append(name)
        else:
            skipped.append(f"{name}: {points} distinct (N, D, G) point{'s' * (points != 1)}, no law to fit")
    return kept, skipped


# ---------------------------------------------------------------------------------------------- the truth

@dataclass(frozen=True)
class Truth:
    """The constants a design is simulated from: the unified law per precision and the Chinchilla law."""

    name: str
    delta: dict[str, dict[str, float]]
    chinchilla: dict[str, float]

    @property
    def tie(self) -> bool:
        """Whether the Chinchilla law ties α = β (the fit then ties them too)."""
        return math.isclose(self.chinchilla["alpha"], self.chinchilla["beta"], rel_tol=1e-12)


def _constants(law: laws.Law, name: str, precision: str) -> dict[str, float]:
    rows = law.params[(law.params["law"] == name) & (law.params["precision"] == precision)]
    return dict(zip(rows["constant"], rows["value"].astype(float)))


def truth(law: laws.Law, design: pd.DataFrame, precisions: list[str]) -> Truth:
    """The law's constants for the design's precisions; DesignError (one line) for a precision the law has no
    constants for, a G it cannot evaluate (G < 2, or another G than the one a law fitted at one G holds at), or
    no Chinchilla law."""
    delta = {}
    for name in precisions:
        if name not in law.precisions:
            raise DesignError(f"law {law.name} has no constants for precision {name} (it has: "
                              f"{', '.join(law.precisions)}); choose the grid's precisions with --precision")
        G = design.loc[design["precision"] == name, "G"].to_numpy(float)
        if not (np.isfinite(G) & (G >= 2)).all():
            raise DesignError(f"precision {name}: every run needs a group size G ≥ 2 for the law's log2 G")
        fixed = law.one_g(name)
        if fixed is not None and (G != fixed).any():
            raise DesignError(f"law {law.name} holds at G = {fixed:g} only for {name} (its gamma_G is not "
                              f"identified); the grid has G = {', '.join(f'{g:g}' for g in sorted(set(G)))}")
        delta[name] = _constants(law, "unified", name)
    chinchilla = _constants(law, "chinchilla", BASELINE)
    if not chinchilla or not np.isfinite(list(chinchilla.values())).all():
        raise DesignError(f"law {law.name} has no fitted Chinchilla law: the BF16 losses cannot be simulated")
    return Truth(law.name, delta, chinchilla)


# ---------------------------------------------------------------------------------------------- simulation

@dataclass(frozen=True)
class Plan:
    """A design ready to simulate: its runs' true values and noise, and how they group into (N, D, seed) units."""

    truth: Truth
    runs: pd.DataFrame  # the QAT runs simulated: precision, N, D, G, seed, unit, delta (true), sd (of δ)
    units: pd.DataFrame  # one row per (N, D, seed): N, D, seed, loss (true BF16), sd (of the BF16 loss)
    precisions: tuple[str, ...]


def plan(truth: Truth, design: pd.DataFrame, noise: NoiseModel, precisions: list[str]) -> Plan:
    """The simulation plan of ``precisions`` of a design (every (N, D, seed) of theirs gets a BF16 baseline)."""
    runs = design[design["precision"].isin(precisions)].reset_index(drop=True)
    units = runs[["N", "D", "seed"]].drop_duplicates().reset_index(drop=True)
    units = units.assign(unit=np.arange(len(units)))
    runs = runs.merge(units, on=["N", "D", "seed"], how="left")
    true_delta = np.empty(len(runs))
    for name in precisions:
        mine = (runs["precision"] == name).to_numpy()
        true_delta[mine] = fit.predict_delta(truth.delta[name], *(runs.loc[mine, c].to_numpy(float)
                                                                  for c in ("N", "D", "G")))
    N, D = units["N"].to_numpy(float), units["D"].to_numpy(float)
    units = units.assign(loss=fit.predict_loss(truth.chinchilla, N, D), sd=noise.loss.sd(N, D))
    runs = runs.assign(delta=true_delta, sd=noise.delta.sd(runs["N"].to_numpy(float), runs["D"].to_numpy(float)))
    return Plan(truth, runs.loc[:, ["precision", "N", "D", "G", "seed", "unit", "delta", "sd"]], units,
                tuple(precisions))


def _draw(p: Plan, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One study's BF16 loss per unit and δ per QAT run (:func:`replicate`)."""
    base = p.units["loss"].to_numpy() + p.units["sd"].to_numpy() * rng.standard_normal(len(p.units))
    unit = p.runs["unit"].to_numpy()
    half = p.runs["sd"].to_numpy() / math.sqrt(2.0)
    shared = rng.standard_normal(len(p.units))[unit]
    delta = p.runs["delta"].to_numpy() + half * (rng.standard_normal(len(p.runs)) - shared)
    return base, delta


def replicate(p: Plan, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One simulated study: its BF16 run table (N, D, seed, loss) and its δ table (precision, N, D, G, seed,
    delta, ``fit.BASE``)."""
    base, delta = _draw(p, rng)
    bf16 = p.units.loc[:, ["N", "D", "seed"]].assign(precision=BASELINE, loss=base)
    deltas = p.runs.loc[:, ["precision", "N", "D", "G", "seed"]].assign(delta=delta,
                                                                        **{fit.BASE: base[p.runs["unit"]]})
    return bf16, deltas


class _Tables:
    """The tables of :func:`replicate` made fast for many studies of one plan: the columns that do not change
    built once, a study's δ and baselines put in per study (the same tables, per precision)."""

    def __init__(self, p: Plan) -> None:
        self.unit = p.runs["unit"].to_numpy()
        self.units = {c: p.units[c].to_numpy() for c in ("N", "D", "seed")}
        self.rows = {}
        for name in p.precisions:
            mine = np.flatnonzero((p.runs["precision"] == name).to_numpy())
            cols = {c: p.runs[c].to_numpy()[mine] for c in ("precision", "N", "D", "G", "seed")}
            self.rows[name] = (mine, cols, p.runs.index[mine])

    def bf16(self, base: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({**self.units, "precision": BASELINE, "loss": base})

    def deltas(self, name: str, base: np.ndarray, delta: np.ndarray) -> pd.DataFrame:
        mine, cols, index = self.rows[name]
        return pd.DataFrame({**cols, "delta": delta[mine], fit.BASE: base[self.unit[mine]]}, index=index)


@contextlib.contextmanager
def _quiet_fits() -> Iterator[None]:
    """The fit's per-run warnings (one G, skipped resamples) silenced: a prediction counts them instead."""
    logger = logging.getLogger("qatlaw.fit")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fit_rows(law: Any, table: pd.DataFrame, boot: int, seed: int, label: tuple[str, str]) -> list[dict]:
    """One replicate's estimates of one law: a row per constant (value, and its own interval with ``boot``), or
    one row with the reason it was not identified."""
    try:
        result = law.fit(table, boot, seed)
    except fit.FitError as exc:
        ray = "" if label[0] == "chinchilla" else fit.one_ray(table)
        return [{"law": label[0], "precision": label[1], "constant": None,
                 "status": "not separable" if ray else "not identified", "reason": ray or str(exc)}]
    ci = result.ci
    return [{"law": label[0], "precision": label[1], "constant": name, "value": value, "status": "ok",
             "own_low": ci.get(name, (math.nan, math.nan))[0], "own_high": ci.get(name, (math.nan, math.nan))[1]}
            for name, value in result.constants.items()]


def fit_replicates(p: Plan, ids: list[int], seed: int, boot: int, chinchilla: bool) -> list[dict]:
    """The estimates of replicates ``ids`` (one row per replicate, law, precision and constant)."""
    rows = []
    tables = _Tables(p)
    with _quiet_fits():
        for r in ids:
            base, delta = _draw(p, np.random.default_rng([seed, r]))
            if chinchilla:
                rows += [dict(row, replicate=r) for row in _fit_rows(
                    fit.Chinchilla(tie=p.truth.tie), tables.bf16(base), 0, r, ("chinchilla", BASELINE))]
            for name in p.precisions:
                rows += [dict(row, replicate=r) for row in _fit_rows(
                    fit.DeltaLaw(use_D=True), tables.deltas(name, base, delta), boot, r, ("unified", name))]
    return rows


def _run_replicates(p: Plan, ids: list[int], seed: int, boot: int, chinchilla: bool, workers: int,
                    pool: ProcessPoolExecutor | None = None) -> list[dict]:
    """The estimates of replicates ``ids``, on ``workers`` processes (``pool``'s, or a pool of this call's)."""
    if workers <= 1 or len(ids) < 2:
        return fit_replicates(p, ids, seed, boot, chinchilla)
    n = min(len(ids), workers * 4)
    chunks = [ids[i::n] for i in range(n)]
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
        parts = pool.map(fit_replicates, *zip(*[(p, chunk, seed, boot, chinchilla) for chunk in chunks]))
        return [row for part in parts for row in part]


@contextlib.contextmanager
def processes(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Worker processes kept for many predictions (``predict(pool=...)``; the search's), None with one worker."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield pool


# ---------------------------------------------------------------------------------------------- prediction

def _true_values(p: Plan, law: str, precision: str) -> dict[str, float]:
    """The constants a fit of the plan's runs estimates: with one G among a precision's runs, k at that G."""
    if law == "chinchilla":
        values = dict(p.truth.chinchilla)
        return {c: v for c, v in values.items() if not (p.truth.tie and c == "beta")}
    values = dict(p.truth.delta[precision])
    G = p.runs.loc[p.runs["precision"] == precision, "G"].unique()
    if len(G) == 1:
        if np.isfinite(values["gamma_G"]):
            values["k"] *= math.log2(G[0]) ** values["gamma_G"]
        values["gamma_G"] = math.nan
    return values


def _shifted(est: np.ndarray, spread: tuple[float, float, float]) -> np.ndarray:
    """Each replicate's interval as the spread's: its estimate shifted by the spread's offsets from its median."""
    low, median, high = spread
    return np.column_stack([est - (median - low), est + (high - median)])


def _summary(rows: pd.DataFrame, replicates: int, true: float, boot: int, exponent: bool) -> dict:
    """One constant's prediction: with ``boot``, the typical study's interval (median of the replicates' own
    bootstrap bounds and widths); without, the spread of the estimates. P(excl. 0) and coverage count every
    replicate (one not identified excludes nothing and covers nothing)."""
    values = rows["value"].to_numpy(float)
    finite = np.isfinite(values)
    nan = math.nan
    out = {"true": true, "not_identified": 1.0 - finite.sum() / replicates,
           "interval": "bootstrap" if boot else "spread"}
    if finite.sum() < 0.5 * replicates:  # too few to say, as the fit's bootstrap
        zero = 0.0 if exponent else nan
        return dict(out, median=nan, low=nan, high=nan, width=nan, width_low=nan, width_high=nan,
                    spread_width=nan, bias=nan, coverage=0.0,
                    p_excludes_0=zero, p_excludes_0_spread=zero)
    est = values[finite]
    spread = tuple(np.quantile(est, (fit.BOOT_QUANTILES[0], 0.5, fit.BOOT_QUANTILES[1])))
    shifted = _shifted(est, spread)
    own = rows.loc[finite, ["own_low", "own_high"]].to_numpy(float) if boot else shifted
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate whose bootstrap gave no interval is NaN
        low, high = np.nanmedian(own, axis=0) if boot else (spread[0], spread[2])
        widths = own[:, 1] - own[:, 0]
        width = float(np.nanmedian(widths))
        width_low, width_high = (float(w) for w in np.nanquantile(widths, fit.BOOT_QUANTILES))
    return dict(out, median=spread[1], low=low, high=high, width=width, width_low=width_low, width_high=width_high,
                spread_width=spread[2] - spread[0],
                bias=spread[1] - true, coverage=((own[:, 0] <= true) & (true <= own[:, 1])).sum() / replicates,
                p_excludes_0=_excluding(own, replicates) if exponent else nan,
                p_excludes_0_spread=_excluding(shifted, replicates) if exponent else nan)


def _excluding(intervals: np.ndarray, replicates: int) -> float:
    """The share of the replicates whose interval excludes 0."""
    return float(((intervals[:, 0] > 0) | (intervals[:, 1] < 0)).sum() / replicates)


def _note(rows: pd.DataFrame, constant: str, summary: dict) -> str:
    """Why replicates were not identified (the fitter's first reason, or one G for γG), and a bootstrap interval
    narrower than the spread of the estimates (it under-covers)."""
    notes = []
    failed = rows[rows["status"] != "ok"]
    if not failed.empty:
        first = failed.iloc[0]
        notes.append(f"{first['status']} in {len(failed)}: {first['reason']}")
    elif constant == "gamma_G" and rows["value"].isna().all():
        notes.append("not identified: one G")
    if summary["interval"] == "bootstrap" and summary["width"] < NARROW * summary["spread_width"]:
        notes.append(f"the fit's bootstrap interval is {summary['width'] / summary['spread_width']:.2f}x the spread "
                     f"of the estimate: it under-covers on this design (coverage {summary['coverage']:.2f})")
    return "; ".join(notes)


def summarize(p: Plan, estimates: pd.DataFrame, replicates: int, boot: int) -> pd.DataFrame:
    """The prediction table (``PREDICTION_COLUMNS``) of the replicate estimates."""
    out = []
    for (law, precision), rows in estimates.groupby(["law", "precision"], sort=False):
        failed = rows[rows["status"] != "ok"]
        for constant, true in _true_values(p, law, precision).items():
            mine = pd.concat([rows[rows["constant"] == constant], failed])
            summary = _summary(mine.assign(value=mine["value"].astype(float)), replicates, true,
                               boot if law == "unified" else 0, constant in EXPONENTS + ("alpha", "beta"))
            out.append(dict(summary, law=law, precision=precision, constant=constant,
                            note=_note(mine, constant, summary)))
    return pd.DataFrame(out).loc[:, list(PREDICTION_COLUMNS)]


@dataclass(frozen=True)
class Prediction:
    """What a design resolves: the prediction table, the replicates it summarizes and the seconds it took;
    ``stopped`` when a stopping rule ended it before all the replicates asked for (the table is then of those run)."""

    table: pd.DataFrame
    replicates: int
    seconds: float
    stopped: bool = False


def estimates_frame(rows: list[dict]) -> pd.DataFrame:
    """Replicate estimates (:func:`fit_replicates`' rows) as a table in the order of the replicates, whatever the
    processes that fitted them."""
    frame = pd.DataFrame(rows)
    for col in ("value", "own_low", "own_high", "reason"):
        if col not in frame:
            frame[col] = math.nan
    return frame.sort_values("replicate", kind="stable").reset_index(drop=True) if len(frame) else frame


def predict(p: Plan, replicates: int, seed: int = 0, *, boot: int = 0, chinchilla: bool = True, workers: int = 1,
            pool: ProcessPoolExecutor | None = None,
            stop: Callable[[pd.DataFrame, int], bool] | None = None) -> Prediction:
    """R = ``replicates`` simulated studies of the plan, each fitted by the project's fitter, summarized per
    law, precision and constant (module docstring). With ``stop``, the replicates run in batches of ``BATCH`` per
    worker (in the order of r: the same studies whatever the workers), and ``stop(estimates so far, replicates run)``
    is asked after each batch; when it answers True the prediction is of the replicates run, ``stopped``."""
    if replicates < 2:
        raise DesignError(f"--replicates must be at least 2, got {replicates}")
    start = time.perf_counter()
    step = replicates if stop is None else BATCH * max(workers, 1)  # a batch shared evenly by the workers
    rows: list[dict] = []
    ran, stopped = 0, False
    while ran < replicates:
        ids = list(range(ran, min(ran + step, replicates)))
        rows += _run_replicates(p, ids, seed, boot, chinchilla, workers, pool)
        ran = ids[-1] + 1
        if stop is not None and ran < replicates and stop(estimates_frame(rows), ran):
            stopped = True
            break
    table = summarize(p, estimates_frame(rows), ran, boot)
    return Prediction(table, ran, time.perf_counter() - start, stopped)
