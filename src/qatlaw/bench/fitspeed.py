"""The ``fit`` section of the benchmark.

``fit``
    Seconds to fit ``--fit-runs`` synthetic runs (300) from ``--fit-inits`` starts (1000) with
    :func:`qatlaw.fit.fit_delta` (unified δ law) and :func:`qatlaw.fit.fit_chinchilla`, and seconds per
    bootstrap resample (``--fit-boot`` resamples at the default starts, minus the fit without them, divided).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import pandas as pd


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


def measure_fits(n_runs: int = 300, inits: int = 1000, n_boot: int = 20,
                 log: Callable[[str], None] = print) -> pd.DataFrame:
    """Seconds of fit_delta and fit_chinchilla on ``n_runs`` synthetic runs from ``inits`` starts, and seconds
    per bootstrap resample (at the default starts); one row per law."""
    from qatlaw import fit

    runs = synthetic_runs(n_runs)
    rows = []
    for law, fn in (("unified (fit_delta)", fit.fit_delta), ("chinchilla (fit_chinchilla)", fit.fit_chinchilla)):
        t0 = time.perf_counter()
        out = fn(runs, inits=inits)
        fit_s = time.perf_counter() - t0
        plain_s = math.inf
        for _ in range(2):  # the better of two, so the difference below is the resamples' time
            t0 = time.perf_counter()
            fn(runs)
            plain_s = min(plain_s, time.perf_counter() - t0)
        per_boot = float("nan")
        if n_boot:
            t0 = time.perf_counter()
            fn(runs, n_boot=n_boot)
            per_boot = max(0.0, time.perf_counter() - t0 - plain_s) / n_boot
        rows.append({"law": law, "runs": n_runs, "inits": inits, "fit_s": fit_s, "objective": out["objective"],
                     "default_inits_s": plain_s, "boot_resamples": n_boot, "s_per_resample": per_boot})
        log(f"  {law}: {fit_s:.2f} s for {n_runs} runs x {inits} starts, {per_boot:.4f} s per resample")
    return pd.DataFrame(rows)
