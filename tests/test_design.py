"""What a grid resolves before it runs (qatlaw.design, qatlaw.noise): simulated studies fitted by the project's
fitter, the noise model of a run table, and the one-line errors of bad input."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from qatlaw import design, fit, laws, noise
from qatlaw.precision import BASELINE

SIZES = (74e6, 145e6, 297e6, 595e6)


def grid(ratios=(20, 80, 320), groups=(32, 128), seeds=(0,), sizes=SIZES, precision="W4A4") -> pd.DataFrame:
    """A design: every size × D/N ratio × seed with a BF16 baseline and one run per G."""
    rows = []
    for N, ratio, seed in itertools.product(sizes, ratios, seeds):
        rows.append({"precision": BASELINE, "size": f"{N:g}", "N": N, "D": ratio * N, "G": math.nan, "seed": seed})
        rows += [{"precision": precision, "size": f"{N:g}", "N": N, "D": ratio * N, "G": float(G), "seed": seed}
                 for G in groups]
    return pd.DataFrame(rows)


def paper_plan(table: pd.DataFrame, sd: float = 0.01) -> design.Plan:
    law = laws.load("paper")
    truth = design.truth(law, table, ["W4A4"])
    return design.plan(truth, table, noise.constant(sd), ["W4A4"])


def rows_of(prediction: design.Prediction) -> pd.DataFrame:
    return prediction.table.set_index(["law", "constant"])


@pytest.mark.parametrize("ratios", [(20,), (20, 25)])  # exactly on the ray (collinear), and D/N spanning 1.25x
def test_a_grid_on_one_ray_cannot_separate_gamma_N_from_gamma_D(ratios):
    result = rows_of(design.predict(paper_plan(grid(ratios=ratios)), 4, chinchilla=False))
    for constant in ("gamma_N", "gamma_D"):
        row = result.loc[("unified", constant)]
        assert row["not_identified"] == 1.0 and row["p_excludes_0"] == 0.0
        assert row["note"].startswith("not separable in 4: ") and "one D/N ray" in row["note"]


def test_a_grid_with_one_G_leaves_gamma_G_unidentified_and_k_at_that_G():
    result = rows_of(design.predict(paper_plan(grid(groups=(64,))), 6, chinchilla=False))
    assert result.loc[("unified", "gamma_G"), "not_identified"] == 1.0
    assert result.loc[("unified", "gamma_G"), "note"] == "not identified: one G"
    assert result.loc[("unified", "gamma_N"), "not_identified"] == 0.0
    paper_k = laws.load("paper").params.query("precision == 'W4A4' and constant in ['k', 'gamma_G']")
    k, gamma_G = paper_k.set_index("constant")["value"].loc[["k", "gamma_G"]]
    assert result.loc[("unified", "k"), "true"] == pytest.approx(k * 6**gamma_G)


def test_predictions_do_not_depend_on_the_number_of_workers():
    p = paper_plan(grid())
    one, two = (design.predict(p, 6, seed=3, chinchilla=False, workers=w).table for w in (1, 2))
    pd.testing.assert_frame_equal(one, two)


def test_a_prediction_gives_the_range_of_widths_a_study_may_get_and_a_comparison_places_the_actual_in_it(tmp_path):
    from qatlaw.cli.design import compared_resamples, with_actual

    table = design.predict(paper_plan(grid()), 8, seed=2, boot=4, chinchilla=False).table
    gammas = table[table["constant"].isin(design.EXPONENTS)]
    assert ((gammas["width_low"] <= gammas["width"]) & (gammas["width"] <= gammas["width_high"])).all()
    assert (gammas["width_low"] < gammas["width_high"]).all()  # bootstrapped: the studies' widths differ
    row = gammas.iloc[0]
    actual = pd.DataFrame([{"law": "unified", "precision": "W4A4", "constant": row["constant"], "value": row["true"],
                            "ci_low": 0.0, "ci_high": w, "n_runs": 1, "n_dropped": 0, "objective": 0.0}
                           for w in (row["width_high"] * 2,)])
    actual.to_parquet(tmp_path / "params.parquet")
    compared = with_actual(table, str(tmp_path)).set_index("constant")
    assert not compared.loc[row["constant"], "within"] and compared.loc[row["constant"], "ratio"] < 0.5
    # the note that asks for as many resamples as the study's
    assert compared_resamples(str(tmp_path)) == 0 and compared_resamples(str(ROOT / "reference/quartet/fit")) == 200


def brute_force_widths(p: design.Plan, realizations: int, n_boot: int) -> pd.Series:
    """Mean width of the fit's own bootstrap interval of every exponent over simulated studies of a plan."""
    widths = []
    with design._quiet_fits():
        for r in range(realizations):
            _, deltas = design.replicate(p, np.random.default_rng([99, r]))
            ci = fit.DeltaLaw(use_D=True).fit(deltas, n_boot=n_boot, seed=r).ci
            widths.append({c: ci[c][1] - ci[c][0] for c in design.EXPONENTS})
    return pd.DataFrame(widths).mean()


