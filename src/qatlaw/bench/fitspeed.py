"""The ``fit`` section of the benchmark.

``fit``
    One row per law on ``--fit-runs`` synthetic runs (300): seconds to fit it from the workflow's starts
    (``--fit-inits``, default :data:`qatlaw.fit.forms.CHINCHILLA_INITS`; the δ law has one start, least squares) and
    seconds per bootstrap resample (``--fit-boot`` resamples, minus the fit without them, divided). Then one row
    for what the workflow runs: :func:`qatlaw.fit.run_fits` on the shipped ``reference/laptop`` runs with the
    shipped study's bootstrap (200; 20 with ``--quick``), when the checkout has them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

REFERENCE_RUNS = Path("reference/laptop/runs.parquet")
REFERENCE_BOOTSTRAP = 200


def synthetic_runs(n: int, seed: int = 0) -> pd.DataFrame:
    """n runs with N in [1e5, 1e9], D in [1e6, 1e10], G in {32..512}: the paper's W4A4 δ law (Table 1) and a
    Chinchilla loss with α = β, each with 1% log-normal noise."""
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e5), np.log(1e9), n))
    D = np.exp(rng.uniform(np.log(1e6), np.log(1e10), n))
    G = rng.choice([32, 64, 128, 256, 512], n)
    delta = 0.1582 * D**0.0745 * np.log2(G) ** 0.7779 / N**0.2186
    loss = 1.93 + 237.7 / N**0.3022 + 596.2 / D**0.3022
    noise = np.exp(0.01 * rng.standard_normal((2, n)))
    return pd.DataFrame({"N": N, "D": D, "G": G, "delta": delta * noise[0], "loss": loss * noise[1]})


def _seconds(fn: Callable[[], object], repeats: int = 1) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_fits(n_runs: int = 300, inits: int | None = None, n_boot: int = 20,
                 workflow_boot: int = REFERENCE_BOOTSTRAP, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Seconds of the unified δ law and the Chinchilla law on ``n_runs`` synthetic runs (Chinchilla from
    ``inits`` starts), seconds per bootstrap resample, and the workflow's run_fits on the shipped laptop runs."""
    from qatlaw import fit
    from qatlaw.fit.forms import CHINCHILLA_INITS

    inits = inits or CHINCHILLA_INITS
    runs = synthetic_runs(n_runs)
    rows = []
    laws = (("unified", fit.DeltaLaw, 1), ("chinchilla", lambda: fit.Chinchilla(inits=inits), inits))
    for name, make, starts in laws:  # a new law object per timing: Chinchilla caches its fits
        fitted = make().fit(runs)
        plain_s = _seconds(lambda make=make: make().fit(runs), repeats=2)
        per_boot = float("nan")
        if n_boot:
            boot_s = _seconds(lambda make=make: make().fit(runs, n_boot=n_boot))
            per_boot = max(0.0, boot_s - plain_s) / n_boot
        rows.append({"law": name, "runs": n_runs, "inits": starts, "fit_s": plain_s, "objective": fitted.objective,
                     "boot_resamples": n_boot, "s_per_resample": per_boot})
        log(f"  {name}: {plain_s:.2f} s for {n_runs} runs x {starts} starts, {per_boot:.4f} s per resample")
    if REFERENCE_RUNS.is_file():
        from qatlaw import runtable

        shipped = pd.read_parquet(REFERENCE_RUNS)
        t0 = time.perf_counter()
        tables = fit.run_fits(runtable.delta_table(shipped), shipped, n_boot=workflow_boot)
        wall = time.perf_counter() - t0
        rows.append({"law": "run_fits (reference/laptop)", "runs": len(shipped), "inits": CHINCHILLA_INITS,
                     "fit_s": wall, "objective": float(tables.params["objective"].sum()),
                     "boot_resamples": workflow_boot, "s_per_resample": float("nan")})
        log(f"  run_fits on {REFERENCE_RUNS} ({len(shipped)} runs, bootstrap {workflow_boot}): {wall:.1f} s")
    return pd.DataFrame(rows)
