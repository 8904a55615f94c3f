"""Data stage: tokenizer (trained on a sample, or the user's file), seeded split by document, tokenization shard by
shard and the gather, the memory-mapped token store, and the tokens and losses recorded before the store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from qatlaw import config as qconfig
from qatlaw import data, train
from qatlaw.grid import RunSettings
from qatlaw.tokens import (
    DataError,
    open_tokens,
    token_dtype,
    token_writer,
    write_tokens,
)

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more out up into do any your what "
    "time people year government state nation congress president war peace law trade labor money power world"
).split()
OUTPUTS = ("tokenizer.json", "train.npy", "val.npy", "documents.parquet", "manifest.json")


def write_corpus(root: Path, files: int = 6, docs_per_file: int = 20, seed: int = 0) -> list[data.Shard]:
    """JSON-lines files of generated sentences (alternately plain, .gz and .zst) as shards of two sources."""
    import gzip

    import zstandard

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for f in range(files):
        lines = []
        for _ in range(docs_per_file):
            sentences = [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))).capitalize() + "."
                         for _ in range(rng.randint(4, 9))]
            lines.append(json.dumps({"text": " ".join(sentences)}))
        blob = ("\n".join(lines) + "\n").encode()
        name, blob = [(f"part{f}.jsonl", blob), (f"part{f}.jsonl.gz", gzip.compress(blob)),
                      (f"part{f}.jsonl.zst", zstandard.ZstdCompressor().compress(blob))][f % 3]
        (root / name).write_bytes(blob)
        shards.append(data.Shard("alpha" if f < files // 2 else "beta", str(root / name)))
    return shards


def run_stage(shards: list[data.Shard], out: Path, *, shards_per_job: int = 1, vocab_size: int = 512,
              tokenizer: Path | None = None, sample_bytes: int = 2**28, val_fraction: float = 0.1,
              seed: int = 7, min_chars: int = 50) -> dict[str, Path]:
    """The data stage as the workflow runs it: tokenizer, one tokenize job per ``shards_per_job`` shards, gather."""
    paths = {name: out / name for name in OUTPUTS}
    if tokenizer is None:
        data.build_tokenizer(shards, paths["tokenizer.json"], vocab_size=vocab_size, min_frequency=2,
                             sample_bytes=sample_bytes, val_fraction=val_fraction, seed=seed, text_field="text",
                             min_chars=min_chars)
    else:
        data.copy_tokenizer(tokenizer, paths["tokenizer.json"], None, None)
    jobs = []
    for i in range(0, len(shards), shards_per_job):
        job = (out / "shards" / f"{i}.npy", out / "shards" / f"{i}.parquet")
        data.tokenize_shards(shards[i : i + shards_per_job], tokenizer_path=paths["tokenizer.json"], tokens_path=job[0],
                             docs_path=job[1], text_field="text", min_chars=min_chars, seed=seed)
        jobs.append(job)
    data.gather(jobs, tokenizer_path=paths["tokenizer.json"], train_path=paths["train.npy"], val_path=paths["val.npy"],
                documents_path=paths["documents.parquet"], manifest_path=paths["manifest.json"],
                val_fraction=val_fraction, seed=seed)
    return paths


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory) -> list[data.Shard]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def staged(tmp_path_factory, corpus_shards) -> dict[str, Path]:
    return run_stage(corpus_shards, tmp_path_factory.mktemp("data"))


def manifest_of(paths: dict[str, Path]) -> dict:
    return json.loads(paths["manifest.json"].read_text())


def test_gather_memory_grows_with_the_corpus_documents(tmp_path, staged):
    """gather's memory request is read from the tokenize jobs' document tables (their row counts): 2,000 MB plus
    64 bytes a document (200M documents: 14.8 GB, where a fixed 4,000 MB failed above about 75M); the base alone
    while the tables do not exist yet (a dry run)."""
    tables = sorted((staged["train.npy"].parent / "shards").glob("*.parquet"))
    documents = sum(len(pd.read_parquet(p)) for p in tables)
    assert data.gather_memory_mb(tables) == 2000 + math.ceil(64 * documents / 1e6)
    assert data.gather_memory_mb([*tables, tmp_path / "not yet.parquet"]) == 2000
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"doc_id": pa.array([""] * 3_000_000)}), big)
    assert data.gather_memory_mb([big] * 67) == 2000 + 12_864  # 201M documents


def test_tokenize_detokenize_round_trip(staged):
    tok = Tokenizer.from_file(str(staged["tokenizer.json"]))
    for text in ["The government of the people.", "  two  spaces\nand a new line\t tab",
                 "Ünïcödé — “quotes” 1790–2018 ✓"]:
        assert tok.decode(tok.encode(text).ids) == text


def test_every_document_ends_with_eos_and_sits_in_one_split(staged):
    manifest = manifest_of(staged)
    assert manifest["eos_id"] == 0
    table = pd.read_parquet(staged["documents.parquet"])
    assert table["doc"].tolist() == list(range(len(table))) == list(range(120))
    for split in ("train", "val"):
        tokens = open_tokens(staged[f"{split}.npy"], manifest, split)[:]
        counts = table.loc[table["split"] == split, "tokens"].to_numpy()
        assert len(counts) and counts.sum() == len(tokens)
        assert (tokens[np.cumsum(counts) - 1] == 0).all()  # each document's last token is end-of-text
        assert (tokens == 0).sum() == len(counts)


def test_manifest_counts_match_the_stores(staged):
    manifest = manifest_of(staged)
    table = pd.read_parquet(staged["documents.parquet"])
    for split in ("train", "val"):
        tokens = np.load(staged[f"{split}.npy"])
        entry = manifest["splits"][split]
        assert entry["tokens"] == len(tokens) and entry["max_token"] == tokens.max() < 512
        assert entry["sha256"] == hashlib.sha256(tokens.astype("<u2").tobytes()).hexdigest()
        assert entry["documents"] == (table["split"] == split).sum()
    assert sum(s["train_tokens"] + s["val_tokens"] for s in manifest["sources"].values()) == table["tokens"].sum()
    assert set(manifest["sources"]) == {"alpha", "beta"}
    assert manifest["vocab_size"] == 512 and manifest["token_dtype"] == "uint16"
    assert len(manifest["jobs"]) == 6 and len(manifest["corpus_sha256"]) == 64


def test_sharded_tokenization_equals_one_job(tmp_path, staged, corpus_shards):
    """One tokenize job per file, three files per job, or all files in one job: the same stores, byte for byte."""
    for per_job in (3, len(corpus_shards)):
        out = run_stage(corpus_shards, tmp_path / f"per{per_job}", shards_per_job=per_job)
        for name in ("tokenizer.json", "train.npy", "val.npy"):
            assert out[name].read_bytes() == staged[name].read_bytes(), (per_job, name)
        pd.testing.assert_frame_equal(pd.read_parquet(out["documents.parquet"]),
                                      pd.read_parquet(staged["documents.parquet"]))
        a, b = manifest_of(out), manifest_of(staged)
        assert a["splits"] == b["splits"] and a["sources"] == b["sources"]


def test_bpe_is_trained_on_a_bounded_seeded_sample(corpus_shards):
    docs = list(data.corpus_documents(corpus_shards, "text", 50))
    everything, info = data.tokenizer_sample(docs, 2**30, 0.1, seed=7)
    draws = np.array([data.split_draw(7, d.source, d.doc_id) for d in docs])
    is_val = data.finalize_split([d.source for d in docs], draws, 0.1)
    assert everything == [d.text for d, v in zip(docs, is_val, strict=True) if not v]  # all training docs, in order
    budget = info["bytes"] // 4
    sample, small = data.tokenizer_sample(docs, budget, 0.1, seed=7)
    assert 0 < small["bytes"] <= budget and len(sample) < len(everything)
    assert set(sample) <= set(everything)
    assert data.tokenizer_sample(list(reversed(docs)), budget, 0.1, seed=7)[0] == list(reversed(sample))
    assert data.tokenizer_sample(docs, budget, 0.1, seed=8)[0] != sample


def test_split_is_deterministic_seeded_and_order_free():
    ids = [str(i) for i in range(500)]

    def split(seed: int, order: list[str]) -> dict[str, bool]:
        u = np.array([data.split_draw(seed, "s", d) for d in order])
        return dict(zip(order, data.finalize_split(["s"] * len(order), u, 0.1), strict=True))

    a = split(1, ids)
    assert a == split(1, list(reversed(ids)))
    assert a != split(2, ids)
    assert 20 < sum(a.values()) < 80


def test_split_is_stratified_by_source_and_always_has_both_sides():
    sources = ["big"] * 3 + ["wide"] * 2000
    u = np.array([data.split_draw(3, s, str(i)) for i, s in enumerate(sources)])
    is_val = data.finalize_split(sources, u, 0.01)
    assert is_val[:3].sum() == 1
    assert 5 < is_val[3:].sum() < 40
    assert data.finalize_split(["s", "s"], np.array([0.5, 0.7]), 0.001).tolist() == [True, False]
    assert data.finalize_split(["s", "s"], np.array([0.5, 0.7]), 0.9).tolist() == [True, False]
    with pytest.raises(DataError, match="at least 2 documents"):
        data.finalize_split(["s"], np.array([0.5]), 0.1)


def test_vocab_larger_than_the_corpus_supports_is_an_error(tmp_path, corpus_shards):
    with pytest.raises(DataError, match="data.vocab_size: the corpus supports only"):
        run_stage(corpus_shards[:1], tmp_path, vocab_size=60000)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------- user tokenizer
def user_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """An HF tokenizers file as a user brings one (here a BPE of other text), of exactly ``vocab_size`` ids."""
    tok = data.train_tokenizer([" ".join(reversed(WORDS)) * 20], vocab_size)
    assert tok.get_vocab_size() == vocab_size
    tok.save(str(path))
    return path


def test_a_user_tokenizer_file_sets_the_vocabulary(tmp_path, staged, corpus_shards):
    user = user_tokenizer(tmp_path / "user-tokenizer.json")
    out = run_stage(corpus_shards, tmp_path / "data", tokenizer=user)
    manifest = manifest_of(out)
    assert manifest["vocab_size"] == 300 == Tokenizer.from_file(str(user)).get_vocab_size()
    assert out["tokenizer.json"].read_bytes() == user.read_bytes()
    for split in ("train", "val"):  # the split is the tokenizer's business no more than the corpus's
        assert manifest["splits"][split]["documents"] == manifest_of(staged)["splits"][split]["documents"]
    assert open_tokens(out["train.npy"])[:].max() < 300


def test_a_user_tokenizer_with_the_wrong_vocabulary_size_or_no_eos_is_refused(tmp_path):
    user = user_tokenizer(tmp_path / "tok.json")
    with pytest.raises(DataError, match=r"tok.json: the tokenizer has 300 ids but data.vocab_size is 512; remove"):
        data.load_tokenizer(user, vocab_size=512)
    no_eos = json.loads(user.read_text())
    no_eos["added_tokens"] = []
    (tmp_path / "no_eos.json").write_text(json.dumps(no_eos).replace("<|endoftext|>", "<|nothing|>"))
    with pytest.raises(DataError, match=r"no_eos.json: the tokenizer has no end-of-text token .*set data.eos_token"):
        data.load_tokenizer(tmp_path / "no_eos.json")
    assert data.eos_id(Tokenizer.from_file(str(tmp_path / "no_eos.json")), "<|nothing|>", "x") == 0
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json: not a readable HF tokenizers file"):
        data.load_tokenizer(tmp_path / "broken.json")


def test_config_reads_the_vocabulary_size_from_the_tokenizer_file(tmp_path):
    user = user_tokenizer(tmp_path / "tok.json")
    base = qconfig.read_yaml(Path(__file__).resolve().parents[1] / "config.yaml")
    cfg = qconfig.load(base, {"data": {"tokenizer": str(user), "vocab_size": None}})
    assert cfg["data"]["vocab_size"] == 300
    with pytest.raises(qconfig.ConfigError, match=r"^data.tokenizer: .*tok.json: the tokenizer has 300 ids but "
                                                  r"data.vocab_size is 512"):
        qconfig.load(base, {"data": {"tokenizer": str(user)}})
    with pytest.raises(qconfig.ConfigError, match="^data.tokenizer: .*missing.json: tokenizer file not found"):
        qconfig.load(base, {"data": {"tokenizer": str(tmp_path / "missing.json"), "vocab_size": None}})
    with pytest.raises(qconfig.ConfigError, match="^data.vocab_size: required to train a BPE"):
        qconfig.load(base, {"data": {"vocab_size": None}})


# ------------------------------------------------------------------------------------------- token store
def test_store_round_trip_streamed_and_refused_when_damaged(tmp_path):
    ids = np.arange(5000) % 700
    with token_writer(tmp_path / "s.npy", 1024) as writer:
        for part in np.array_split(ids, 7):
            writer.write(part)
        assert not (tmp_path / "s.npy").exists()  # nothing under the name until complete
    assert writer.summary()["tokens"] == 5000 and writer.summary()["max_token"] == 699
    store = open_tokens(tmp_path / "s.npy")
    assert store.dtype == np.uint16 and len(store) == 5000 and np.array_equal(np.load(tmp_path / "s.npy"), ids)
    assert np.array_equal(store[:], ids) and np.array_equal(store[4990:], ids[4990:]) and len(store[6000:]) == 0
    starts = np.array([0, 17, 4990])
    assert np.array_equal(store.windows(starts, 10), ids[starts[:, None] + np.arange(10)])
    with pytest.raises(IndexError, match="a window of 10 outside the store's 5,000 tokens"):
        store.windows(np.array([4991]), 10)

    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes((tmp_path / "s.npy").read_bytes()[:3000])
    with pytest.raises(DataError, match=r"truncated.npy: not a readable token store \(3000 bytes, fewer than"):
        open_tokens(truncated)
    np.save(tmp_path / "floats.npy", np.zeros(4, np.float32))
    with pytest.raises(DataError, match="floats.npy: expected a 1-D .npy array of uint16/uint32 token ids; got a f"):
        open_tokens(tmp_path / "floats.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(DataError, match="text.npy: not a readable token store"):
        open_tokens(tmp_path / "text.npy")
    with pytest.raises(DataError, match="token store not found"):
        open_tokens(tmp_path / "missing.npy")
    manifest = {"token_dtype": "uint16", "splits": {"train": {"tokens": 4999}}}
    with pytest.raises(DataError, match=r"s.npy: 5,000 uint16 ids, but the data manifest lists 4,999 uint16 ids "
                                        r"for the train split \(a store from another data stage\?\)"):
        open_tokens(tmp_path / "s.npy", manifest, "train")


def test_ids_outside_the_vocabulary_are_refused_when_written(tmp_path):
    with pytest.raises(DataError, match=r"bad.npy: token id 700 is out of range for vocabulary size 512"):
        write_tokens(np.array([1, 2, 700]), tmp_path / "bad.npy", 512)
    assert not list(tmp_path.iterdir())  # no store, no temporary file


def test_token_dtype_widens_for_large_vocabularies(tmp_path):
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    write_tokens(np.array([0, 100_000]), tmp_path / "wide.npy", 100_278)
    assert open_tokens(tmp_path / "wide.npy").dtype == np.uint32


def test_the_store_gives_the_windows_and_losses_of_the_in_memory_array(tmp_path):
    ids = np.random.default_rng(0).integers(0, 512, 20_000)
    write_tokens(ids, tmp_path / "t.npy", 512)
    stored, memory = open_tokens(tmp_path / "t.npy"), ids.astype(np.uint16)
    a, b = train.TokenBatches(stored, 32, 8, seed=3), train.TokenBatches(memory, 32, 8, seed=3)
    for step in (0, 1, 77, 200, 5):  # 200 is in the third epoch
        assert torch.equal(a.batch(step)[0], b.batch(step)[0]) and torch.equal(a.batch(step)[1], b.batch(step)[1])
    model = train.build_model(dataclasses.replace(BEFORE_RUN, seq_len=32), 512)
    assert train.evaluate(model, stored, 32, 4096, 8) == train.evaluate(model, memory, 32, 4096, 8)


def test_budgets_beyond_the_training_split_need_allow_repeat():
    manifest = {"splits": {"train": {"tokens": 1000}}}
    assert data.check_budgets(manifest, [500, 1000], allow_repeat=False) == {500: 0.5, 1000: 1.0}
    with pytest.raises(DataError, match=r"grid.tokens: budget 2,500 exceeds the 1,000 training tokens .*3 epochs"):
        data.check_budgets(manifest, [500, 2500], allow_repeat=False)
    assert data.check_budgets(manifest, [2500], allow_repeat=True) == {2500: 2.5}


# ------------------------------------------------------------------------------- nothing else moves
# Recorded at commit e1acfee, before the token store, with the data stage of that commit (documents Parquet ->
# one tokenize job -> Parquet token shards) on tests/test_workflow.write_texts' corpus as source user1
# (vocabulary 600, validation 0.1, split seed 1234), and this run trained on its shards, 1 thread.
BEFORE = {
    "train_tokens": 49808, "val_tokens": 1258,
    "train_sha256": "fef4440fc49a947f7e2cc421af906f930876a920ca367d4dbe3d1ab6d00335fd",
    "val_sha256": "88e28fc10f3f3c4624c93c53a145f6efb240692d30adb5a83d7ee4c5efa2199d",
    "tokenizer_sha256": "4bd0e74c915bd6cf7498ffa39949dd5d0a1915db9903738e86546e914de04dd1",
    "loss": 6.167110399205977, "val_loss": 6.076417521426552,
}
BEFORE_RUN = RunSettings(
    size="toy", layers=2, hidden=32, ffn=64, heads=4, kv_heads=2, lr=3e-3, batch_size=8, tokens=8 * 64 * 12,
    precision="W4A4", group=16, seed=0, seq_len=64, warmup_fraction=0.1, min_lr_ratio=0.0, beta1=0.9, beta2=0.95,
    weight_decay=0.1, grad_clip=1.0, loss_ema=0.9, eval_tokens=4096, clip="paper", format="int", lac="paper",
)


@pytest.mark.slow
def test_tokens_and_loss_are_those_recorded_before_the_token_store(tmp_path, monkeypatch):
    from conftest import write_texts

    monkeypatch.chdir(tmp_path)  # document ids are the files' paths as the config gives them
    write_texts(tmp_path)
    shards = [data.Shard("user1", str(p)) for p in sorted(Path("texts").glob("*.txt"))]
    out = run_stage(shards, Path("out"), vocab_size=600, val_fraction=0.1, seed=1234, min_chars=200)
    manifest = manifest_of(out)
    assert manifest["tokenizer_sha256"] == BEFORE["tokenizer_sha256"]
    for split in ("train", "val"):
        tokens = open_tokens(out[f"{split}.npy"], manifest, split)
        assert len(tokens) == BEFORE[f"{split}_tokens"]
        assert manifest["splits"][split]["sha256"] == BEFORE[f"{split}_sha256"]
    torch.set_num_threads(1)
    result = train.train_run(
        dataclasses.replace(BEFORE_RUN), train_tokens=open_tokens(out["train.npy"], manifest, "train"),
        val_tokens=open_tokens(out["val.npy"], manifest, "val"), manifest=manifest,
        summary_path=tmp_path / "run" / "summary.parquet", metrics_path=tmp_path / "run" / "metrics.parquet",
        model_path=tmp_path / "run" / "model.pt", checkpoint_path=tmp_path / "run" / "ckpt.pt",
        execution=train.Execution(checkpoint_every=100, device="cpu", threads=1),
    )
    assert result["loss"] == pytest.approx(BEFORE["loss"], abs=1e-5)
    assert result["val_loss"] == pytest.approx(BEFORE["val_loss"], abs=1e-5)
