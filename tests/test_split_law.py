"""The FP→QAT split: per-cell optima, the paper's f*(S) and loss laws fitted to a synthetic run table drawn from
known constants, a one-line reason where the data cannot identify a constant, findings unchanged without split
runs, the split figures, and `qatlaw plan`'s recommended QAT fraction."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from qatlaw import cli, findings, outputs, paper, plots, resample, split

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"s1": 30_000, "s2": 100_000, "s3": 300_000}  # N
TOKENS = (1_000_000, 3_000_000, 10_000_000)
FRACTIONS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0)
TRUE = {"theta": 0.02, "phi": 0.5, "psi": 0.1, "omega": 0.6, "lambda": 4.0, "nu": 0.1, "xi": 0.8, "rho": 0.3}
CHIN = {"A": 50.0, "B": 100.0, "E": 2.0, "alpha": 0.3, "beta": 0.3}


@pytest.fixture(autouse=True)
def fewer_resamples(monkeypatch: pytest.MonkeyPatch) -> None:
    """200 seed resamples per cell and 20 per law: the tests check the estimates, not the intervals' width."""
    monkeypatch.setattr(split, "N_BOOT", 200)
    monkeypatch.setattr(split, "LAW_BOOT", 20)


def synthetic_runs(sizes: dict[str, float] = SIZES, tokens: tuple[int, ...] = TOKENS, seeds: int = 2,
                   noise: float = 0.0005) -> pd.DataFrame:
    """A run table with a BF16 baseline per cell and seed (a seed offset shared by its branches, as a trunk),
    W4A4 G32 branches at FRACTIONS with δ from TRUE (f = 1: the law at f = 0.97; PTQ: twice the law at 0.99)
    plus Gaussian noise."""
    rng = np.random.default_rng(1)
    rows = []
    for (size, N), D, seed in itertools.product(sizes.items(), tokens, range(seeds)):
        bf16 = CHIN["E"] + CHIN["A"] / N ** CHIN["alpha"] + CHIN["B"] / D ** CHIN["beta"] + 0.01 * rng.standard_normal()
        cell = {"size": size, "N": N, "D": D, "tokens_requested": D, "seed": seed, "diverged": False}
        rows.append(cell | {"precision": "BF16", "group": "none", "G": None, "qat_fraction": 1.0, "loss": bf16})
        S = split.tokens_per_parameter_byte(N, D, 4)
        for f in FRACTIONS:
            law_f = {0.0: 0.99, 1.0: 0.97}.get(f, f)
            delta = split.predict_delta(TRUE, N, S, law_f) * (2 if f == 0 else 1)
            rows.append(cell | {"precision": "W4A4", "group": "32", "G": 32, "qat_fraction": f,
                                "loss": bf16 + delta + noise * rng.standard_normal()})
    runs = pd.DataFrame(rows)
    variant = np.where(runs["precision"] == "BF16", "BF16", "W4A4_g32_f" + runs["qat_fraction"].astype(str))
    return runs.assign(run_id=runs["size"] + "/" + runs["tokens_requested"].astype(str) + "/seed" +
                       runs["seed"].astype(str) + "/" + variant, G=runs["G"].astype("Int64"), val_loss=runs["loss"])


def test_cell_optima_match_the_law():
    deltas = split.split_deltas(synthetic_runs(), "val_loss")
    optima = split.cell_optima(deltas)
    assert len(optima) == len(SIZES) * len(TOKENS)
    fs = np.linspace(0.1, 0.7, 601)
    for r in optima.itertuples():
        true = fs[np.argmin(split.predict_delta(TRUE, r.N, r.S, fs))]
        assert abs(r.f_star - true) < 0.08, (r.size, r.tokens_requested, r.f_star, true)
        assert r.f_low <= r.f_high and r.spread == split.SEED_RANGE  # 2 seeds: their range, not an interval
        assert r.f_measured in FRACTIONS and r.ptq_gap > 0 and r.scratch_gap > 0
    assert optima["interior"].all()


