"""The cheapest grid that measures a law: a search over grids (sizes, token budgets as multiples of D/N, group
sizes, seeds per cell) whose predicted intervals (:mod:`qatlaw.design`) meet a target, within a budget of node-days.

The space: every subset of two or more of the given sizes (models of the base config), every subset of
``MIN_VALUES``–``MAX_VALUES`` of the D/N ratios and of the group sizes (one would leave γN and γD, or γG, not
identified), and every seed count; each size trains every ratio (D = ratio × N, rounded to two significant
digits), every precision at every G, a BF16 baseline per (size, D, seed). A grid costs the GPU-hours of its runs at
``qatlaw cost``'s rate (:func:`qatlaw.cost.run_plan`), and a node-day is ``training.gpus_per_node`` × 24 of them
(the node kept busy, one run after another on its GPUs).

The search sorts the grids within the budget by cost and goes through them cheapest first. A grid whose
P(excl. 0) by the linearized law (:func:`approximate_power`: generalized least squares of log δ, close to the fit
but not it) falls more than ``APPROX_MARGIN`` short of the target is skipped; the others are simulated, each with
``SCREEN_REPLICATES`` studies and the spread of the estimates (``boot`` 0, cheap); one that meets the target is
simulated again with ``QUICK_REPLICATES`` studies bootstrapped ``QUICK_BOOT`` times as the fit does (on few cells
the fit's bootstrap is much wider than the spread), and one that still meets it is checked with the full
prediction (``--replicates`` studies, each bootstrapped ``--boot`` times as the fit
does), and is the answer if it still meets it; otherwise the search goes on. The target: every exponent of every
precision (γN, γD, γG) has P(its interval excludes 0) ≥ ``power``, both for the fit's bootstrap interval and for
the spread of its estimate (on a grid of few cells the bootstrap is narrower than the spread: it would exclude 0
without measuring anything), its bootstrap interval covers the true value in at least ``MIN_COVERAGE`` of studies
(judged at the full check only: the screens' intervals of 40 studies, or of 10 resamples, are too rough), and, if
given, its predicted half-width is at most ``max_rel_halfwidth`` of its true value. The answer is written as a
config overlay (:func:`overlay`) with its cost.

A bootstrapped stage stops early once its grid can neither meet the target nor beat the best grid so far, counting
every study still to run as a success (:func:`_check`, :func:`_ceiling`): exact, the answer is the one every study
would give. The worker processes are kept for the whole search, and every answer says how many grids each stage
took and how long (:class:`Effort`).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import yaml

from qatlaw import config, cost, design, fit, grid, laws, noise
from qatlaw.errors import ConfigError
from qatlaw.io import atomic_path

log = logging.getLogger("qatlaw.design")

MIN_VALUES, MAX_VALUES = 2, 3
SCREEN_REPLICATES = 40
MIN_COVERAGE = 0.8  # of the nominal 0.9: a design whose intervals miss the true value more often measures nothing
QUICK_REPLICATES, QUICK_BOOT = 20, 10  # the second screen: a few studies bootstrapped as the fit does
APPROX_MARGIN = 0.2  # a grid whose linearized power is this far below the target is not simulated
DEFAULT_RATIOS = (10, 20, 40, 80, 160, 320)
DEFAULT_SEEDS = (1, 2)


@dataclass(frozen=True)
class Candidate:
    """One grid of the space and its cost."""

    sizes: tuple[str, ...]
    ratios: tuple[float, ...]
    groups: tuple[int | str, ...]
    seeds: int
    gpu_hours: float

    def describe(self) -> str:
        return (f"sizes {', '.join(self.sizes)}; D/N {', '.join(f'{r:g}' for r in self.ratios)}; G "
                f"{', '.join(map(str, self.groups))}; {self.seeds} seed{'s' * (self.seeds > 1)}")


def tokens(cfg: Mapping[str, Any], size: str, ratio: float) -> int:
    """D = ratio × N of a size, to two significant digits."""
    arch = cfg["models"][size]
    N = grid.non_embedding_count(arch["layers"], arch["hidden"], arch["ffn"], arch["heads"], arch["kv_heads"])
    exact = ratio * N
    scale = 10 ** (math.floor(math.log10(exact)) - 1)
    return int(round(exact / scale) * scale)


def overlay(cfg: Mapping[str, Any], c: Candidate, precisions: list[str]) -> dict:
    """The config overlay of a candidate: the first size in the main grid, the others as sub-grids (each its own
    token budgets), no ablation, every run on one node's GPUs (so one run per job)."""
    subs = [{"sizes": [s], "tokens": [grid.format_tokens(tokens(cfg, s, r)) for r in c.ratios],
             "groups": list(c.groups), "precisions": list(precisions), "seeds": list(range(c.seeds))} for s in c.sizes]
    main = dict(subs[0], extra=subs[1:] or None, ablation=None)
    gpus = cfg["training"]["gpus_per_node"]
    return {"grid": main, "training": {"gpus_per_run": {s: gpus for s in c.sizes}, "runs_per_job": 1}}


