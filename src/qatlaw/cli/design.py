"""The subcommand that designs a grid before it runs: ``design`` (what a grid will resolve and what it costs, beside
what a study actually got, and the search for the cheapest grid that resolves a law; :mod:`qatlaw.design`
simulates, :mod:`qatlaw.design_search` searches)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

HELP = "predict what a grid resolves (90%% intervals of the law's constants) and costs, or search the cheapest grid"
COMPARE_COLUMNS = ("actual_low", "actual_high", "actual_width", "ratio", "within")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The subcommand ``design``."""
    from qatlaw.cli.argtypes import counts, numbers, positive
    from qatlaw.config import schema_key

    s = sub.add_parser("design", help=HELP)
    s.add_argument("grid", nargs="+", help="config files (merged in order) or one run table (runs.parquet): the "
                                           "design; with --search, the base config the grids are overlays of")
    s.add_argument("--law", default="paper", help="the law simulated: paper, laptop, quartet or a fit folder")
    s.add_argument("--noise", required=True, help="sd of δ and of the BF16 loss in nats (a number), a run table "
                                                  "with repeated seeds, or a fit folder (its residual spread)")
    s.add_argument("--precision", help="comma-separated QAT precisions (default: those of the grid with a law to fit)")
    s.add_argument("--replicates", type=int, default=100, help="simulated studies (default 100)")
    s.add_argument("--boot", type=int, default=20, help="bootstrap resamples per simulated study, the fit's own "
                                                        "(default 20; 0: the spread of the estimates)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    s.add_argument("--no-chinchilla", action="store_true", help="leave out the Chinchilla fit of the BF16 runs")
    metric = schema_key("fit", "metric")
    s.add_argument("--metric", choices=metric["enum"], default=metric["default"],
                   help="the loss a run table's noise is measured on")
    s.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary; given, no data file is read")
    s.add_argument("--compare", help="a fit folder (params.parquet): its actual intervals beside the prediction")
    s.add_argument("--out", help="Parquet file: the prediction table")
    search = s.add_argument_group("search (--search)")
    search.add_argument("--search", action="store_true", help="find the cheapest grid that meets the target")
    search.add_argument("--sizes", help="model sizes of the base config to choose from (comma-separated)")
    search.add_argument("--ratios", type=numbers, help="token budgets as D/N (comma-separated positive numbers; "
                                                       "default 10,20,40,80,160,320)")
    search.add_argument("--groups", help="group sizes (comma-separated)")
    search.add_argument("--seeds", type=counts, help="seeds per cell to try (comma-separated counts; default 1,2)")
    search.add_argument("--budget-node-days", type=positive, default=3.0, help="at most this many days of one node")
    search.add_argument("--power", type=float, default=0.8,
                        help="a constant is resolved when P(its interval excludes 0) is at least this")
    search.add_argument("--max-rel-halfwidth", type=positive,
                        help="and its interval's half-width is at most this share of its value")
    search.add_argument("--max-grids", type=int, default=300, help="simulate at most this many grids, cheapest first")
    search.add_argument("--write", help="write the grid found as a config overlay (YAML) with its cost")
    s.set_defaults(func=run)


def _design(args: argparse.Namespace) -> tuple[pd.DataFrame, str, list[str]]:
    """The design, how it is described, and its cost lines."""
    import pandas as pd

    from qatlaw import config, design, runtable

    if len(args.grid) == 1 and args.grid[0].endswith(".parquet"):
        runs = runtable.read_runs(args.grid[0])
        table = design.of_runs(runs)
        if "wall_s" in runs.columns:
            hours = float(pd.to_numeric(runs["wall_s"], errors="coerce").sum()) / 3600
            cost = [f"cost: measured, {hours:.1f} hours of training (the sum of the runs' wall_s)"]
        else:
            cost = ["cost: not known (the run table has no wall times)"]
        return table, f"the runs of {args.grid[0]}", cost
    overlay = {} if args.vocab_size is None else {"data": {"vocab_size": args.vocab_size}}
    cfg = config.load(*args.grid, overlay, check_files=args.vocab_size is None)
    return design.of_config(cfg), f"the grid of {' + '.join(args.grid)}", design.cost_lines(cfg)


def with_actual(table: pd.DataFrame, folder: str) -> pd.DataFrame:
    """The prediction with the actual intervals of a fit folder and the ratio of the widths (predicted / actual)."""
    from qatlaw import fit

    params = fit.read_params(Path(folder) / "params.parquet")
    actual = params.loc[:, ["law", "precision", "constant", "ci_low", "ci_high"]].rename(
        columns={"ci_low": "actual_low", "ci_high": "actual_high"})
    out = table.merge(actual, on=["law", "precision", "constant"], how="left")
    out["actual_width"] = out["actual_high"] - out["actual_low"]
    out["ratio"] = out["width"] / out["actual_width"]
    # whether the width the study got is one a simulated study gets (5th-95th percentile of their widths)
    out["within"] = (out["width_low"] <= out["actual_width"]) & (out["actual_width"] <= out["width_high"])
    return out


def compared_resamples(folder: str) -> int:
    """The most bootstrap resamples behind a fit folder's intervals (0 without ``bootstrap.parquet``)."""
    from qatlaw.io import read_parquet

    path = Path(folder) / "bootstrap.parquet"
    if not path.is_file():
        return 0
    draws = read_parquet(path, ("law", "precision", "draw"), "bootstrap table")
    return int(draws.groupby(["law", "precision"])["draw"].nunique().max()) if len(draws) else 0


def _precisions(args: argparse.Namespace, table: pd.DataFrame) -> tuple[list[str], list[str]]:
    from qatlaw import design

    if args.precision:
        return [p.strip() for p in args.precision.split(",") if p.strip()], []
    return design.fitted_precisions(table)


def _show(table: pd.DataFrame) -> str:
    """The prediction as a Markdown table (its notes are printed below it)."""
    return table.drop(columns=["note"]).to_markdown(index=False, floatfmt=".3g")


def run(args: argparse.Namespace) -> None:
    """Print the prediction of a grid (or, with --search, search one)."""
    from qatlaw import design, laws, noise

    if args.search:
        from qatlaw import design_search

        design_search.run(args)
        return
    law = laws.load(args.law)
    model = noise.load(args.noise, args.metric)
    table, what, cost = _design(args)
    precisions, skipped = _precisions(args, table)
    truth = design.truth(law, table, precisions)
    for line in laws.extrapolation_warnings(law, table["N"].unique().astype(float), table["D"].unique().astype(float)):
        print(line, file=sys.stderr)
    plan = design.plan(truth, table, model, precisions)
    print(f"design: {what}: {len(plan.runs)} QAT runs of {', '.join(precisions)} on {len(plan.units)} (N, D, seed) "
          f"units")
    print(f"law {law.name}: {law.source}")
    print(model.describe())
    for line in skipped:
        print(f"left out: {line}")
    print("\n".join(cost))
    result = design.predict(plan, args.replicates, args.seed, boot=args.boot, chinchilla=not args.no_chinchilla,
                            workers=args.workers)
    out = with_actual(result.table, args.compare) if args.compare else result.table
    print(_show(out))
    for row in out[out["note"] != ""].itertuples():
        print(f"note: {row.law} {row.precision} {row.constant}: {row.note}")
    print(f"{result.replicates} simulated studies in {result.seconds:.1f} s on {args.workers} worker(s); interval: "
          + (f"median bounds of each study's own bootstrap ({args.boot} resamples; Chinchilla: spread)" if args.boot
             else "spread of the estimates (5th-95th percentile)"))
    if args.compare:
        resamples = compared_resamples(args.compare)
        if resamples and resamples > args.boot:
            print(f"note: the intervals of {args.compare} come from {resamples} bootstrap resamples, the prediction's "
                  f"from {args.boot or 'none (the spread)'}: a 5-95% interval of fewer resamples comes out narrower "
                  f"(use --boot {resamples} to compare like with like)")
        ratios = out.loc[out["constant"].str.startswith("gamma") & out["ratio"].notna()]
        if len(ratios):
            print(f"predicted / actual width of the exponents: median {ratios['ratio'].median():.2f} "
                  f"(range {ratios['ratio'].min():.2f}-{ratios['ratio'].max():.2f}, {len(ratios)} intervals); "
                  f"{int(ratios['within'].sum())} of {len(ratios)} actual widths within the 5th-95th percentile of "
                  "the simulated studies' widths")
    if args.out:
        from qatlaw.io import write_parquet

        write_parquet(out, args.out)