def test_optimum_law_recovers_the_papers_constant():
    """f* drawn from the paper's f*(S) with a = 6.7297 and 3% noise gives back a within 0.1, with an interval."""
    a = paper.constants()["split"]["optimum"]["a"]
    S = np.geomspace(20, 2000, 8)
    noise = np.exp(0.03 * np.random.default_rng(0).standard_normal(len(S)))
    optima = pd.DataFrame({"precision": "W4A4", "group": "32", "S": S, "f_star": split.optimum(S, a) * noise})
    law = split.fit_optimum_law(optima, "W4A4", "32", n_boot=100)
    assert law.identified and abs(law.constants["a"] - a) < 0.1
    low, high = law.intervals["a"]
    assert low < law.constants["a"] < high


def test_loss_law_recovers_known_constants():
    law = split.fit_loss_law(split.split_deltas(synthetic_runs(), "val_loss"), "W4A4", "32", n_boot=0)
    assert law.identified and law.n_cells == 9 and law.n_runs == 90
    for name, true in TRUE.items():
        assert law.constants[name] == pytest.approx(true, rel=0.1, abs=0.01), name


def test_unidentified_constants_are_one_line():
    """One size leaves N^ψ and N^ν indistinguishable from φ and λ; one budget too leaves a single S."""
    deltas = split.split_deltas(synthetic_runs(sizes={"s2": 100_000}, tokens=(3_000_000,)), "val_loss")
    loss = split.fit_loss_law(deltas, "W4A4", "32", n_boot=0)
    assert not loss.identified and "\n" not in loss.reason and "not identified" in loss.reason
    assert all(math.isnan(v) for v in loss.constants.values())
    deltas = split.split_deltas(synthetic_runs(sizes={"s2": 100_000}, tokens=TOKENS), "val_loss")
    flat = split.fit_loss_law(deltas, "W4A4", "32", n_boot=0)
    assert not flat.identified and "psi" in flat.reason and "nu" in flat.reason, flat.reason
    optimum = split.fit_optimum_law(split.cell_optima(split.split_deltas(
        synthetic_runs(sizes={"s2": 100_000}, tokens=(3_000_000,)), "val_loss")), "W4A4", "32")
    assert optimum.reason == "a not identified: 1 distinct S among the cells with an optimum (need 2)"


def test_a_table_without_the_column_is_from_scratch():
    runs = pd.read_parquet(ROOT / "reference" / "laptop" / "runs.parquet")
    assert (split.fractions(runs) == 1.0).all() and not split.has_split(runs)
    assert split.has_split(synthetic_runs(tokens=(1_000_000,)))
    assert split.bits("W4A4") == 4 and split.bits("W16A4") == 4 and split.bits("W4A4-fc2a8") == 4
    with pytest.raises(split.SplitError, match="outside the domain"):
        split.optimum(0.5, 6.7)


@pytest.mark.slow
def test_findings_without_split_runs_are_unchanged(tmp_path):
    """reference/laptop (no qat_fraction column) gives exactly its shipped FINDINGS.md and findings.parquet."""
    folder = ROOT / "reference" / "laptop"
    metric = yaml.safe_load((folder / "config.yaml").read_text())["fit"]["metric"]
    title = (folder / "FINDINGS.md").read_text().splitlines()[0].removeprefix("# ")
    table = findings.run_findings(folder, tmp_path / "FINDINGS.md", tmp_path / "findings.parquet", metric, title)
    assert (tmp_path / "FINDINGS.md").read_text() == (folder / "FINDINGS.md").read_text()
    pd.testing.assert_frame_equal(table, pd.read_parquet(folder / "findings.parquet"))