def candidates(cfg: Mapping[str, Any], sizes: list[str], ratios: list[float], groups: list, seeds: list[int],
               n_precisions: int) -> list[Candidate]:
    """Every grid of the space with its GPU-hours, cheapest first."""
    hours: dict[tuple[str, float], float] = {}
    for size, ratio in itertools.product(sizes, ratios):
        run = grid.run_settings(cfg, size, tokens(cfg, size, ratio), "BF16", None, 0)
        hours[size, ratio] = cost.run_plan(run, cfg).gpu_hours
    out = []
    for k in range(2, len(sizes) + 1):
        for ss, rs, gs, n in itertools.product(itertools.combinations(sizes, k), _subsets(ratios),
                                               _subsets(groups), seeds):
            runs_per_cell = (1 + len(gs) * n_precisions) * n
            out.append(Candidate(ss, rs, gs, n, sum(hours[s, r] for s in ss for r in rs) * runs_per_cell))
    return sorted(out, key=lambda c: (c.gpu_hours, c.describe()))


def _subsets(values: list) -> Iterator[tuple]:
    for k in range(MIN_VALUES, min(MAX_VALUES, len(values)) + 1):
        yield from itertools.combinations(values, k)


@dataclass(frozen=True)
class Target:
    """What a grid must resolve."""

    power: float
    max_rel_halfwidth: float | None

    def resolved(self, table: pd.DataFrame, coverage: bool = True) -> pd.Series:
        """Per exponent row of a prediction (unified law): whether it meets the target (its coverage too, unless
        not ``coverage``)."""
        rows = table[(table["law"] == "unified") & table["constant"].isin(design.EXPONENTS)]
        ok = rows[["p_excludes_0", "p_excludes_0_spread"]].min(axis=1) >= self.power
        if coverage:
            ok &= rows["coverage"] >= MIN_COVERAGE
        if self.max_rel_halfwidth is not None:
            ok &= rows["width"] / 2 <= self.max_rel_halfwidth * rows["true"].abs()
        return ok.set_axis(rows["precision"] + " " + rows["constant"])

    def describe(self) -> str:
        width = "" if self.max_rel_halfwidth is None else \
            f" and half-width at most {self.max_rel_halfwidth:.0%} of its value"
        return (f"every exponent's interval excludes 0 with probability at least {self.power:g} (the fit's "
                f"bootstrap interval, and the spread of its estimate) and covers its value in at least "
                f"{MIN_COVERAGE:g} of studies{width}")


def _lines(table: pd.DataFrame, target: Target) -> str:
    rows = table[(table["law"] == "unified") & table["constant"].isin(design.EXPONENTS)]
    met = target.resolved(table).to_numpy()
    return "; ".join(f"{r.precision} {r.constant} P(excl. 0) {r.p_excludes_0:.2f} (spread "
                     f"{r.p_excludes_0_spread:.2f}, coverage {r.coverage:.2f}){'' if ok else ' (not met)'}"
                     for r, ok in zip(rows.itertuples(), met))


def approximate_power(plan: design.Plan, precision: str) -> dict[str, float]:
    """P(excl. 0) of each exponent by the linearized law: generalized least squares of log δ with the simulation's
    covariance (sd σ_δ/δ per run; runs of one (N, D, seed) unit share half the variance, their baseline's), the 90%
    interval ±1.645 standard errors. It is not the fit (Huber, runs as if independent, a bootstrap interval), only
    close to it: on the grids checked by hand it was within 0.15 of the simulated P(excl. 0), both above and below,
    so it only skips grids ``APPROX_MARGIN`` below the target."""
    from scipy.stats import norm

    runs = plan.runs[plan.runs["precision"] == precision]
    x = fit.DeltaLaw().design_matrix(runs[["N", "D", "G"]].astype(float))
    scale = (runs["sd"] / runs["delta"]).to_numpy(float)  # sd of log δ
    unit = runs["unit"].to_numpy()
    cov = 0.5 * np.outer(scale, scale) * (1.0 + np.eye(len(runs))) * (unit[:, None] == unit[None, :])
    se = np.sqrt(np.clip(np.diag(np.linalg.pinv(x.T @ np.linalg.solve(cov, x)))[1:], 0, None))
    true = plan.truth.delta[precision]
    return {c: float(norm.cdf(abs(true[c]) / s - norm.ppf(fit.BOOT_QUANTILES[1]))) if s > 0 else 0.0
            for c, s in zip(design.EXPONENTS, se)}


