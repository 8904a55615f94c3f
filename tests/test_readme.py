"""The READMEs' numbers about the shipped studies are the shipped files' numbers: every generated block
(`<!-- qatlaw:KIND STUDY -->`) equals what `qatlaw.readme` makes of reference/, and a stale one is found."""

from __future__ import annotations

from pathlib import Path

import pytest

from qatlaw import readme

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "reference" / "README.md"]


@pytest.mark.parametrize("doc", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_every_generated_block_matches_the_shipped_files(doc: Path):
    assert readme.BLOCK.search(doc.read_text(encoding="utf-8")), f"{doc} quotes no shipped study"
    assert readme.stale(doc) == [], f"run `make readme`: these blocks of {doc.name} differ from reference/"


def test_every_shipped_study_is_quoted_with_its_counts_and_wall_time():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for study in ("laptop-v2", "laptop", "laptop-split"):
        assert f"<!-- qatlaw:study {study} -->" in text, study
    block = readme.study_block(ROOT / "reference" / "laptop-v2")
    assert "96 runs, 0 diverged; 4.55 h of 2 cores in 5 parts" in block and "FINDINGS.md, 20 rows" in block


def test_a_drifted_number_is_stale_and_update_restores_it(tmp_path: Path):
    doc = tmp_path / "doc.md"
    fresh = f"<!-- qatlaw:study laptop -->\n{readme.study_block(ROOT / 'reference' / 'laptop')}<!-- /qatlaw -->\n"
    doc.write_text(fresh.replace("70 runs", "71 runs"), encoding="utf-8")
    assert readme.stale(doc) == ["study laptop"]
    assert readme.update(doc) == 1 and doc.read_text(encoding="utf-8") == fresh and readme.stale(doc) == []


def test_a_bad_block_is_one_error_line(tmp_path: Path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- qatlaw:nonsense laptop -->\n<!-- /qatlaw -->\n", encoding="utf-8")
    with pytest.raises(readme.ReadmeError, match="unknown kind"):
        readme.stale(doc)
    doc.write_text("<!-- qatlaw:study nowhere -->\n<!-- /qatlaw -->\n", encoding="utf-8")
    with pytest.raises(readme.ReadmeError, match="no shipped study"):
        readme.stale(doc)
