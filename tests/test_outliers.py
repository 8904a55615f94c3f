"""Outlier statistics: kurtosis, max/median and top-1% share on known inputs, one row per linear layer."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch

from qatlaw import analysis_plan, outliers, train
from qatlaw.grid import RunSettings
from qatlaw.tokens import write_tokens

VOCAB = 64
SETTINGS = RunSettings(
    size="toy", layers=3, hidden=32, ffn=64, heads=4, kv_heads=2, lr=3e-3, batch_size=4, tokens=1024,
    precision="BF16", group=None, seed=0, seq_len=16, warmup_fraction=0.1, min_lr_ratio=0.1, beta1=0.9,
    beta2=0.95, weight_decay=0.1, grad_clip=1.0, loss_ema=0.9, eval_tokens=256, clip="paper", format="int", lac="paper",
)


def test_kurtosis_on_hand_values():
    assert float(outliers.kurtosis(torch.tensor([1.0, -1.0, 1.0, -1.0]))) == pytest.approx(1.0)
    # centred (-1, -1, -1, 3): μ2 = 3, μ4 = 21
    assert float(outliers.kurtosis(torch.tensor([0.0, 0.0, 0.0, 4.0]))) == pytest.approx(21 / 9)
    per_row = outliers.kurtosis(torch.tensor([[0.0, 0.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]]), dim=-1)
    assert float(per_row[0]) == pytest.approx(21 / 9) and math.isnan(per_row[1])
    # all elements: (0, 0, 0, 4, 2, 2, 2, 2), mean 1.5: μ2 = (3·1.5² + 2.5² + 4·0.5²) / 8 = 1.75, μ4 likewise
    pooled = outliers.pooled_kurtosis(torch.tensor([[0.0, 0.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]]))
    assert pooled == pytest.approx((3 * 1.5**4 + 2.5**4 + 4 * 0.5**4) / 8 / 1.75**2)
    assert math.isnan(outliers.pooled_kurtosis(torch.ones(3, 2)))


def reference_stats(x: torch.Tensor) -> dict[str, float]:
    """The statistics of x computed whole, in float64, with a full sort."""
    x = x.double()
    magnitude = x.abs().flatten().sort().values
    n = magnitude.numel()
    n_top = math.ceil(n / 100)
    centred = x - x.mean()
    return {
        "kurtosis_token": float(outliers.kurtosis(x).nanmean()),
        "kurtosis_all": float(centred.pow(4).mean() / centred.square().mean().square()),
        "max_median_ratio": float(magnitude[-1] / ((magnitude[(n - 1) // 2] + magnitude[n // 2]) / 2)),
        "top1_share": float(magnitude[n - n_top:].sum() / magnitude.sum()),
    }


def test_statistics_over_chunks_of_rows_are_those_of_the_whole_input():
    rows = 2 * analysis_plan.CHUNK_TOKENS + 3
    x = torch.randn(rows, 24, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3.0, 24) + 0.5
    x[5, 3] = 40.0
    assert outliers.activation_stats(x) == pytest.approx(reference_stats(x), rel=1e-12)


def test_gaussian_kurtosis_is_three():
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))
    stats = outliers.activation_stats(x)
    assert stats["kurtosis_all"] == pytest.approx(3.0, abs=0.1)
    assert stats["kurtosis_token"] == pytest.approx(3.0, abs=0.1)


def test_a_planted_outlier_channel_raises_kurtosis():
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(0))
    x[:, 7] = 20.0  # per token about (20⁴ + 255·3) / 256 / ((20² + 255) / 256)² ≈ 96 (centring: 95)
    stats = outliers.activation_stats(x)
    assert stats["kurtosis_token"] == pytest.approx(95, rel=0.05)
    assert stats["kurtosis_all"] > 50
    assert stats["max_median_ratio"] == pytest.approx(20 / 0.6745, rel=0.05)  # median of |N(0, 1)| ≈ 0.6745


def test_max_median_and_top_share_of_a_known_vector():
    x = torch.tensor([[100.0] + [1.0] * 98 + [-2.0]])  # 100 elements: the top 1% is the single 100
    stats = outliers.activation_stats(x)
    assert stats["top1_share"] == pytest.approx(100 / 200)
    assert stats["max_median_ratio"] == pytest.approx(100.0)
    stats = outliers.activation_stats(torch.tensor([[-4.0, 1.0, 2.0, 3.0]] * 50))  # 200 elements: top 2 are 4s
    assert stats["top1_share"] == pytest.approx(8 / 500)
    assert stats["max_median_ratio"] == pytest.approx(4 / 2.5)  # even count: the mean of the middle two


def test_one_row_per_linear_layer(tmp_path):
    model = train.build_model(SETTINGS, VOCAB).eval()
    path = tmp_path / "run" / "model.pt"
    path.parent.mkdir()
    torch.save({"settings": asdict(SETTINGS), "model_config": asdict(model.cfg), "model": model.state_dict()}, path)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.uint16)
    write_tokens(tokens, tmp_path / "val.npy", VOCAB)

    table = outliers.run_outliers([path], tmp_path / "val.npy", tmp_path / "outliers.parquet", n_tokens=64)
    assert list(table.columns) == list(outliers.OUTLIER_COLUMNS)
    assert list(zip(table["layer_index"], table["layer_type"])) == [
        (i, t) for i in range(3) for t in ("qkv", "o", "fc1", "fc2")]
    assert table["in_features"].tolist() == [32, 32, 32, 64] * 3 and set(table["n_tokens"]) == {64}
    assert set(table["precision"]) == {"BF16"} and set(table["run_group"]) == {"none"}
    assert ((table["top1_share"] > 0.01) & (table["top1_share"] < 1)).all()
    direct = outliers.outlier_stats(model, torch.from_numpy(tokens[:64].astype(np.int64)).view(4, 16))
    np.testing.assert_allclose(table["kurtosis_token"], direct["kurtosis_token"], rtol=1e-9)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "outliers.parquet"), table)
    # one window per micro-batch: the same statistics up to the float rounding of the blocks' matmuls
    windows = torch.from_numpy(tokens[:64].astype(np.int64)).view(4, 16)
    pd.testing.assert_frame_equal(outliers.outlier_stats(model, windows, micro_batch=1), direct, rtol=1e-6)


def test_qat_model_inputs_are_measured_before_fake_quant():
    s = dataclasses.replace(SETTINGS, precision="W4A4", group=16)
    model = train.build_model(s, VOCAB).eval()
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    first = outliers.outlier_stats(model, idx).iloc[0]
    expected = outliers.activation_stats(model.blocks[0].attn_norm(model.tok_emb(idx)).detach().reshape(-1, 32))
    assert first[list(outliers.STAT_COLUMNS)].to_dict() == pytest.approx(expected)
