"""The ``qatlaw`` command: one subcommand per workflow step, each with explicit input and output paths."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from qatlaw.cli import analysis, cells, data, design, figures, grid, law, study, train
from qatlaw.errors import QatlawError
from qatlaw.stopping import STOPPED_STATUS, Stopped

log = logging.getLogger("qatlaw")

# the modules of the subcommands, by workflow stage, in the order `qatlaw --help` lists them
STAGES = (grid, data, train, analysis, study, law, design, figures, cells)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="qatlaw", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        stage.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; known errors print one line and exit with status 2, a training stopped by SIGTERM or
    SIGUSR1 after writing its checkpoint with status 75 (:mod:`qatlaw.stopping`)."""
    # under torchrun only rank 0 logs progress; the others their warnings and errors
    level = logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    try:
        args.func(args)
    except QatlawError as exc:
        print(f"qatlaw {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(f"qatlaw {args.command}: {exc}", file=sys.stderr)
        return STOPPED_STATUS
    log.info("%s done in %.1f s", args.command, time.perf_counter() - start)
    return 0