@pytest.mark.slow  # 12-17 s each on one busy core: 16 bootstraps of 200 resamples and 60-200 simulated studies
@pytest.mark.parametrize("seeds,boot,replicates", [((0,), 0, 200), ((0, 1), 20, 60)])
def test_predicted_widths_match_a_brute_force_bootstrap_within_20_percent(seeds, boot, replicates):
    """The predicted 90% width against the width of the fit's own bootstrap interval (200 resamples) averaged over
    16 simulated studies, on 4 sizes × 5 D/N × 2 G: the spread of the estimates with one seed per cell (the
    assumption of ``boot`` 0 and of the search's screening), the replicates' own bootstraps with two seeds (where
    the spread is narrower than what a study reports). Measured at commit time (predicted / brute force): one seed
    γN 0.84, γD 0.96, γG 0.98; two seeds 0.82, 0.90, 0.86 (the spread alone: 0.92, 0.71, 0.77)."""
    p = paper_plan(grid(seeds=seeds, ratios=(10, 20, 40, 80, 160)), sd=0.02)
    predicted = rows_of(design.predict(p, replicates, seed=1, boot=boot, chinchilla=False, workers=2)).loc["unified"]
    ratio = predicted.loc[list(design.EXPONENTS), "width"] / brute_force_widths(p, 16, 200)
    assert ((ratio > 0.8) & (ratio < 1.2)).all(), ratio.to_dict()


def test_the_noise_model_of_a_table_with_repeated_seeds_recovers_its_trend():
    rng = np.random.default_rng(0)
    rows = []
    for N, D, seed in itertools.product((1e5, 3e5, 1e6), (2e6, 8e6), range(6)):
        sd = 0.5 * N**0.2 * D**-0.3
        base = 3.0 + rng.normal(0, 0.02)
        rows.append({"precision": BASELINE, "N": N, "D": D, "G": math.nan, "seed": seed, "val_loss": base})
        rows.append({"precision": "W4A4", "N": N, "D": D, "G": 32.0, "seed": seed,
                     "val_loss": base + 0.05 + rng.normal(0, sd)})
    table = pd.DataFrame(rows).assign(run_id=lambda t: [f"r{i}" for i in range(len(t))], diverged=False, loss=0.0,
                                      size=lambda t: t["N"].astype(str), tokens_requested=lambda t: t["D"],
                                      group=lambda t: t["G"].astype(str))
    model = noise.from_runs(table, "val_loss", "synthetic")
    assert model.delta.b == pytest.approx(0.2, abs=0.25) and model.delta.c == pytest.approx(-0.3, abs=0.25)
    assert model.delta.sd(3e5, 4e6) == pytest.approx(0.5 * 3e5**0.2 * 4e6**-0.3, rel=0.3)
    assert model.loss.sd(1e5, 1e6) == pytest.approx(0.02, rel=0.3)
    assert "synthetic" in model.describe() and "trend in N and D" in model.describe()


def test_a_noise_model_needs_repeated_seeds():
    with pytest.raises(noise.NoiseError, match=r"^noise model from .*quartet/runs.parquet: no cell has its δ measured "
                                               r"at two or more seeds; a noise model needs repeated seeds"):
        noise.load(str(ROOT / "reference" / "quartet" / "runs.parquet"), "val_loss")
    with pytest.raises(noise.NoiseError, match="^the noise sd of the δ must be a positive number, got -0.01$"):
        noise.load("-0.01", "val_loss")


def test_a_precision_or_group_size_the_law_cannot_evaluate_is_one_line():
    with pytest.raises(design.DesignError, match=r"^law paper has no constants for precision W2A2 \(it has: W4A4, "):
        design.truth(laws.load("paper"), grid(precision="W2A2"), ["W2A2"])
    quartet = laws.load("quartet")
    with pytest.raises(design.DesignError, match=r"^law quartet holds at G = 32 only for MXFP4-fwd \(its gamma_G is "
                                                 r"not identified\); the grid has G = 32, 128$"):
        design.truth(quartet, grid(precision="MXFP4-fwd"), ["MXFP4-fwd"])


@pytest.fixture(scope="module")
def paper_config() -> dict:
    from qatlaw import config

    return config.load(ROOT / "config.yaml", ROOT / "config" / "paper.yaml", {"data": {"vocab_size": 100278}},
                       check_files=False)


def small_search(cfg: dict, target) -> tuple:
    from qatlaw import design_search

    space = design_search.candidates(cfg, ["12M", "74M"], [10, 160], [128, "channel"], [1], 1)
    s = design_search.Search(cfg, ["W4A4"], laws.load("paper"), noise.constant(0.01), target, 4, 0, 0, 1)
    return design_search, space, s


