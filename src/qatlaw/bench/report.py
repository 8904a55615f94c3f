"""The benchmark's report: Markdown tables and every target as measured vs its bound (``targets.parquet``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

TARGETS = {"quant_ratio": 1.10, "frac_peak": 0.50, "fit_s": 10.0, "rss_mib": 2048.0, "bench_s": 300.0,
           "train_rss_growth_mb": 64.0}


def _fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "–"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(value)


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table."""
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def targets(train: pd.DataFrame | None, fits: pd.DataFrame | None, pipeline: dict | None,
            conc: pd.DataFrame | None, bench_s: float | None, data: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every target of the issue as measured vs its bound (``met`` is None where there is no bound)."""
    rows = []

    def add(what: str, measured: float, bound: float | None, better: str) -> None:
        met = None if bound is None or not math.isfinite(measured) else (
            measured <= bound if better == "max" else measured >= bound)
        rows.append({"target": what, "measured": measured, "bound": bound if bound is not None else float("nan"),
                     "met": met})

    if train is not None and len(train):
        for row in train[train["precision"] != "BF16"].itertuples():
            same = row.mode == "eager" and math.isfinite(row.ratio_same_model)
            add(f"W4A4 step / unquantized step, {row.size} G={row.group} {row.mode}"
                f"{' (same model)' if same else ' (vs FP32 model)'}", row.ratio_same_model if same else row.ratio,
                TARGETS["quant_ratio"], "max")
        largest = train[train["size"] == train["size"].iloc[-1]]
        for mode, part in largest[largest["precision"] == "BF16"].groupby("mode", sort=False):
            add(f"training / matmul peak, {part['size'].iloc[0]} FP32 {mode}", float(part["frac_peak"].iloc[0]),
                TARGETS["frac_peak"], "min")
    if conc is not None and len(conc):
        for row in conc[conc["processes"] == 2].itertuples():
            add(f"2 jobs x 1 thread / 1 job x 2 threads (tokens/s), {row.size}", row.vs_other_layout, None, "min")
    if fits is not None:
        for row in fits[fits["law"].isin(["unified", "chinchilla"])].itertuples():
            add(f"fit {row.law}: {row.runs} runs x {row.inits} starts (s)", row.fit_s, TARGETS["fit_s"], "max")
    if pipeline is not None:
        add("peak RSS of a train job (MiB, from results/benchmarks)", pipeline["max_train_rss_mib"],
            TARGETS["rss_mib"], "max")
        add("workflow share outside training loops", pipeline["outside_training_share"], None, "max")
    if conc is not None and len(conc):
        add("peak RSS of a bench training process (MiB)", float(conc["maxrss_mib"].max()), TARGETS["rss_mib"], "max")
    if data is not None and len(data) > 1:
        add(f"training job peak RSS growth, {data['corpus_tokens'].iloc[0]:,} -> {data['corpus_tokens'].iloc[-1]:,} "
            "tokens (MB)", float(data["train_rss_growth_mb"].iloc[-1]), TARGETS["train_rss_growth_mb"], "max")
    if bench_s is not None:
        add("benchmark run time (s)", bench_s, TARGETS["bench_s"], "max")
    return pd.DataFrame(rows, columns=["target", "measured", "bound", "met"])
