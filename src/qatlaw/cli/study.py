"""The subcommands of shipped studies (``make reference``): ``reference`` ships a results folder as one,
``refit`` refits it in place, ``restore`` writes its runs back into a results folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("qatlaw")


def _reference(args: argparse.Namespace) -> None:
    from qatlaw import config, reference

    cfg = config.load(*args.configs)
    wall = float(Path(args.wall_file).read_text().split()[0]) if args.wall_file else None
    out = reference.package(args.results, args.out, cfg, wall_s=wall, command=args.command, title=args.title)
    log.info("reference results -> %s", out)


def _reference_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("reference", help="ship a finished results folder as reference/<grid>/")
    s.add_argument("configs", nargs="+", help="the config files the grid ran with, merged in order")
    s.add_argument("--results", default="results")
    s.add_argument("--out", required=True, help="e.g. reference/laptop")
    s.add_argument("--wall-file", help="file holding the workflow's wall time in seconds")
    s.add_argument("--command", default="", help="the command that produced the results (recorded)")
    s.add_argument("--title", default="reference grid")
    s.set_defaults(func=_reference)


def _refit(args: argparse.Namespace) -> None:
    from qatlaw import reference

    for folder in args.folders:
        reference.refit(folder, command=f"qatlaw refit {folder}")
        log.info("refitted %s (fit, figures, tables, findings; no run retrained)", folder)


def _refit_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("refit", help="refit shipped studies in place: fit, figures, tables, findings (no training)")
    s.add_argument("folders", nargs="+", help="study folders written by `qatlaw reference`, e.g. reference/laptop")
    s.set_defaults(func=_refit)


def _restore(args: argparse.Namespace) -> None:
    from qatlaw import reference

    reference.restore(args.folder, args.runs, args.results)
    log.info("%d runs restored from %s -> %s/%s", len(args.runs), args.folder, args.results, reference.RESTORED)


def _restore_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("restore", help="write runs of a shipped study folder into results/restored/ (rule restore)")
    s.add_argument("folder", help="a study folder written by `qatlaw reference`, e.g. reference/laptop")
    s.add_argument("--runs", required=True, nargs="+", help="the run ids to restore")
    s.add_argument("--results", default="results")
    s.set_defaults(func=_restore)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The subcommands ``reference``, ``refit`` and ``restore``."""
    for add in (_reference_parser, _refit_parser, _restore_parser):
        add(sub)
