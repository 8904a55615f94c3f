"""The subcommands of the analyses of trained models that are cut into cell jobs (``rules/cell_analyses.smk``):
``layer-error`` and ``outliers`` on some runs' models each, ``gather-analysis`` joining the cells' tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qatlaw import analysis_plan, gpus
from qatlaw.config import schema_default


def _layer_error(args: argparse.Namespace) -> None:
    gpus.lease_for_device(args.device)
    from qatlaw import layer_error

    layer_error.run_layer_error(args.models, args.val, args.out, n_tokens=args.tokens, groups=args.groups,
                                bits=args.bits, threads=args.threads, device=args.device)


def _outliers(args: argparse.Namespace) -> None:
    gpus.lease_for_device(args.device)
    from qatlaw import outliers

    outliers.run_outliers(args.models, args.val, args.out, n_tokens=args.tokens, threads=args.threads,
                          device=args.device)


def _models_parser(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], None],
                   helptext: str) -> argparse.ArgumentParser:
    """The parser of an analysis that feeds validation tokens through the models of finished runs."""
    s = sub.add_parser(name, help=helptext)
    s.add_argument("models", nargs="+", help="model.pt files of finished runs")
    s.add_argument("--val", required=True, help="validation token shard")
    s.add_argument("--out", required=True)
    s.add_argument("--tokens", type=int, default=schema_default("analysis", "tokens"),
                   help="validation tokens fed through each model")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--device", choices=analysis_plan.DEVICES, default="cpu", help="where the models run")
    s.set_defaults(func=func)
    return s


def _layer_error_parser(sub: argparse._SubParsersAction) -> None:
    s = _models_parser(sub, "layer-error", _layer_error,
                       "per-layer quantization error (relative MSE, QSNR) of trained models")
    s.add_argument("--groups", nargs="+", default=[str(g) for g in schema_default("analysis", "groups")])
    s.add_argument("--bits", type=int, default=schema_default("analysis", "bits"))


def _outliers_parser(sub: argparse._SubParsersAction) -> None:
    _models_parser(sub, "outliers", _outliers, "kurtosis and outlier statistics of every linear layer's input")


def _gather_analysis(args: argparse.Namespace) -> None:
    analysis_plan.gather_runs(args.tables, args.runs, args.out)


def _gather_analysis_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("gather-analysis", help="one layer-error or outliers table from the tables of its cells")
    s.add_argument("tables", nargs="+", help="Parquet tables of some runs each")
    s.add_argument("--runs", nargs="+", required=True,
                   help="run ids: each in exactly one table; the rows in this order")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_gather_analysis)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The subcommands ``layer-error``, ``outliers`` and ``gather-analysis``."""
    for add in (_layer_error_parser, _outliers_parser, _gather_analysis_parser):
        add(sub)
