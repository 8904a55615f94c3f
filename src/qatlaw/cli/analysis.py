"""The subcommands that analyse the run table: ``decompose`` (``rules/decompose.smk``), ``mixed``
(``rules/mixed.smk``), ``fit`` (``rules/fit.smk``) and ``findings`` (``rules/findings.smk``)."""

from __future__ import annotations

import argparse
import logging

from qatlaw.config import schema_default, schema_key

log = logging.getLogger("qatlaw")


def _decompose(args: argparse.Namespace) -> None:
    from qatlaw import decompose

    decompose.run_decompose(args.runs, args.out, args.fit)


def _decompose_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("decompose", help="δ per run, weight/activation decomposition and its fit")
    s.add_argument("--runs", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--fit", required=True)
    s.set_defaults(func=_decompose)


def _mixed(args: argparse.Namespace) -> None:
    from qatlaw import mixed

    mixed.run_mixed(args.runs, args.out, args.ranking)


def _mixed_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("mixed", help="mixed-precision ablation: δ change of each layer override")
    s.add_argument("--runs", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--ranking", required=True)
    s.set_defaults(func=_mixed)


def _fit(args: argparse.Namespace) -> None:
    from qatlaw import fit, runtable

    runs = runtable.read_runs(args.runs)
    settings = {"bootstrap": args.bootstrap, "seed": args.seed, "metric": args.metric, "tie": not args.untie}
    if args.config:
        from qatlaw import config

        settings = config.load(*args.config)["fit"]
    tables = fit.run_fits(runtable.delta_table(runs), runs, n_boot=settings["bootstrap"], seed=settings["seed"],
                          metric=settings["metric"], tie=settings["tie"])
    fit.write_fits(tables, args.out_dir)
    for row in tables.comparison.itertuples():
        log.info("%s %s: relative error %.1f%% over %d runs", row.law, row.precision, 100 * row.rel_error, row.n_runs)


def _fit_parser(sub: argparse._SubParsersAction) -> None:
    metric = schema_key("fit", "metric")  # the options that mirror a config key take its default from the schema
    s = sub.add_parser("fit", help="fit the Chinchilla law, the unified QAT law and the baselines")
    s.add_argument("--runs", required=True)
    s.add_argument("--out-dir", required=True,
                   help="writes params, predictions, comparison and bootstrap Parquet files")
    s.add_argument("--bootstrap", type=int, default=schema_default("fit", "bootstrap"),
                   help="bootstrap resamples for the 90%% intervals")
    s.add_argument("--seed", type=int, default=schema_default("fit", "seed"))
    s.add_argument("--metric", choices=metric["enum"], default=metric["default"],
                   help="loss fitted: val_loss (validation, default) or loss (smoothed training loss, the paper's)")
    s.add_argument("--untie", action="store_true",
                   help="fit Chinchilla's alpha and beta apart (config fit.tie: false); tied by default, as the paper")
    s.add_argument("--config", nargs="+", metavar="FILE",
                   help="take bootstrap, seed, metric and tie from the fit keys of these config files "
                        "(merged in order)")
    s.set_defaults(func=_fit)


def _findings(args: argparse.Namespace) -> None:
    from qatlaw import findings

    table = findings.run_findings(args.results, args.out, args.parquet, args.metric, args.title, args.note)
    counts = table["verdict"].value_counts()
    log.info("%d findings: %s -> %s", len(table), ", ".join(f"{k} {v}" for k, v in counts.items()), args.out)


def _findings_parser(sub: argparse._SubParsersAction) -> None:
    metric = schema_key("fit", "metric")
    s = sub.add_parser("findings", help="the paper's findings beside a results folder's numbers (FINDINGS.md)")
    s.add_argument("--results", required=True, help="a results folder (results/ or reference/<grid>/)")
    s.add_argument("--out", required=True, help="FINDINGS.md to write")
    s.add_argument("--parquet", required=True, help="findings.parquet to write")
    s.add_argument("--metric", choices=metric["enum"], default=metric["default"])
    s.add_argument("--title", default="Findings")
    s.add_argument("--note", default="", help="a paragraph under the title")
    s.set_defaults(func=_findings)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The subcommands ``decompose``, ``mixed``, ``fit`` and ``findings``."""
    for add in (_decompose_parser, _mixed_parser, _fit_parser, _findings_parser):
        add(sub)
