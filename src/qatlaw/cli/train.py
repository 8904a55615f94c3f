"""The training stage's subcommands (``rules/train.smk``): ``train`` (each grid cell's runs, one job), ``ptq``,
``runs`` (the run table) and ``import-runs`` (a run table from outside)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from qatlaw.cli.data import read_manifest
from qatlaw.cli.execution import add_execution_options, execution_of
from qatlaw.errors import QatlawError
from qatlaw.stopping import StopSignals

if TYPE_CHECKING:
    from qatlaw.grid import RunSettings

log = logging.getLogger("qatlaw")


@contextlib.contextmanager
def _run_log(path: str | None) -> Iterator[None]:
    """While one run of a job trains, also write the log to that run's own file (``--run-log``); under torchrun
    only rank 0 writes it, the other ranks log to stderr only."""
    if path is None or int(os.environ.get("RANK", 0)) != 0:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")  # a resumed segment appends to its log
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _train(args: argparse.Namespace) -> None:
    from qatlaw import gpus, launch
    from qatlaw.grid import RunSettings

    runs = RunSettings.many_from_json(args.settings)
    if args.gpus > 1 and len(runs) > 1:
        raise QatlawError(f"{len(runs)} runs in one job on {args.gpus} GPUs: give each run its own job "
                          "(training.runs_per_job: 1)")
    if args.device != "cpu" and args.nodes == 1 and "WORLD_SIZE" not in os.environ:
        gpus.lease_for_job(max(1, args.gpus))
    if (args.gpus > 1 or args.nodes > 1) and "WORLD_SIZE" not in os.environ:
        launch.relaunch(args.argv, args.gpus, args.nodes, args.threads, args.stop_seconds, args.checkpoint)
        return
    _train_runs(args, runs)


def _train_runs(args: argparse.Namespace, runs: list[RunSettings]) -> None:
    """Train the job's ``runs`` one after another in this process (under torchrun: in each of its workers)."""
    from qatlaw import launch, runstate, tokens, train

    paths, trunks = _run_paths(args, runs)
    keep = _keep_trunks(args.keep_trunk, runs)
    manifest = read_manifest(args.manifest)
    train_tokens = tokens.open_tokens(args.train_tokens, manifest, "train")
    val_tokens = tokens.open_tokens(args.val_tokens, manifest, "val")
    # a torchrun worker gets its share of the node's CPUs
    threads = launch.worker_threads(args.threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    execution = execution_of(args, threads)
    # Several runs in one job: each keeps its final checkpoint until all are done, so that a job killed after
    # some finished redoes their outputs from those checkpoints instead of training them again.
    with StopSignals() as stop:
        for i, settings in enumerate(runs):
            if len(runs) > 1:
                log.info("run %d of %d in this job: %s", i + 1, len(runs), settings.run_id)
            with _run_log(paths["run_log"][i] if args.run_log else None):
                train.train_run(
                    settings, train_tokens=train_tokens, val_tokens=val_tokens, manifest=manifest,
                    summary_path=paths["summary"][i], metrics_path=paths["metrics"][i], model_path=paths["model"][i],
                    checkpoint_path=paths["checkpoint"][i], execution=execution, keep_checkpoint=len(runs) > 1,
                    stop=stop, trunk=trunks[i], keep_trunks=keep.get(i),
                )
    if len(runs) > 1:
        for checkpoint in paths["checkpoint"]:
            runstate.remove_checkpoint(checkpoint)


def _run_paths(args: argparse.Namespace, runs: list[RunSettings]) -> tuple[dict[str, list[str]], list[str | None]]:
    """The paths of each run by option (one per run, checked), and the trunk checkpoint each starts from (None: it
    starts from scratch; a branch's must exist)."""
    paths = {name: getattr(args, name) for name in ("summary", "metrics", "model", "checkpoint")}
    if args.run_log:
        paths["run_log"] = args.run_log
    if args.trunk:
        paths["trunk"] = args.trunk
    for name, values in paths.items():
        if len(values) != len(runs):
            raise QatlawError(f"--{name}: {len(values)} paths for {len(runs)} runs in --settings")
    trunks = [None if not args.trunk or path == "-" else path for path in paths.get("trunk", [None] * len(runs))]
    for settings, trunk in zip(runs, trunks):
        if settings.is_branch and trunk is None:
            raise QatlawError(f"--trunk: no trunk checkpoint for branch {settings.run_id}")
        if trunk is not None and not Path(trunk).is_file():
            raise QatlawError(f"{settings.run_id}: trunk checkpoint {trunk} is missing; its baseline "
                              f"{settings.baseline.run_id} writes it")
    return paths, trunks


def _keep_trunks(specs: list[str] | None, runs: list[RunSettings]) -> dict[int, dict[int, str]]:
    """--keep-trunk STEP=PATH ...: the trunk checkpoints the job's one BF16 baseline keeps, by its index."""
    if not specs:
        return {}
    baselines = [i for i, run in enumerate(runs) if run.is_baseline]
    if len(baselines) != 1:
        raise QatlawError(f"--keep-trunk: the job has {len(baselines)} BF16 baselines, not one to keep them")
    steps = {}
    for spec in specs:
        step, sep, path = spec.partition("=")
        if not sep or not step.isdigit() or not path:
            raise QatlawError(f"--keep-trunk: {spec!r} is not STEP=PATH")
        steps[int(step)] = path
    return {baselines[0]: steps}


def _train_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("train", help="train grid cells, one after another (each resumes from its checkpoint)")
    s.add_argument("--settings", required=True, help="RunSettings as JSON: one object, or a list of runs")
    s.add_argument("--train-tokens", required=True)
    s.add_argument("--val-tokens", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--summary", required=True, nargs="+")
    s.add_argument("--metrics", required=True, nargs="+")
    s.add_argument("--model", required=True, nargs="+")
    s.add_argument("--checkpoint", required=True, nargs="+",
                   help="resumable checkpoint (kept outside the rule's outputs)")
    s.add_argument("--run-log", nargs="+", help="with several runs: each run's own log file (the job log has all)")
    s.add_argument("--trunk", nargs="+", help="per run, the trunk checkpoint a branch starts from ('-': none)")
    s.add_argument("--keep-trunk", nargs="+", metavar="STEP=PATH",
                   help="trunk checkpoints the job's BF16 baseline writes for its cell's branches")
    add_execution_options(s, training=True)
    s.set_defaults(func=_train)


def _ptq(args: argparse.Namespace) -> None:
    from qatlaw import gpus, tokens, train
    from qatlaw.grid import RunSettings

    gpus.lease_for_device(args.device)
    settings = RunSettings.from_json(args.settings)
    manifest = read_manifest(args.manifest)
    train.quantize_run(settings, baseline_summary=args.baseline_summary, baseline_metrics=args.baseline_metrics,
                       baseline_model=args.baseline_model,
                       val_tokens=tokens.open_tokens(args.val_tokens, manifest, "val"), manifest=manifest,
                       summary_path=args.summary, metrics_path=args.metrics, model_path=args.model,
                       execution=execution_of(args, args.threads))


def _ptq_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("ptq", help="post-training quantization: score a baseline's final model under a precision")
    s.add_argument("--settings", required=True, help="RunSettings of the run (QAT fraction 0) as JSON")
    s.add_argument("--baseline-summary", required=True)
    s.add_argument("--baseline-metrics", required=True)
    s.add_argument("--baseline-model", required=True)
    s.add_argument("--val-tokens", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--summary", required=True)
    s.add_argument("--metrics", required=True)
    s.add_argument("--model", required=True)
    add_execution_options(s, training=False)
    s.set_defaults(func=_ptq)


def _runs(args: argparse.Namespace) -> None:
    from qatlaw import runtable

    table = runtable.collect_runs(args.summaries, args.out)
    log.info("%d runs (%d diverged) -> %s", len(table), int(table["diverged"].sum()), args.out)


def _runs_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("runs", help="collect run summaries into one table")
    s.add_argument("summaries", nargs="+")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_runs)


def _import_runs(args: argparse.Namespace) -> None:
    from qatlaw import config, external

    table, precisions = args.table, args.precision or []
    if args.config:
        spec = config.load(*args.config).get("external") or {}
        table, precisions = table or spec.get("table"), precisions or spec.get("precisions", [])
    if not table:
        raise external.ExternalTableError("import-runs: no table: give TABLE or --config files with external.table")
    runs = external.run(table, args.out, precisions)
    qat = runs[runs["precision"] != "BF16"]
    log.info("%d runs (%d BF16, %d QAT: %s) from %s -> %s", len(runs), len(runs) - len(qat), len(qat),
             ", ".join(f"{p} {n}" for p, n in qat["precision"].value_counts().sort_index().items()), table, args.out)


def _import_runs_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("import-runs",
                       help="check a run table from outside (CSV or Parquet) and write it as runs.parquet")
    s.add_argument("table", nargs="?",
                   help="one row per run: N, D, precision, G, loss (final validation loss), seed optional")
    s.add_argument("--config", nargs="+", metavar="FILE",
                   help="config files (merged in order) whose external.table and external.precisions to use")
    s.add_argument("--out", required=True, help="runs.parquet to write")
    s.add_argument("--precision", nargs="+", metavar="LABEL",
                   help="QAT labels of the table beyond this project's precision strings, e.g. MXFP4-fwd")
    s.set_defaults(func=_import_runs)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The subcommands ``train``, ``ptq``, ``runs`` and ``import-runs``."""
    for add in (_train_parser, _ptq_parser, _runs_parser, _import_runs_parser):
        add(sub)
