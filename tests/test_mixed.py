"""Mixed precision: override parsing, exact relative changes against the base run, the layer ranking."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qatlaw import mixed


def deltas(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """A δ table (as :func:`qatlaw.runtable.delta_table` gives) from (size, group, precision, δ) rows at
    100K tokens; validation δ are twice the training δ."""
    frame = pd.DataFrame(rows, columns=["size", "group", "precision", "delta"])
    return frame.assign(
        run_id=frame["size"] + "/100K/seed0/" + frame["precision"] + "_g" + frame["group"],
        N=1000, D=100_000, tokens_requested=100_000, seed=0, G=frame["group"].replace("channel", "64").astype("Int64"),
        delta_val=2 * frame["delta"],
    )


def test_overrides_are_parsed_against_the_base():
    assert mixed.overrides("W4A4-fc2a8") == ("W4A4", [("fc2", "activation", 8)])
    assert mixed.overrides("W4A4-fc2w8") == ("W4A4", [("fc2", "weight", 8)])
    assert mixed.overrides("W4A4-qkva8-fc2a8") == ("W4A4", [("qkv", "activation", 8), ("fc2", "activation", 8)])
    with pytest.raises(mixed.MixedError, match="invalid precision"):
        mixed.overrides("W4A4-xya8")


def test_relative_change_is_exact_on_hand_values():
    table = deltas([("s", "32", "W4A4", 0.10), ("s", "32", "W4A4-fc2a8", 0.08), ("s", "256", "W4A4", 0.07),
                    ("s", "256", "W4A4-fc2a8", 0.04), ("s", "32", "W4A4-qkva8-fc2a8", 0.05)])
    out = mixed.mixed_precision(table)
    assert list(out.columns) == list(mixed.MIXED_COLUMNS)
    loss = out[out["metric"] == "loss"].set_index(["override", "group"])
    assert loss.loc[("fc2a8", "32"), "relative_change"] == pytest.approx(-0.2)
    assert loss.loc[("fc2a8", "256"), "relative_change"] == pytest.approx(-3 / 7)
    assert loss.loc[("fc2a8", "32"), "change"] == pytest.approx(-0.02)
    assert tuple(loss.loc[("fc2a8", "32"), ["layer", "tensor", "bits"]]) == ("fc2", "activation", 8)
    both = loss.loc[("qkva8-fc2a8", "32")]
    assert both["n_overrides"] == 2 and pd.isna(both["layer"]) and pd.isna(both["bits"])
    assert both["relative_change"] == pytest.approx(-0.5)
    val = out[out["metric"] == "val_loss"].set_index(["override", "group"])
    assert val.loc[("fc2a8", "32"), "delta_base"] == pytest.approx(0.2)
    assert val.loc[("fc2a8", "32"), "relative_change"] == pytest.approx(-0.2)


def test_relative_change_needs_a_positive_base():
    table = deltas([("s", "32", "W4A4", -0.01), ("s", "32", "W4A4-fc2a8", 0.02), ("t", "32", "W4A4-oa8", 0.03)])
    loss = mixed.mixed_precision(table).query("metric == 'loss'").set_index("override")
    assert loss.loc["fc2a8", "change"] == pytest.approx(0.03) and np.isnan(loss.loc["fc2a8", "relative_change"])
    assert np.isnan(loss.loc["oa8", "delta_base"]) and np.isnan(loss.loc["oa8", "change"])  # no base run


def test_ranking_orders_overrides_by_mean_relative_change():
    rows = []
    for size, base in (("a", 0.10), ("b", 0.20)):
        rows += [(size, "32", "W4A4", base), (size, "32", "W4A4-fc2a8", 0.6 * base),
                 (size, "32", "W4A4-qkva8", 0.9 * base), (size, "32", "W4A4-fc2w8", 1.1 * base)]
    rows += [("c", "32", "W16A4", 0.1), ("c", "32", "W16A4-fc2a8", 0.05)]
    ranked = mixed.ranking(mixed.mixed_precision(deltas(rows)))
    assert list(ranked.columns) == list(mixed.RANKING_COLUMNS)
    w4a4 = ranked.query("metric == 'loss' and base_precision == 'W4A4'")
    assert w4a4["override"].tolist() == ["fc2a8", "qkva8", "fc2w8"]
    assert w4a4["rank"].tolist() == [1, 2, 3]
    assert w4a4["mean_relative_change"].tolist() == pytest.approx([-0.4, -0.1, 0.1])
    assert w4a4["mean_change"].tolist() == pytest.approx([-0.06, -0.015, 0.015])
    assert w4a4["n"].tolist() == [2, 2, 2] and w4a4["n_relative"].tolist() == [2, 2, 2]
    w16a4 = ranked.query("metric == 'loss' and base_precision == 'W16A4'").iloc[0]
    assert (w16a4["override"], w16a4["rank"], w16a4["mean_relative_change"]) == ("fc2a8", 1, pytest.approx(-0.5))


def test_run_mixed_writes_both_tables(tmp_path):
    rows = [("s/100K/seed0/BF16", "BF16", "none", None, 3.0, 3.1),
            ("s/100K/seed0/W4A4_g32", "W4A4", "32", 32, 3.1, 3.3),
            ("s/100K/seed0/W4A4-fc2a8_g32", "W4A4-fc2a8", "32", 32, 3.05, 3.15)]
    runs = pd.DataFrame(rows, columns=["run_id", "precision", "group", "G", "loss", "val_loss"])
    runs = runs.assign(size="s", N=1000, D=100_000, tokens_requested=100_000, seed=0, diverged=False)
    runs.astype({"G": "Int64"}).to_parquet(tmp_path / "runs.parquet")
    ranked = mixed.run_mixed(tmp_path / "runs.parquet", tmp_path / "mixed.parquet", tmp_path / "ranking.parquet")
    assert ranked.set_index("metric")["mean_relative_change"].to_dict() == pytest.approx(
        {"loss": -0.5, "val_loss": -0.75})
    assert pd.read_parquet(tmp_path / "mixed.parquet")["relative_change"].tolist() == pytest.approx([-0.5, -0.75])
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ranking.parquet"), ranked)


def test_no_override_runs_is_an_error():
    with pytest.raises(mixed.MixedError, match="no run has a precision with per-layer overrides"):
        mixed.mixed_precision(deltas([("s", "32", "W4A4", 0.1)]))