def test_split_findings_of_a_synthetic_table():
    runs = synthetic_runs()
    rows = pd.DataFrame(findings.split_findings(runs, "val_loss"), columns=list(findings.COLUMNS))
    cells = rows[rows["finding"].str.startswith("f* inside (0, 1)")]
    assert len(cells) == 9 and (cells["verdict"] == "reproduced").all()
    assert (cells["interval"] == split.SEED_RANGE).all()
    for start in ("f* grows with S", "loss gap of QAT from scratch", "PTQ (f = 0) worse"):
        row = rows[rows["finding"].str.startswith(start)].iloc[0]
        assert row["verdict"] == "reproduced" and row["ci_low"] > 0, start
    a = rows[rows["finding"].str.contains("exp")].iloc[0]
    assert math.isfinite(a["measured"]) and a["paper"].startswith("6.7297")
    assert a["verdict"] in findings.VERDICTS and "±25%" in a["finding"]
    section = findings.split_law_markdown(runs, "val_loss")
    assert "| loss | W4A4 G32 | rho |" in section and "| f*(S) | W4A4 G32 | a | 6.7297 |" in section
    assert findings.split_findings(pd.read_parquet(ROOT / "reference" / "laptop" / "runs.parquet"), "val_loss") == []


def test_scratch_gap_is_measured_on_the_seeds_that_did_not_choose_the_fraction():
    """Seed 0's best split fraction is 0.2 and seed 1's 0.35: each seed's gap is measured at the other's choice,
    so the gap is the one a user would get, not the best of the runs that measure it."""
    runs = synthetic_runs(sizes={"s2": 100_000}, tokens=(3_000_000,), noise=0.0)
    base = runs.loc[runs["precision"] == "BF16"].set_index("seed")["loss"]
    shape = {0.0: 0.08, 0.1: 0.05, 0.2: 0.03, 0.35: 0.04, 0.5: 0.045, 0.7: 0.05, 1.0: 0.06}
    for seed, best in ((0, 0.2), (1, 0.35)):
        curve = dict(shape) if best == 0.2 else {**shape, 0.2: 0.04, 0.35: 0.03}
        mask = (runs["seed"] == seed) & (runs["precision"] == "W4A4")
        runs.loc[mask, "loss"] = base[seed] + runs.loc[mask, "qat_fraction"].map(curve)
    runs["val_loss"] = runs["loss"]
    gaps = split.seed_gaps(split.split_deltas(runs, "val_loss")).set_index("seed")
    assert gaps.loc[0, "f_hat"] == 0.35 and gaps.loc[1, "f_hat"] == 0.2
    assert gaps["scratch_gap"].to_numpy() == pytest.approx([0.06 - 0.04, 0.06 - 0.04])
    assert split.cell_optima(split.split_deltas(runs, "val_loss"))["scratch_gap"].iloc[0] == pytest.approx(0.025)


def test_split_gap_interval_resamples_cells_and_the_seeds_inside_them():
    """Three cells of 2 seeds whose gaps disagree in sign inside one cell: the interval comes from resampling
    cells and then seeds (qatlaw.resample), so it spans 0, where a resample of the 3 cell means would not."""
    table = pd.DataFrame({"size": ["a", "a", "b", "b", "c", "c"], "tokens_requested": 1, "seed": [0, 1] * 3,
                          "precision": "W4A4", "group": "32", "S": 10.0,
                          "scratch_gap": [0.05, -0.03, 0.04, -0.02, 0.06, -0.03], "ptq_gap": 0.01})
    row = findings._design_mean_row("gap", "> 0", table, "scratch_gap", "")
    plan = resample.of_table(table, ["size", "tokens_requested"], "seed")
    values = table["scratch_gap"].to_numpy()
    expected = np.quantile([values[i].mean() for i in plan.draws(findings.N_BOOT, findings.SEED)], [0.05, 0.95])
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(expected))
    assert row["verdict"] == "within noise" and row["n"] == 6
    cell_means = table.groupby("size")["scratch_gap"].mean().to_numpy()
    assert (cell_means > 0).all()  # every cell mean is positive: a cell-mean resample would say "reproduced"


