"""Outliers in the input activations of each linear layer, BF16 vs QAT (paper §4.4, Fig. 9a: the FC2 input,
the SwiGLU output, keeps a kurtosis of 89 under W4A4 QAT against 123 in BF16 at 595M / 100B / G = 128).

The inputs are collected as in :mod:`qatlaw.layer_error` (one fixed batch of validation tokens, forward
hooks, the input before the layer's own fake quantization, one block at a time in micro-batches of windows); the
moments are summed over chunks of ``CHUNK_TOKENS`` rows in float64, the median and the top 1% are selected from
a float32 copy of the magnitudes on the host.

``outliers.parquet`` (:func:`run_outliers`), one row per run and linear layer:

| column | meaning |
|---|---|
| ``run_id``, ``size``, ``precision``, ``run_group`` | the run, as in ``layer_error.parquet`` |
| ``layer_index``, ``layer_type`` | block number (from 0) and ``qkv``/``o``/``fc1``/``fc2`` |
| ``in_features`` | hidden dimension of the input |
| ``n_tokens`` | tokens the statistics are over |
| ``kurtosis_token`` | Pearson kurtosis μ4/σ⁴ (not excess: a Gaussian gives 3) over the hidden dimension of each token, averaged over tokens |
| ``kurtosis_all`` | the same over all elements of the input |
| ``max_median_ratio`` | max abs(x) / median abs(x) over all elements |
| ``top1_share`` | share of Σ abs(x) carried by the largest 1% of abs(x) (the ⌈n/100⌉ largest elements) |
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qatlaw.analysis_plan import CHUNK_TOKENS
from qatlaw.io import write_parquet
from qatlaw.layer_error import (
    DEFAULT_TOKENS,
    RUN_COLUMNS,
    analyse_models,
    visit_layer_inputs,
)
from qatlaw.model import Model
from qatlaw.quant import QATLinear

log = logging.getLogger("qatlaw.outliers")

STAT_COLUMNS = ("kurtosis_token", "kurtosis_all", "max_median_ratio", "top1_share")
OUTLIER_COLUMNS = RUN_COLUMNS + ("layer_index", "layer_type", "in_features", "n_tokens") + STAT_COLUMNS
TOP_FRACTION = 0.01


def kurtosis(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Pearson kurtosis μ4/σ⁴ (population moments) along ``dim``; NaN where σ = 0."""
    x = x.double()
    squared = (x - x.mean(dim, keepdim=True)).square()
    m2, m4 = squared.mean(dim), squared.square().mean(dim)
    return torch.where(m2 > 0, m4 / m2.square(), torch.nan)


def pooled_kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis of all elements of ``x`` (tokens, hidden), its moments summed over chunks of
    ``CHUNK_TOKENS`` rows in float64 (the mean first); NaN where σ = 0."""
    chunks = x.split(CHUNK_TOKENS)
    mean = sum(float(chunk.double().sum()) for chunk in chunks) / x.numel()
    m2 = m4 = 0.0
    for chunk in chunks:
        squared = (chunk.double() - mean).square()
        m2 += float(squared.sum())
        m4 += float(squared.square().sum())
    m2, m4 = m2 / x.numel(), m4 / x.numel()
    return m4 / m2**2 if m2 > 0 else math.nan


def activation_stats(x: torch.Tensor) -> dict[str, float]:
    """The outlier statistics of ``STAT_COLUMNS`` for activations ``x`` of shape (tokens, hidden), on any device."""
    per_token = torch.cat([kurtosis(chunk) for chunk in x.split(CHUNK_TOKENS)])
    magnitude = x.abs().flatten().cpu().numpy()
    n = magnitude.size
    n_top = math.ceil(TOP_FRACTION * n)
    total = float(magnitude.sum(dtype=np.float64))
    magnitude.partition([(n - 1) // 2, n // 2, n - n_top])  # in place: one selection for median and top 1%
    median = (float(magnitude[(n - 1) // 2]) + float(magnitude[n // 2])) / 2
    return {
        "kurtosis_token": float(per_token.nanmean()),
        "kurtosis_all": pooled_kurtosis(x),
        "max_median_ratio": float(magnitude.max()) / median if median > 0 else math.inf,
        "top1_share": float(magnitude[n - n_top:].sum(dtype=np.float64)) / total,
    }


def outlier_stats(model: Model, idx: torch.Tensor, micro_batch: int | None = None) -> pd.DataFrame:
    """Outlier statistics of every quantized linear layer's input on batch ``idx``, run in micro-batches of
    ``micro_batch`` windows (the columns of ``outliers.parquet`` from ``layer_index`` on)."""
    rows = []

    def visit(layer: QATLinear, x: torch.Tensor) -> None:
        rows.append({"layer_index": layer.layer_index, "layer_type": layer.layer_type,
                     "in_features": layer.in_features, "n_tokens": x.shape[0], **activation_stats(x)})

    visit_layer_inputs(model, idx, visit, micro_batch)
    return pd.DataFrame(rows, columns=list(OUTLIER_COLUMNS[len(RUN_COLUMNS):]))


def run_outliers(model_paths: Sequence[str | Path], val_path: str | Path, out_path: str | Path, *,
                 n_tokens: int = DEFAULT_TOKENS, threads: int = 1, device: str = "cpu") -> pd.DataFrame:
    """Measure every model's per-layer input outliers (on ``device``) and write ``outliers.parquet``."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    table = analyse_models(model_paths, val_path, n_tokens, lambda m, s, idx: outlier_stats(m, idx), device)
    write_parquet(table, out_path)
    log.info("outliers of %d models (%d rows) in %.1f s", len(model_paths), len(table), time.perf_counter() - t0)
    return table