def _group(value: int | str) -> int | str:
    """A group size: ``channel`` or an integer of at least 2."""
    if value == "channel" or (str(value).isdigit() and int(value) >= 2):
        return value if value == "channel" else int(value)
    raise design.DesignError(f"--groups: {value!r} is neither an integer of at least 2 nor 'channel'")


@dataclass(frozen=True)
class Search:
    """What a search needs besides the space: the base config, the law, the noise, the target and the effort."""

    cfg: dict
    precisions: list[str]
    law: laws.Law
    noise: noise.NoiseModel
    target: Target
    replicates: int
    boot: int
    seed: int
    workers: int

    def config_of(self, c: Candidate) -> dict:
        return config.load(self.cfg, overlay(self.cfg, c, self.precisions), check_files=False)

    def plan(self, c: Candidate) -> design.Plan:
        """The simulation plan of a candidate's runs (its config not validated: :meth:`config_of` does that)."""
        runs = [grid.run_settings(self.cfg, size, tokens(self.cfg, size, ratio), p, g, seed)
                for size, ratio, seed in itertools.product(c.sizes, c.ratios, range(c.seeds))
                for p, g in [("BF16", None), *itertools.product(self.precisions, c.groups)]]
        table = design.of_settings(runs)
        return design.plan(design.truth(self.law, table, self.precisions), table, self.noise, self.precisions)


STAGES = ("spread screen", "quick bootstrap", "full bootstrap")


@dataclass
class Effort:
    """How much a search did and where its time went."""

    in_budget: int
    workers: int
    skipped: int = 0  # by the linearized law's power (approximate_power)
    simulated: int = 0
    stopped: int = 0  # simulated grids whose check stopped early (:func:`_check`)
    screen_seconds: float = 0.0  # of the linearized law's power
    stage_grids: list[int] = field(default_factory=lambda: [0] * len(STAGES))
    stage_seconds: list[float] = field(default_factory=lambda: [0.0] * len(STAGES))
    seconds: float = 0.0

    def describe(self) -> str:
        stages = ", ".join(f"{name} {n} ({t:.0f} s)" for name, n, t in zip(STAGES, self.stage_grids,
                                                                            self.stage_seconds))
        return (f"of the {self.in_budget} grids within the budget, cheapest first, {self.skipped} skipped by the "
                f"linearized law's power ({self.screen_seconds:.0f} s) and {self.simulated} simulated; grids per "
                f"stage: {stages}; {self.stopped} stopped early in a bootstrapped stage (unable to meet the target "
                f"or beat the best); {self.seconds:.0f} s on {self.workers} worker(s)")


@dataclass(frozen=True)
class Found:
    """The answer of a search: the grid, its full prediction, and how much was searched."""

    candidate: Candidate
    prediction: design.Prediction
    effort: Effort


Score = tuple  # (the stage a grid reached, + 1 if it met the target there; exponents met; their smallest P(excl. 0))


def _score(stage: int, met: pd.Series, table: pd.DataFrame) -> Score:
    exponents = table.loc[table["constant"].isin(design.EXPONENTS), "p_excludes_0"]
    return stage + bool(met.all()), int(met.sum()), float(exponents.min())