def test_the_space_is_priced_by_qatlaw_cost_and_its_overlays_are_valid_grids(paper_config):
    from qatlaw import cost

    ds, space, s = small_search(paper_config, None)
    assert [c.describe() for c in space] == ["sizes 12M, 74M; D/N 10, 160; G 128, channel; 1 seed"]
    cfg = s.config_of(space[0])
    plans = cost.run_plans(cfg)
    assert len(plans) == 2 * 2 * 3 and plans["gpu_hours"].sum() == pytest.approx(space[0].gpu_hours)
    assert (plans["gpus"] == 8).all() and not cfg["grid"].get("ablation")
    table = design.of_config(cfg)
    assert np.allclose(sorted(set((table["D"] / table["N"]).round(-1))), [10, 160], rtol=0.05)
    assert set(table["G"].dropna()) == {128, 384, 768}  # channel: the hidden size of 12M and 74M


def test_an_unreachable_target_names_the_best_grid_found(paper_config):
    ds, space, s = small_search(paper_config, None)
    s = ds.Search(**{**s.__dict__, "target": ds.Target(0.8, 0.01)})
    with pytest.raises(design.DesignError, match=r"^no grid among the 1 cheapest of 1 grids within the budget "
                                                 r"meets the target \(.*half-width at most 1% of its value\); the "
                                                 r"best found, sizes 12M, 74M; D/N 10, 160; G 128, channel; 1 seed "
                                                 r"\(\d+ GPU-hours\), resolves in 40 studies, spread: W4A4 gamma_N "
                                                 r"P\(excl. 0\) .*"):
        ds.search(s, space, 1e9, 10)
    with pytest.raises(design.DesignError, match=r"^no grid of the space fits the budget of 10 GPU-hours: the "
                                                 r"cheapest, sizes 12M, 74M; D/N 10, 160; .* costs \d+$"):
        ds.search(s, space, 10, 10)


def test_the_command_gives_one_line_for_bad_input_before_simulating(capsys):
    from qatlaw import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0 and "design" in capsys.readouterr().out
    quartet = str(ROOT / "reference" / "quartet" / "runs.parquet")
    assert cli.main(["design", quartet, "--law", "quartet", "--noise", quartet]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qatlaw design: error: noise model from ") and "needs repeated seeds" in err[-1]
    assert cli.main(["design", quartet, "--law", "paper", "--noise", "0.01"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "qatlaw design: error: law paper has no constants for precision MXFP4-full")


def test_a_check_stops_early_only_when_its_grid_can_neither_pass_nor_beat_the_best(paper_config):
    """A bootstrapped stage stops once the grid can no longer meet the target nor score above the best grid so far:
    the score it then gives is a ceiling of the one all its studies give, and below the best."""
    from qatlaw import design_search as ds

    space = ds.candidates(paper_config, ["12M", "74M"], [10, 320], [128, "channel"], [1], 1)
    s = ds.Search(paper_config, ["W4A4"], laws.load("paper"), noise.constant(0.01), ds.Target(0.8, None), 30, 5, 0, 1)
    plan = s.plan(space[0])
    full, _, how = ds._check(s, plan)
    assert how == "30 studies bootstrapped 5 times" and full[0] == 2  # it fails at the full check (coverage)
    best = (2, 1, 0.9)
    ceiling, table, how = ds._check(s, plan, best)
    assert re.fullmatch(r"30 studies bootstrapped 5 times, stopped after (5|10|15|20|25)", how), how
    assert full <= ceiling < best
    assert ds._check(s, plan, (2, 0, 0.5))[0] == full  # it could still beat this best: every study runs


@pytest.mark.slow  # about 30 s on one busy core: the same search twice
def test_stopping_hopeless_checks_early_does_not_change_the_answer(paper_config):
    from qatlaw import design_search as ds

    space = ds.candidates(paper_config, ["12M", "74M"], [10, 320], [32, 64, 128, "channel"], [1, 2], 1)
    s = ds.Search(paper_config, ["W4A4"], laws.load("paper"), noise.constant(0.01), ds.Target(0.8, None), 20, 4, 0, 1)
    answers = []
    for curtail in (True, False):
        with pytest.raises(design.DesignError) as failed:
            ds.search(s, space, 1e9, 100, curtail=curtail)
        answer, effort = str(failed.value).split(" (search: ")
        answers.append(answer)
        assert "grids per stage: spread screen" in effort
    assert answers[0] == answers[1] and "the best found, sizes 12M, 74M" in answers[0]


def test_the_number_options_refuse_inf_nan_and_fractional_counts():
    import argparse

    from qatlaw.cli import argtypes

    for bad in ("inf", "nan", "1,inf", "-1", "0", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            argtypes.numbers(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="^expected one positive number"):
        argtypes.positive("1,2")
    assert argtypes.numbers("10, 20") == [10.0, 20.0] and argtypes.counts("1,2") == [1, 2]
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected positive whole numbers, got '1.5'$"):
        argtypes.counts("1.5")