def test_split_rows_can_come_out_opposite():
    """Every seed's best fraction is 1 (QAT from scratch) and PTQ beats every QAT fraction: f* wholly at 1
    (opposite), the gap of scratch over f̂ negative (opposite), PTQ better than the worst QAT (opposite)."""
    runs = synthetic_runs(noise=0.0)
    base = runs[runs["precision"] == "BF16"].set_index(["size", "tokens_requested", "seed"])["loss"]
    qat = runs["precision"] == "W4A4"
    keys = pd.MultiIndex.from_frame(runs.loc[qat, ["size", "tokens_requested", "seed"]])
    curve = runs.loc[qat, "qat_fraction"].map({0.0: 0.02, 0.1: 0.09, 0.2: 0.08, 0.35: 0.07, 0.5: 0.06, 0.7: 0.05,
                                                1.0: 0.03})
    runs.loc[qat, "loss"] = base.reindex(keys).to_numpy() + curve.to_numpy() + \
        0.001 * np.random.default_rng(0).standard_normal(int(qat.sum()))
    runs["val_loss"] = runs["loss"]
    rows = pd.DataFrame(findings.split_findings(runs, "val_loss"), columns=list(findings.COLUMNS))
    verdict = dict(zip(rows["finding"], rows["verdict"]))
    assert {v for k, v in verdict.items() if k.startswith("f* inside")} == {"opposite"}
    assert verdict[next(k for k in verdict if k.startswith("loss gap"))] == "opposite"
    assert verdict[next(k for k in verdict if k.startswith("PTQ"))] == "opposite"


def test_plan_recommends_a_fraction(tmp_path, capsys):
    """The paper's f*(S) by default (no loss at f*: its constants are not in our sources); a fitted law when
    --law points at a fit folder beside a run table with split runs; bad inputs one error line."""
    assert cli.main(["plan", "--N", "1e9", "--D", "1e11", "--precision", "W4A4"]) == 0
    out = capsys.readouterr().out
    f = split.optimum(1e11 / (1e9 * 4 / 8), paper.constants()["split"]["optimum"]["a"])
    assert f"recommended f* = {f:.3f}" in out and "law paper" in out
    assert f"predicted loss at f = {f:.3f}: – (the paper's loss-law constants" in out
    assert "predicted loss at f = 1 (QAT from scratch): " in out
    shutil.copytree(ROOT / "src" / "qatlaw" / "laws" / "laptop", tmp_path / "fit")
    synthetic_runs().to_parquet(tmp_path / "runs.parquet")
    assert cli.main(["plan", "--law", str(tmp_path / "fit"), "--N", "1e5", "--D", "3e6", "--precision", "W4A4"]) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"(fitted to {tmp_path / 'runs.parquet'})" in lines["QAT fraction for W4A4 at G = 8"]
    fitted = next(v for k, v in lines.items() if k.startswith("predicted loss at f = 0"))
    assert float(fitted.split(": ")[1]) > 0
    assert float(lines["predicted loss at f = 1 (QAT from scratch)"].split(": ")[1].split()[0]) > 0
    for argv, message in ((["--precision", "BF16"], "precision BF16 quantizes nothing"),
                          (["--precision", "W9A9"], "--precision W9A9: invalid precision"),
                          (["--D", "1e8"], "outside the domain")):
        args = {"--N": "1e9", "--D": "1e11", **dict(zip(argv[::2], argv[1::2]))}
        assert cli.main(["plan", *itertools.chain.from_iterable(args.items())]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("name", list(outputs.SPLIT_FIGURES))
def test_split_figures_render(name, tmp_path):
    """From a synthetic split table, and (an explanation, not an error) from reference/laptop without one."""
    runs = tmp_path / "runs.parquet"
    synthetic_runs(sizes={"s1": 30_000, "s3": 300_000}, tokens=(1_000_000, 10_000_000)).to_parquet(runs)
    plots.make_figure(name, {"runs": runs}, tmp_path / f"{name}.png", "synthetic")
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000 and (tmp_path / f"{name}.svg").is_file()
    plots.make_figure(name, {"runs": ROOT / "reference" / "laptop" / "runs.parquet"}, tmp_path / "empty.png", "")
    assert (tmp_path / "empty.png").is_file()


def test_split_figures_only_for_a_split_grid():
    assert not outputs.split_grid({"sizes": ["0.1M"]}) and not outputs.split_grid({"qat_fractions": [1.0]})
    assert outputs.split_grid({"qat_fractions": [1.0], "extra": [{"qat_fractions": [0.0, 0.5, 1.0]}]})
    assert not set(outputs.SPLIT_FIGURES) & set(outputs.FIGURES)