def _ceiling(s: Search, plan: design.Plan, estimates: pd.DataFrame, ran: int, replicates: int,
             coverage: bool) -> tuple[bool, tuple[int, float]]:
    """What a stage of ``replicates`` bootstrapped studies can still reach after the first ``ran``: whether it
    can still meet the target, and the most exponents it can still meet with the highest smallest P(excl. 0). A
    study's own bootstrap interval does not depend on the others, so every study still to run counts as one that
    excludes 0 and covers the true value; the rest of the target (the spread's P(excl. 0), the half-width) is
    taken as met. So these are upper bounds, exact as the prediction's own counts (:func:`design._summary`)."""
    left = replicates - ran
    met, powers = [], []
    for precision in plan.precisions:
        true = design._true_values(plan, "unified", precision)
        for constant in design.EXPONENTS:
            rows = estimates[(estimates["law"] == "unified") & (estimates["precision"] == precision)
                             & (estimates["constant"] == constant) & (estimates["status"] == "ok")]
            low, high = rows["own_low"].to_numpy(float), rows["own_high"].to_numpy(float)
            power = float(((low > 0) | (high < 0)).sum() + left) / replicates
            covered = float(((low <= true[constant]) & (true[constant] <= high)).sum() + left) / replicates
            met.append(power >= s.target.power and (not coverage or covered >= MIN_COVERAGE))
            powers.append(power)
    return all(met), (sum(met), min(powers))


def _check(s: Search, plan: design.Plan, best: Score | None = None, pool: ProcessPoolExecutor | None = None,
           effort: Effort | None = None) -> tuple[Score, pd.DataFrame, str]:
    """A grid through the stages of the search (spread screen, quick bootstrap, full bootstrap) until one fails:
    its score (the stage it reached, the exponents met there, their smallest P(excl. 0)), that stage's prediction
    and what the stage was.

    A bootstrapped stage stops early (curtailed, looked at every ``design.BATCH`` studies) once it can no longer
    meet the target and can no longer score above ``best`` (:func:`_ceiling`): the grid then fails and is not the
    best found, as it would be with every study run, so the answer of a search is the same. Its score is then
    the ceiling (below ``best``) and its table of the studies run."""
    stages = ((SCREEN_REPLICATES, 0), (QUICK_REPLICATES, QUICK_BOOT), (s.replicates, s.boot))
    for stage, (replicates, boot) in enumerate(stages):
        coverage = stage == len(stages) - 1
        ceiling: list[Score] = []

        def hopeless(estimates: pd.DataFrame, ran: int, replicates=replicates, coverage=coverage,
                     stage=stage, ceiling=ceiling) -> bool:
            can_meet, (n_met, power) = _ceiling(s, plan, estimates, ran, replicates, coverage)
            ceiling[:] = [(stage, n_met, power)]
            return not can_meet and best is not None and ceiling[0] < best

        stop = hopeless if boot and best is not None else None
        prediction = design.predict(plan, replicates, s.seed, boot=boot, chinchilla=False, workers=s.workers,
                                    pool=pool, stop=stop)
        table = prediction.table
        if effort is not None:
            effort.stage_grids[stage] += 1
            effort.stage_seconds[stage] += prediction.seconds
            effort.stopped += prediction.stopped
        how = f"{replicates} studies" + (f" bootstrapped {boot} times" if boot else ", spread")
        if prediction.stopped:
            return ceiling[0], table, f"{how}, stopped after {prediction.replicates}"
        met = s.target.resolved(table, coverage=coverage)
        if not met.all():
            break
    return _score(stage, met, table), table, how


def search(s: Search, space: list[Candidate], budget_gpu_hours: float, max_grids: int, curtail: bool = True) -> Found:
    """The cheapest grid of ``space`` within the budget that meets the target (module docstring; without
    ``curtail`` every stage runs all its studies, the same answer more slowly: :func:`_check`); DesignError
    (one line) when none is within the budget (before any simulation) or none meets the target (naming the
    best one found, the one that went furthest through the checks, and what it resolves there, and what the
    search did and how long it took)."""
    start = time.perf_counter()
    within = [c for c in space if c.gpu_hours <= budget_gpu_hours]
    if not within:
        cheapest = space[0]
        raise design.DesignError(f"no grid of the space fits the budget of {budget_gpu_hours:,.0f} GPU-hours: the "
                                 f"cheapest, {cheapest.describe()}, costs {cheapest.gpu_hours:,.0f}")
    s.plan(within[0])  # a precision or G the law cannot evaluate: one line, before any simulation
    best: tuple[Score, Candidate, pd.DataFrame, str] | None = None
    effort = Effort(len(within), s.workers)
    with design.processes(s.workers) as pool:
        for c in within[:max_grids]:
            screen = time.perf_counter()
            plan = s.plan(c)
            low = any(min(approximate_power(plan, p).values()) < s.target.power - APPROX_MARGIN for p in s.precisions)
            effort.screen_seconds += time.perf_counter() - screen
            if low:
                effort.skipped += 1
                continue
            try:
                s.config_of(c)
            except ConfigError:  # e.g. a group size that does not divide a size's layer inputs: not a grid
                continue
            effort.simulated += 1
            score, table, how = _check(s, plan, None if best is None or not curtail else best[0], pool, effort)
            if score[0] >= 1:
                log.info("%s (%.0f GPU-hours), in %s: %s", c.describe(), c.gpu_hours, how, _lines(table, s.target))
            if best is None or score > best[0]:
                best = (score, c, table, how)
            if score[0] == 3:
                effort.seconds = time.perf_counter() - start
                return Found(c, design.Prediction(table, s.replicates, math.nan), effort)
    effort.seconds = time.perf_counter() - start
    searched = f"the {min(max_grids, len(within))} cheapest of {len(within)}"
    if best is None:
        raise design.DesignError(f"no grid among {searched} grids within the budget meets the target "
                                 f"({s.target.describe()}): the linearized law's power falls short by more than "
                                 f"{APPROX_MARGIN:g} for every one (search: {effort.describe()})")
    raise design.DesignError(f"no grid among {searched} grids within the budget meets the target "
                             f"({s.target.describe()}); the best found, {best[1].describe()} "
                             f"({best[1].gpu_hours:,.0f} GPU-hours), resolves in {best[3]}: "
                             f"{_lines(best[2], s.target)} (search: {effort.describe()})")


