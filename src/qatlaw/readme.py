"""The numbers the READMEs quote about a shipped study, generated from its files, so prose cannot drift from them.

A README marks each generated block with an opening and a closing comment::

    <!-- qatlaw:study laptop-v2 -->
    ...generated Markdown...
    <!-- /qatlaw -->

The opening names a block kind of ``BLOCKS`` and a study folder under ``reference/``. :func:`update` rewrites
every block of a file from the shipped files (``make readme``); :func:`stale` lists the blocks whose text differs
from what the files give (``tests/test_readme.py`` fails on any).

Block kinds:

- ``study``: runs, diverged runs, the wall time of every part, the verdict counts of FINDINGS.md, and the W4A4
  law's exponents (or those of a run table's own labels) with their intervals and the runs behind them;
- ``findings``: every finding's number, interval and verdict, as one table;
- ``split``: δ of every split run, by cell, seed and QAT fraction (the lowest of each row in bold);
- ``deltas``: δ_W4A4 of every cell, group and seed (the fit's metric);
- ``parts``: each part of a study run in parts (its command, runs, wall time, machine and commit), and each refit;
- ``formats``: each 4-bit format's δ over the paired INT4 run's, pooled with its interval (:mod:`qatlaw.formats`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from qatlaw import findings, formats, paper, split
from qatlaw.config import read_yaml
from qatlaw.errors import QatlawError
from qatlaw.io import atomic_path
from qatlaw.runtable import read_runs

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "reference"
BLOCK = re.compile(r"<!-- qatlaw:(?P<kind>[\w-]+) (?P<study>[\w.-]+) -->\n(?P<body>.*?)<!-- /qatlaw -->", re.S)


class ReadmeError(QatlawError):
    """A README block names an unknown kind or a study that is not shipped."""


def _wall(info: dict) -> tuple[float, int]:
    """Seconds of every part of a study (its run.json and the ones it restored), and the number of parts."""
    total, parts = 0.0, 0
    while info:
        total += float(info.get("wall_s") or 0.0)
        parts += 1
        info = info.get("restored")
    return total, parts


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def study_block(folder: Path) -> str:
    """Runs, wall time, verdict counts and the W4A4 law's exponents of one study."""
    runs = read_runs(folder / "runs.parquet", all_fractions=True)
    info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    seconds, parts = _wall(info)
    table = pd.read_parquet(folder / "findings.parquet")
    counts = table["verdict"].value_counts()
    lines = [f"- {len(runs)} runs, {int(runs['diverged'].sum())} diverged; {_duration(seconds)} of 2 cores"
             + (f" in {parts} parts" if parts > 1 else "") + f" ({info['machine']['cpu']}).",
             f"- FINDINGS.md, {len(table)} rows: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in findings.VERDICTS)
             + "."]
    params = pd.read_parquet(folder / "fit" / "params.parquet")
    unified = params[params["law"] == "unified"]
    cited = paper.constants()["unified"]["W4A4"]
    shown = 0
    for label in ("W4A4", *findings.outside_labels(params)):
        law = unified[unified["precision"] == label].set_index("constant")
        if not len(law) or not math.isfinite(law.loc["gamma_N", "value"]):
            continue
        shown += 1
        exps = "; ".join(f"{c.replace('gamma_', 'γ')} = {findings._number(law.loc[c, 'value'])} "
                         f"[{findings._number(law.loc[c, 'ci_low'])}, {findings._number(law.loc[c, 'ci_high'])}]"
                         + (f" (paper {cited[c]})" if label == "W4A4" else "")
                         for c in ("gamma_N", "gamma_D", "gamma_G") if math.isfinite(law.loc[c, "value"]))
        note = "" if math.isfinite(law.loc["gamma_G", "value"]) else "; γG not identified (one G)"
        lines.append(f"- {label} law on {int(law.loc['gamma_N', 'n_runs'])} runs "
                     f"({int(law.loc['gamma_N', 'n_dropped'])} left out): {exps}{note}.")
    if not shown:
        row = table[table["finding"] == "W4A4 gamma_N > 0"]
        lines.append(f"- No W4A4 law: {row['reason'].iloc[0] if len(row) else 'no W4A4 runs'}.")
    return "\n".join(lines) + "\n"


def findings_block(folder: Path) -> str:
    """Every finding of a study: its number, interval and verdict."""
    table = pd.read_parquet(folder / "findings.parquet")
    lines = ["| finding | paper | this grid | interval | verdict | n |", "|---|---|---|---|---|---|"]
    for r in table.itertuples():
        n = f"{r.n} (+{r.left_out} left out)" if r.left_out else f"{r.n}"
        lines.append(f"| {r.finding} | {r.paper} | {findings._number(r.measured)} | "
                     f"{findings._interval_cell(r.ci_low, r.ci_high, r.interval)} | {r.verdict} | {n} |")
    return "\n".join(lines) + "\n"


