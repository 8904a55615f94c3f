"""The subcommands of the figures and tables stage (``rules/figures.smk``): ``figure`` and ``table``, each one
of the paper's from workflow Parquet outputs named by role."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from qatlaw.config import schema_key
from qatlaw.errors import ConfigError


def _named_inputs(pairs: Sequence[str]) -> dict[str, str]:
    """``--input KEY=PATH ...`` as paths by key."""
    inputs = {}
    for pair in pairs:
        key, sep, path = pair.partition("=")
        if not sep or not key or not path:
            raise ConfigError(f"--input {pair!r}: expected KEY=PATH")
        inputs[key] = path
    return inputs


def _figure(args: argparse.Namespace) -> None:
    from qatlaw import plots

    plots.make_figure(args.name, _named_inputs(args.input), args.out, args.caption, metric=args.metric)


def _figure_parser(sub: argparse._SubParsersAction) -> None:
    metric = schema_key("fit", "metric")
    s = sub.add_parser("figure", help="draw one paper figure (PNG and SVG) from workflow Parquet outputs")
    s.add_argument("name")
    s.add_argument("--input", nargs="+", required=True, metavar="KEY=PATH", help="input files by role")
    s.add_argument("--out", required=True, help="PNG path; the SVG is written beside it")
    s.add_argument("--caption", default="", help="grid description printed under the figure")
    s.add_argument("--metric", choices=metric["enum"], default=metric["default"],
                   help="δ of val_loss (default) or loss")
    s.set_defaults(func=_figure)


def _table(args: argparse.Namespace) -> None:
    from qatlaw import tables

    tables.make_table(args.name, _named_inputs(args.input), args.out_stem)


def _table_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("table", help="write one paper table as CSV and Markdown")
    s.add_argument("name")
    s.add_argument("--input", nargs="+", required=True, metavar="KEY=PATH")
    s.add_argument("--out-stem", required=True, help="writes <stem>.csv and <stem>.md")
    s.set_defaults(func=_table)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The subcommands ``figure`` and ``table``."""
    for add in (_figure_parser, _table_parser):
        add(sub)
