"""The subcommands that use a law, with no workflow: ``laws`` (those that ship), ``predict`` (δ and the losses on
a grid) and ``plan`` (the best precision and group size for one model, and its QAT fraction)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qatlaw.cli.argtypes import numbers, positive
from qatlaw.config import schema_default

if TYPE_CHECKING:
    import pandas as pd

    from qatlaw.laws import Law

LAW_HELP = "a shipped law (paper, laptop; see `qatlaw laws`) or a params.parquet / fit folder (default paper)"


def _warn_extrapolation(law: Law, N: Sequence[float], D: Sequence[float]) -> None:
    from qatlaw import laws

    for line in laws.extrapolation_warnings(law, N, D):
        print(line, file=sys.stderr)


def _laws(args: argparse.Namespace) -> None:
    from qatlaw import laws

    print("| law | source | precisions | N | D | G |\n|---|---|---|---|---|---|")
    for law in laws.available():
        span = {k: f"{lo:.3g}–{hi:.3g}" for k, (lo, hi) in law.ranges.items()}
        print(f"| {law.name} | {law.source} | {', '.join(law.precisions)} | {span.get('N', '?')} | "
              f"{span.get('D', '?')} | {span.get('G', '?')} |")
    print("\n--law NAME picks one (default paper); --law PATH takes a params.parquet (or fit folder) of the workflow")


def _laws_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("laws", help="the laws that ship with qatlaw")
    s.set_defaults(func=_laws)


def _predict(args: argparse.Namespace) -> None:
    from qatlaw import laws
    from qatlaw.io import write_parquet

    law = laws.load(args.law)
    table = laws.predict(law, args.N, args.D, args.G, args.precision.split(","))
    _warn_extrapolation(law, args.N, args.D)
    if args.out:
        write_parquet(table, args.out)
    if args.json:
        print(table.to_json(orient="records", double_precision=6))
        return
    print(f"law {law.name}: {law.source}")
    print(table.to_markdown(index=False, floatfmt=".4g"))


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("predict", help="δ, the BF16 and the QAT loss of a law on a grid of N, D, G and precisions")
    s.add_argument("--law", default="paper", help=LAW_HELP)
    s.add_argument("--N", type=numbers, required=True, help="non-embedding parameters, e.g. 1e9,7e9")
    s.add_argument("--D", type=numbers, required=True, help="training tokens, e.g. 1e11,2e12")
    s.add_argument("--G", type=numbers, required=True, help="group sizes, e.g. 32,128 (per-channel: the row length)")
    s.add_argument("--precision", default="W4A4", help="comma-separated precisions, e.g. W4A4,W4A4-fc2a8")
    s.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    s.add_argument("--out", help="also write the table to this Parquet file")
    s.set_defaults(func=_predict)


def _split_lines(args: argparse.Namespace, spec: str, law: Law, table: pd.DataFrame,
                 precision: str | None) -> list[str]:
    """The recommended QAT fraction of ``precision`` (else the best option's) and the predicted loss there and at
    f = 1, as lines to print."""
    from qatlaw import split

    options = table[table["best"]] if precision is None else table[table["precision"] == precision]
    if options.empty:
        return ["QAT fraction: no option fits the memory budget" if precision is None else
                f"QAT fraction: law {law.name} has no option for precision {precision}"]
    row = options.iloc[0]
    split_law = split.load_law(spec, schema_default("fit", "metric"))
    r = split.recommend(split_law, law, row["precision"], args.N, args.D, row["G"])
    detail = split_law.fallback or ("" if split_law.name == "paper" else split_law.source)
    source = f"law {split_law.name}" + (f" ({detail})" if detail else "")
    at_f = f"{r['loss_f']:.4g}" if r["loss_f"] == r["loss_f"] else f"– ({r['why']})"
    return [f"QAT fraction for {r['precision']} at G = {r['G']}: S = D / (N·{r['bits']}/8) = {r['S']:.4g}, "
            f"recommended f* = {r['f']:.3f} (the last {r['f']:.1%} of the tokens in QAT), from "
            f"f*(S) = exp(-a / ln S), a = {split_law.a:.4g}, {source}",
            f"predicted loss at f = {r['f']:.3f}: {at_f}",
            f"predicted loss at f = 1 (QAT from scratch): {r['loss_scratch']:.4g} (law {law.name})"]


def _plan(args: argparse.Namespace) -> None:
    from qatlaw import laws, split
    from qatlaw.precision import BASELINE, canonical

    precision = None
    if args.precision is not None:
        try:
            precision = canonical(args.precision)
        except ValueError as exc:
            raise laws.LawError(f"--precision {args.precision}: {exc}") from None
        split.bits(precision)  # one that quantizes something
    specs = args.law.split(",")
    group = [laws.load(spec) for spec in specs]
    table = laws.plan(group, args.N, args.D, args.memory_gb)
    chosen = 0
    if precision is None and table["best"].any():  # the QAT fraction of the best option, by its own law
        chosen = [one.name for one in group].index(table.loc[table["best"], "law"].iloc[0])
    split_lines = _split_lines(args, specs[chosen], group[chosen], table, precision)
    for one in group:
        _warn_extrapolation(one, [args.N], [args.D])
    budget = "" if args.memory_gb is None else f", weight memory <= {args.memory_gb:g} GB"
    names = ", ".join(one.name for one in group)
    print(f"law {names}: N = {args.N:.3g}, D = {args.D:.3g}{budget}"
          + ("" if len(group) == 1 else f" (δ of each option's own law; the BF16 loss of law {group[0].name})"))
    shown = table.assign(fits=table["fits"].map({True: "yes", False: "no"}),
                         best=table["best"].map({True: "<- best", False: ""}))
    print(shown.to_markdown(index=False, floatfmt=".4g"))
    best = table[table["best"]]
    bf16 = laws.weight_memory_gb(BASELINE, args.N, 1)
    print(f"BF16 (no quantization): {bf16:.4g} GB of weights")
    if best.empty:
        print("no option fits the memory budget")
    else:
        b = best.iloc[0]
        print(f"best: {b['precision']} at G = {b['G']} (QAT loss {b['qat_loss']:.4g}, δ {b['delta']:.4g}, "
              f"{b['weight_gb']:.4g} GB)")
    print("\n".join(split_lines))
    if args.plot:
        from qatlaw.plots.plan import plan_figure

        plan_figure(group, args.N, args.D, table, args.plot)


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("plan", help="rank every precision x G option of a law for a model of N parameters on D tokens")
    s.add_argument("--law", default="paper", help=LAW_HELP + "; several, comma-separated, are ranked together "
                   "(e.g. paper,quartet: the paper's INT4 beside Quartet's MXFP4)")
    s.add_argument("--N", type=positive, required=True)
    s.add_argument("--D", type=positive, required=True)
    s.add_argument("--memory-gb", type=positive, help="weight-memory budget in GB (1e9 bytes)")
    s.add_argument("--precision", help="the precision to recommend a QAT fraction for (default: the best option's)")
    s.add_argument("--plot", help="PNG of δ against D for every option")
    s.set_defaults(func=_plan)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The subcommands ``laws``, ``predict`` and ``plan``."""
    for add in (_laws_parser, _predict_parser, _plan_parser):
        add(sub)
