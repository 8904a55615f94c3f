"""The subcommands that check a grid's config before it runs: ``validate`` and ``cost``."""

from __future__ import annotations

import argparse


def _validate(args: argparse.Namespace) -> None:
    from qatlaw import config, cost, grid

    cfg = config.load(*args.configs)
    runs = grid.grid_runs(cfg)
    baselines = sum(run.is_baseline for run in runs)
    print(f"config OK: {len(runs)} runs ({baselines} BF16 baselines, {len(runs) - baselines} QAT)")
    if grid.on_gpu(cfg["training"]):
        print(cost.report(cfg)[0])


def _validate_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("validate", help="validate config files (merged in order)")
    s.add_argument("configs", nargs="+")
    s.set_defaults(func=_validate)


def _cost(args: argparse.Namespace) -> None:
    from qatlaw import config, cost
    from qatlaw.io import write_parquet

    overlay = {} if args.vocab_size is None else {"data": {"vocab_size": args.vocab_size}}
    text, plans = cost.report(config.load(*args.configs, overlay, check_files=args.vocab_size is None))
    print(text)
    if args.out:
        write_parquet(plans, args.out)


def _cost_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("cost", help="what a GPU grid costs before it runs: GPUs, nodes, memory, hours per size")
    s.add_argument("configs", nargs="+")
    s.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary; given, no data file is read")
    s.add_argument("--out", help="Parquet file: one row per run")
    s.set_defaults(func=_cost)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The subcommands ``validate`` and ``cost``."""
    for add in (_validate_parser, _cost_parser):
        add(sub)