def split_block(folder: Path) -> str:
    """δ of every split run by cell (with S), seed and QAT fraction; the lowest δ of each row in bold."""
    metric = read_yaml(folder / "config.yaml")["fit"]["metric"]
    deltas = split.split_deltas(read_runs(folder / "runs.parquet", all_fractions=True), metric)
    table = deltas.pivot_table(index=["size", "tokens_requested", "S", "seed"], columns=split.FRACTION,
                               values="delta", aggfunc="mean")
    fractions = list(table.columns)
    head = " | ".join("f = 0 (PTQ)" if f == 0 else "1 (scratch)" if f == split.SCRATCH else f"{f:g}"
                      for f in fractions)
    lines = [f"| cell (S) | seed | {head} |", "|---|---|" + "---|" * len(fractions)]
    previous = None
    for (size, tokens, S, seed), row in table.iterrows():
        cell = f"{size} / {tokens / 1e6:g}M ({S:.3g})" if (size, tokens) != previous else ""
        previous = (size, tokens)
        best = row[[f for f in fractions if f > 0]].idxmin()
        values = [f"**{row[f]:.4f}**" if f == best else f"{row[f]:.4f}" for f in fractions]
        lines.append(f"| {cell} | {seed} | " + " | ".join(v.replace("-", "−") for v in values) + " |")
    return "\n".join(lines) + "\n"


def deltas_block(folder: Path) -> str:
    """δ_W4A4 of the fit's metric by cell (size / tokens) and by group and seed."""
    metric = read_yaml(folder / "config.yaml")["fit"]["metric"]
    decomp = pd.read_parquet(folder / "analysis" / "decomposition.parquet")
    decomp = decomp[decomp["metric"] == metric].dropna(subset=["delta_W4A4"])
    table = decomp.pivot_table(index=["N", "size", "tokens_requested"], columns=["G", "seed"], values="delta_W4A4")
    columns = list(table.columns)
    lines = ["| size / tokens | " + " | ".join(f"G{g} seed {s}" for g, s in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for (_, size, tokens), row in table.iterrows():
        cells = ["" if pd.isna(row[c]) else f"{row[c]:.3f}".replace("-", "−") for c in columns]
        lines.append(f"| {size} / {tokens / 1e6:g}M | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def formats_block(folder: Path) -> str:
    """Each format's pooled ratio to INT4, its interval and where that lies against 1."""
    metric = read_yaml(folder / "config.yaml")["fit"]["metric"]
    table = formats.pooled(formats.pairs(read_runs(folder / "runs.parquet"), metric))
    lines = ["| format | δ / δ INT4 (pooled) | 90% interval | against 1 | (cell, seed) pairs |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.precision} | {r.ratio:.2f} | [{r.low:.2f}, {r.high:.2f}] | "
                     f"{formats.against_one(r.low, r.high)} | {r.pairs} |")
    return "\n".join(lines) + "\n"


def parts_block(folder: Path) -> str:
    """The parts of a study (earliest first) and its refits, from its run.json."""
    info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    parts = []
    while info:
        parts.append(info)
        info = info.get("restored")
    lines = ["| part | command | wall | machine | commit |", "|---|---|---|---|---|"]
    for i, part in enumerate(reversed(parts), start=1):
        lines.append(f"| {i} | `{part['command']}` | {part['wall_s']:,.0f} s | {part['machine']['cpu']} | "
                     f"{part['commit'][:7]} |")
    for refit in parts[0].get("refits", []):
        lines.append(f"| refit | `{refit['command']}` (no run retrained) | {refit['seconds']:,.0f} s | "
                     f"{refit['machine']['cpu']} | {refit['commit'][:7]} |")
    return "\n".join(lines) + "\n"


BLOCKS: dict[str, Callable[[Path], str]] = {"study": study_block, "findings": findings_block, "split": split_block,
                                            "deltas": deltas_block, "parts": parts_block, "formats": formats_block}


def _render(match: re.Match) -> str:
    kind, study = match["kind"], match["study"]
    if kind not in BLOCKS:
        raise ReadmeError(f"README block qatlaw:{kind}: unknown kind (one of {', '.join(BLOCKS)})")
    folder = REFERENCE / study
    if not (folder / "run.json").is_file():
        raise ReadmeError(f"README block qatlaw:{kind} {study}: no shipped study {folder}")
    return f"<!-- qatlaw:{kind} {study} -->\n{BLOCKS[kind](folder)}<!-- /qatlaw -->"


def stale(path: str | Path) -> list[str]:
    """The blocks of a Markdown file whose text differs from what the shipped files give (as ``kind study``)."""
    text = Path(path).read_text(encoding="utf-8")
    return [f"{m['kind']} {m['study']}" for m in BLOCK.finditer(text) if _render(m) != m.group(0)]


def update(path: str | Path) -> int:
    """Rewrite every block of a Markdown file from the shipped files; the number of blocks."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rendered = BLOCK.sub(_render, text)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(rendered, encoding="utf-8")
    return len(BLOCK.findall(text))
