"""Tokenization stage: round trip, seeded split by document, shard/manifest consistency, budgets, bad shards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from qatlaw import data
from qatlaw.corpus import Document, write_documents

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more out up into do any your what "
    "time people year government state nation congress president war peace law trade labor money power world"
).split()


def synthetic_docs(source: str, n: int, seed: int) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))).capitalize() + "." for _ in range(rng.randint(4, 9))]
        docs.append(Document(source=source, doc_id=f"{source}-{i:03d}", text=" ".join(sentences)))
    return docs


OUTPUTS = ("tokenizer.json", "train.parquet", "val.parquet", "documents.parquet", "manifest.json")


def tokenize(parts: list[Path], out_dir: Path, vocab_size: int = 512) -> dict[str, Path]:
    """Run the tokenization stage on document files; return the output paths by name."""
    out = {name: out_dir / name for name in OUTPUTS}
    data.tokenize_corpus(
        parts,
        tokenizer_path=out["tokenizer.json"],
        train_path=out["train.parquet"],
        val_path=out["val.parquet"],
        documents_path=out["documents.parquet"],
        manifest_path=out["manifest.json"],
        vocab_size=vocab_size,
        min_frequency=2,
        val_fraction=0.1,
        seed=7,
    )
    return out


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    parts = []
    for k, source in enumerate(["alpha", "beta"]):
        path = root / f"{source}.parquet"
        write_documents(synthetic_docs(source, 60, seed=k), path, min_chars=50)
        parts.append(path)
    return tokenize(parts, root)


def test_tokenize_detokenize_round_trip(tokenized):
    tok = Tokenizer.from_file(str(tokenized["tokenizer.json"]))
    for text in ["The government of the people.", "  two  spaces\nand a new line\t tab", "Ünïcödé — “quotes” 1790–2018 ✓"]:
        assert tok.decode(tok.encode(text).ids) == text


def test_eos_is_id_zero_and_ends_every_document(tokenized):
    manifest = json.loads(tokenized["manifest.json"].read_text())
    assert manifest["eos_id"] == 0
    table = pq.read_table(tokenized["train.parquet"]).to_pandas()
    last_of_doc = table.groupby("doc", sort=False)["token"].last()
    assert (last_of_doc == 0).all()
    assert (table["token"] == 0).sum() == table["doc"].nunique()


def test_no_document_in_both_splits(tokenized):
    train_docs = set(pq.read_table(tokenized["train.parquet"])["doc"].to_pylist())
    val_docs = set(pq.read_table(tokenized["val.parquet"])["doc"].to_pylist())
    assert train_docs and val_docs
    assert not train_docs & val_docs
    table = pd.read_parquet(tokenized["documents.parquet"])
    assert set(table.loc[table["split"] == "val", "doc"]) == val_docs
    assert set(table.loc[table["split"] == "train", "doc"]) == train_docs


def test_manifest_counts_equal_parquet_rows(tokenized):
    manifest = json.loads(tokenized["manifest.json"].read_text())
    for split in ("train", "val"):
        assert manifest["splits"][split]["tokens"] == pq.ParquetFile(tokenized[f"{split}.parquet"]).metadata.num_rows
    table = pd.read_parquet(tokenized["documents.parquet"])
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == len(table) == 120
    assert sum(s["train_tokens"] + s["val_tokens"] for s in manifest["sources"].values()) == table["tokens"].sum()
    assert manifest["vocab_size"] == 512 and manifest["token_dtype"] == "uint16"
    assert len(manifest["corpus_sha256"]) == 64


def test_shards_load_with_ids_inside_the_vocabulary(tokenized):
    tokens = data.load_tokens(tokenized["train.parquet"], vocab_size=512)
    assert tokens.dtype == np.uint16 and tokens.max() < 512


def test_split_is_deterministic_seeded_and_order_free():
    docs = pd.DataFrame({"source": ["s"] * 500, "doc_id": [str(i) for i in range(500)]})
    a = data.split_documents(docs, 0.1, seed=1)
    assert np.array_equal(a, data.split_documents(docs, 0.1, seed=1))
    assert not np.array_equal(a, data.split_documents(docs, 0.1, seed=2))
    assert 20 < a.sum() < 80
    shuffled = docs.sample(frac=1.0, random_state=0)
    b = data.split_documents(shuffled, 0.1, seed=1)
    assert dict(zip(shuffled["doc_id"], b)) == dict(zip(docs["doc_id"], a))


def test_split_is_stratified_by_source():
    docs = pd.DataFrame({"source": ["big"] * 3 + ["wide"] * 2000, "doc_id": [str(i) for i in range(2003)]})
    is_val = data.split_documents(docs, 0.01, seed=3)
    assert is_val[:3].sum() == 1
    assert 5 < is_val[3:].sum() < 40


def test_split_always_has_both_sides():
    docs = pd.DataFrame({"source": ["s", "s"], "doc_id": ["a", "b"]})
    assert data.split_documents(docs, 0.001, seed=0).sum() == 1
    with pytest.raises(data.DataError, match="at least 2 documents"):
        data.split_documents(docs.iloc[:1], 0.1, seed=0)


def test_tokenize_is_reproducible(tmp_path, tokenized):
    parts = [tokenized["train.parquet"].parent / f"{s}.parquet" for s in ("alpha", "beta")]
    out = tokenize(parts, tmp_path)
    assert out["tokenizer.json"].read_bytes() == tokenized["tokenizer.json"].read_bytes()
    assert np.array_equal(data.load_tokens(out["train.parquet"]), data.load_tokens(tokenized["train.parquet"]))


def test_vocab_larger_than_the_corpus_supports_is_an_error(tmp_path, tokenized):
    parts = [tokenized["train.parquet"].parent / "alpha.parquet"]
    with pytest.raises(data.DataError, match="data.vocab_size: the corpus supports only"):
        tokenize(parts, tmp_path, vocab_size=60000)
    assert not (tmp_path / "manifest.json").exists()


def test_budgets_beyond_the_training_split_need_allow_repeat():
    manifest = {"splits": {"train": {"tokens": 1000}}}
    assert data.check_budgets(manifest, [500, 1000], allow_repeat=False) == {500: 0.5, 1000: 1.0}
    with pytest.raises(data.DataError, match=r"grid.tokens: budget 2,500 exceeds the 1,000 training tokens .*3 epochs"):
        data.check_budgets(manifest, [500, 2500], allow_repeat=False)
    assert data.check_budgets(manifest, [2500], allow_repeat=True) == {2500: 2.5}


def test_load_tokens_rejects_bad_shards(tmp_path):
    good = tmp_path / "good.parquet"
    data.write_shard(np.array([1, 2, 700]), np.array([0, 0, 0]), good, vocab_size=1024)
    with pytest.raises(data.DataError, match="token id 700 is out of range for vocabulary size 512"):
        data.load_tokens(good, vocab_size=512)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(data.DataError, match="truncated.parquet: not a readable Parquet token shard"):
        data.load_tokens(truncated)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"ids": pa.array([1, 2], pa.int64())}), wrong)
    with pytest.raises(data.DataError, match="wrong.parquet: expected columns token"):
        data.load_tokens(wrong)
    with pytest.raises(data.DataError, match="token shard not found"):
        data.load_tokens(tmp_path / "missing.parquet")


def test_token_dtype_widens_for_large_vocabularies():
    assert data.token_dtype(65536) == np.uint16
    assert data.token_dtype(65537) == np.uint32