def write_overlay(path: str, found: Found, s: Search, header: list[str]) -> None:
    """The grid found as a config overlay, with a comment header saying what it costs and resolves."""
    body = yaml.safe_dump(overlay(s.cfg, found.candidate, s.precisions), sort_keys=False, default_flow_style=None,
                          width=120)
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header)
    with atomic_path(path) as tmp:
        tmp.write_text(comments + body, encoding="utf-8")


def run(args: argparse.Namespace) -> None:
    """``qatlaw design --search``: print (and with --write, write) the cheapest grid that meets the target."""
    overlay_vocab = {} if args.vocab_size is None else {"data": {"vocab_size": args.vocab_size}}
    cfg = config.load(*args.grid, overlay_vocab, check_files=args.vocab_size is None)
    sizes = [x.strip() for x in args.sizes.split(",")] if args.sizes else list(cfg["grid"]["sizes"])
    unknown = [x for x in sizes if x not in cfg["models"]]
    if unknown:
        raise design.DesignError(f"--sizes {', '.join(unknown)}: not in the models table of the base config")
    ratios = args.ratios or list(DEFAULT_RATIOS)  # finite and positive: cli.argtypes
    groups = [_group(g) for g in (args.groups.split(",") if args.groups else cfg["grid"]["groups"])]
    seeds = args.seeds or list(DEFAULT_SEEDS)
    precisions = [p.strip() for p in (args.precision or "W4A4").split(",")]
    if not 0 < args.power <= 1:
        raise design.DesignError(f"--power is a probability in (0, 1], got {args.power}")
    target = Target(args.power, args.max_rel_halfwidth)
    s = Search(cfg, precisions, laws.load(args.law), noise.load(args.noise, args.metric), target,
               args.replicates, args.boot, args.seed, args.workers)
    budget = args.budget_node_days * 24 * cfg["training"]["gpus_per_node"]
    space = candidates(cfg, sizes, ratios, groups, seeds, len(precisions))
    found = search(s, space, budget, args.max_grids)
    lines = _report(found, s, budget, args)
    print("\n".join(lines))
    print(found.prediction.table.drop(columns=["note"]).to_markdown(index=False, floatfmt=".3g"))
    if args.write:
        write_overlay(args.write, found, s, lines)
        print(f"wrote {args.write}")


def _report(found: Found, s: Search, budget: float, args: argparse.Namespace) -> list[str]:
    c, gpus = found.candidate, s.cfg["training"]["gpus_per_node"]
    days = c.gpu_hours / gpus / 24
    return [
        f"grid found: {c.describe()}; precisions {', '.join(s.precisions)}",
        f"cost: {c.gpu_hours:,.0f} GPU-hours = {days:.2f} days of one {gpus}-GPU node (budget {budget:,.0f} "
        f"GPU-hours = {args.budget_node_days:g} node-days)",
        *design.cost_lines(s.config_of(c)),
        f"law {s.law.name}: {s.law.source}",
        s.noise.describe(),
        f"target: {s.target.describe()}",
        f"resolves: {_lines(found.prediction.table, s.target)}",
        f"search: {found.effort.describe()}; the answer checked with {found.prediction.replicates} studies "
        f"(bootstrap of {s.boot})",
    ]
