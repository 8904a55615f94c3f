"""The run table and δ: metric columns, reading runs.parquet, pairing every QAT run with its BF16 baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qatlaw import config, runtable


def runs(rows: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    """A run table of (size, precision, loss, val_loss) rows at 100K tokens, seed 0, group 32 (BF16: none)."""
    frame = pd.DataFrame(rows, columns=["size", "precision", "loss", "val_loss"])
    base = frame["precision"] == "BF16"
    return frame.assign(
        run_id=frame["size"] + "/100K/seed0/" + frame["precision"].where(base, frame["precision"] + "_g32"),
        N=1000, D=100_000, tokens_requested=100_000, seed=0, group=np.where(base, "none", "32"),
        G=pd.array([pd.NA if b else 32 for b in base], dtype="Int64"), diverged=False,
    )


def test_metrics_are_the_config_choices():
    metric = config.schema_key("fit", "metric")
    assert list(runtable.METRICS) == metric["enum"] and metric["default"] in runtable.METRICS
    assert runtable.metric_columns("val_loss") == ("val_loss", "delta_val")
    assert runtable.metric_columns("loss") == ("loss", "delta")
    with pytest.raises(runtable.RunTableError, match="metric must be one of val_loss, loss, got 'ppl'"):
        runtable.metric_columns("ppl")


def test_delta_is_the_difference_to_the_baseline_of_the_cell():
    table = runs([("a", "BF16", 3.0, 3.5), ("a", "W4A4", 3.25, 3.625),
                  ("b", "BF16", 2.0, 2.5), ("b", "W4A4", 2.5, 2.75)])
    deltas = runtable.delta_table(table).set_index("run_id")
    assert list(deltas.columns) == list(runtable.DELTA_COLUMNS[1:])
    assert deltas.loc["a/100K/seed0/W4A4_g32", ["delta", "delta_val"]].tolist() == [0.25, 0.125]
    assert deltas.loc["b/100K/seed0/W4A4_g32", ["delta", "delta_val"]].tolist() == [0.5, 0.25]
    for loss, delta in runtable.METRICS.values():
        assert (deltas[delta] == deltas[loss] - deltas[f"baseline_{loss}"]).all()


def test_a_diverged_baseline_leaves_its_runs_without_delta():
    table = runs([("a", "BF16", 3.0, 3.5), ("a", "W4A4", 3.25, 3.625)])
    table.loc[table["precision"] == "BF16", "diverged"] = True
    deltas = runtable.delta_table(table)
    assert deltas["diverged"].all() and deltas[["delta", "delta_val"]].isna().all().all()


def test_errors_name_the_run_or_cell(tmp_path):
    with pytest.raises(runtable.RunTableError, match="runs.parquet: run table not found"):
        runtable.read_runs(tmp_path / "runs.parquet")
    with pytest.raises(runtable.RunTableError, match="has no BF16 baseline with the same size, tokens and seed"):
        runtable.delta_table(runs([("a", "W4A4", 3.25, 3.625)]))
    with pytest.raises(runtable.RunTableError, match="more than one BF16 baseline"):
        runtable.delta_table(runs([("a", "BF16", 3.0, 3.5), ("a", "BF16", 3.1, 3.6)]))
    with pytest.raises(runtable.RunTableError, match="run table lacks columns val_loss"):
        runtable.delta_table(runs([("a", "BF16", 3.0, 3.5)]).drop(columns="val_loss"))
    table = runs([("a", "BF16", 3.0, 3.5), ("a", "W4A4", 3.25, 3.625)])
    table.to_parquet(tmp_path / "runs.parquet")
    pd.testing.assert_frame_equal(runtable.read_runs(tmp_path / "runs.parquet"), table.assign(qat_fraction=1.0))
