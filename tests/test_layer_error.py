"""Per-layer quantization error: exact errors, hooks on every linear layer's input (whole or in micro-batches),
model files round-trip, the gather of per-cell tables."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MODEL_SETTINGS, VOCAB, save_model

from qatlaw import analysis_plan, layer_error, train
from qatlaw.tokens import write_tokens


def batch(n_windows: int = 3, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n_windows, seq_len), generator=torch.Generator().manual_seed(1))


def test_relative_mse_on_hand_values():
    # paper clip, G = 2: scale 1/8; 1 -> code 8 clamped to 7 -> 0.875; 0.3 -> 2.4 -> 2 -> 0.25
    err = layer_error.relative_mse(torch.tensor([[1.0, 0.3]]), 4, 2)
    assert err == pytest.approx((0.125**2 + 0.05**2) / (1 + 0.09))
    assert layer_error.qsnr_db(err) == pytest.approx(-10 * math.log10(0.018125 / 1.09))
    # symmetric clip: scale 1/7; 0.3 * 7 = 2.1 -> 2 -> 2/7
    err = layer_error.relative_mse(torch.tensor([[1.0, 0.3]]), 4, 2, clip="symmetric")
    assert err == pytest.approx((0.3 - 2 / 7) ** 2 / 1.09)


def test_a_tensor_on_its_int4_grid_has_no_error():
    codes = torch.randint(-8, 8, (6, 32), generator=torch.Generator().manual_seed(0)).float()
    codes[:, ::8] = -8  # every group of 8 holds the lowest code, so its scale is absmax / 8 exactly
    steps = 2.0 ** torch.randint(-3, 3, (6, 4), generator=torch.Generator().manual_seed(1))
    steps[:, 0] = 8.0  # one step per group of 8, the first group's the largest
    x = codes * steps.repeat_interleave(8, dim=1)
    assert layer_error.relative_mse(x, 4, 8) == 0
    assert layer_error.qsnr_db(0.0) == math.inf
    assert layer_error.relative_mse(x, 4, 32) > 0  # coarser groups lose the finer scales
    assert math.isnan(layer_error.relative_mse(torch.zeros(2, 8), 4, 8))


def test_relative_mse_over_chunks_of_rows_is_that_of_the_whole_tensor():
    x = torch.randn(analysis_plan.CHUNK_TOKENS * 2 + 5, 16, generator=torch.Generator().manual_seed(0))
    q = layer_error.fake_quant(x, 4, 8)
    whole = float((q - x).square().double().sum() / x.square().double().sum())
    assert layer_error.relative_mse(x, 4, 8) == pytest.approx(whole, rel=1e-12)


def test_hooks_see_every_linear_layer_input_before_its_fake_quant(tmp_path):
    model = save_model(tmp_path / "model.pt")
    idx = batch()
    seen = []
    layer_error.visit_layer_inputs(model, idx, lambda layer, x: seen.append((layer.layer_index, layer.layer_type,
                                                                             x.clone())))
    assert [(i, t) for i, t, _ in seen] == [(i, t) for i in range(2) for t in ("qkv", "o", "fc1", "fc2")]
    assert [tuple(x.shape) for *_, x in seen[:4]] == [(48, 32), (48, 32), (48, 32), (48, 64)]
    block = model.blocks[0]
    expected = block.attn_norm(model.tok_emb(idx)).reshape(-1, 32)
    torch.testing.assert_close(seen[0][2], expected, rtol=0, atol=0)  # not on the 4-bit grid
    assert all(not layer._forward_pre_hooks for layer in model.qat_linears())
    # one block's four inputs are what the resource estimate holds per token
    assert sum(x.shape[1] for *_, x in seen[:4]) == analysis_plan.layer_input_width(MODEL_SETTINGS)


def test_micro_batches_of_windows_see_the_same_inputs_as_one_batch(tmp_path):
    model = save_model(tmp_path / "model.pt")
    idx = batch(n_windows=5)
    whole, parts = [], []
    layer_error.visit_layer_inputs(model, idx, lambda layer, x: whole.append(x.clone()), micro_batch=5)
    layer_error.visit_layer_inputs(model, idx, lambda layer, x: parts.append(x.clone()), micro_batch=2)  # 2 + 2 + 1
    assert len(whole) == len(parts) == 8
    for a, b in zip(whole, parts):
        torch.testing.assert_close(b, a)  # float rounding of the blocks' matmuls at most
    table = layer_error.layer_error(model, idx, [16, "channel"], micro_batch=1)
    expected = layer_error.layer_error(model, idx, [16, "channel"])
    pd.testing.assert_frame_equal(table, expected, rtol=1e-6)


def test_per_channel_equals_a_group_of_one_row():
    model = train.build_model(dataclasses.replace(MODEL_SETTINGS, precision="BF16", group=None), VOCAB).eval()
    table = layer_error.layer_error(model, batch(), groups=[16, 32, 64, "channel"])
    assert len(table) == 2 * 2 * (3 * 3 + 4)  # qkv/o/fc1 rows of 32: 16, 32, channel; fc2 rows of 64: four
    assert set(table["G"][table["group"] == "channel"]) == {32, 64}
    key = ["layer_index", "layer_type", "tensor"]
    channel = table[table["group"] == "channel"].set_index(key)["rel_mse"]
    full_row = table[table["G"] == table["in_features"]].query("group != 'channel'").set_index(key)["rel_mse"]
    pd.testing.assert_series_equal(channel.sort_index(), full_row.sort_index())


def test_saved_model_round_trips_and_run_writes_the_table(tmp_path):
    model = save_model(tmp_path / "run" / "model.pt")
    loaded, s = layer_error.load_run(tmp_path / "run" / "model.pt")
    assert s == MODEL_SETTINGS and not loaded.training and loaded.blocks[0].attn.qkv.lac is not None
    idx = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)

    tokens = np.random.default_rng(0).integers(0, VOCAB, 100).astype(np.uint16)
    write_tokens(tokens, tmp_path / "val.npy", VOCAB)
    table = layer_error.run_layer_error([tmp_path / "run" / "model.pt"], tmp_path / "val.npy",
                                        tmp_path / "out.parquet", n_tokens=40, groups=["16", "channel"])
    assert list(table.columns) == list(layer_error.LAYER_ERROR_COLUMNS)
    assert len(table) == 2 * 4 * 2 * 2
    assert set(table["run_id"]) == {MODEL_SETTINGS.run_id} and set(table["run_group"]) == {"channel"}
    expected = layer_error.layer_error(model, torch.from_numpy(tokens[:32].astype(np.int64)).view(2, 16),
                                       [16, "channel"])
    np.testing.assert_allclose(table["rel_mse"], expected["rel_mse"], rtol=1e-6)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out.parquet"), table)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(layer_error.AnalysisError, match="model.pt: model file not found"):
        layer_error.load_run(tmp_path / "model.pt")
    torch.save({"settings": {}, "model": {}}, tmp_path / "bad.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ("bad.pt", "text.pt"):
        with pytest.raises(layer_error.AnalysisError, match=f"{name}: not a model.pt written by training"):
            layer_error.load_run(tmp_path / name)
    with pytest.raises(layer_error.AnalysisError, match="less than one window of 16"):
        layer_error.token_windows(np.arange(10), 100, 16)
    with pytest.raises(layer_error.AnalysisError, match="device must be cpu or cuda, got 'tpu'"):
        layer_error.torch_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(layer_error.AnalysisError, match="device is cuda but torch sees no CUDA GPU"):
            layer_error.run_layer_error([tmp_path / "bad.pt"], tmp_path / "val.npy", tmp_path / "out.parquet",
                                        device="cuda")
        assert not (tmp_path / "out.parquet").exists()
