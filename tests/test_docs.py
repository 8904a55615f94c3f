"""The README and docs/ stay true to the code: every relative link resolves, every `make` target their commands
name exists, and every `qatlaw` subcommand and `python -m qatlaw.bench` flag they show is one the parser knows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT
from qatlaw.bench.__main__ import build_parser as bench_parser
from qatlaw.cli import build_parser

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = [p.relative_to(ROOT).as_posix() for p in PAGES]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"```(?:bash|sh)?\n(.*?)```", re.S)


def commands(text: str) -> list[list[str]]:
    """The shell commands of a page: its code blocks' lines and its inline `code` spans, comments dropped, split
    into words (lines that are not one shell command are left out)."""
    found = []
    for chunk in [*CODE.findall(text), *re.findall(r"`([^`\n]+)`", text)]:
        for line in chunk.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                words = words[1:]
            if words:
                found.append(words)
    return found


def options(parser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def test_the_front_door_is_short_and_opens_on_the_stage_table():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 210
    assert text.index("| stage | rule file | `qatlaw` subcommand | module |") < text.index("## Where the law")


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_relative_link_resolves(page: Path):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:|#", target):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: broken link {target}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_command_shown_exists(page: Path):
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    bench = options(bench_parser())
    for words in commands(page.read_text(encoding="utf-8")):
        name = Path(words[0]).name
        if name == "make" and len(words) > 1 and not words[1].startswith("-") and "=" not in words[1]:
            assert words[1] in targets, f"{page.name}: no make target {words[1]!r}"
        elif name == "qatlaw" and len(words) > 1 and not words[1].startswith(("-", "<", "…")):
            assert words[1] in subparsers, f"{page.name}: no qatlaw subcommand {words[1]!r}"
            known = options(subparsers[words[1]])
            for word in words[2:]:
                flag = word.split("=")[0]
                if flag.startswith("--"):
                    assert flag in known, f"{page.name}: qatlaw {words[1]} has no {flag}"
        elif words[:3] == [words[0], "-m", "qatlaw.bench"] and name.startswith("python"):
            for word in words[3:]:
                if word.startswith("--"):
                    assert word.split("=")[0] in bench, f"{page.name}: qatlaw.bench has no {word}"
