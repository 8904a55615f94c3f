"""Per-layer quantization error of trained models: how well each linear layer's weight and input activation
survive 4-bit fake quantization at several group sizes.

Each model (``model.pt`` as written by :mod:`qatlaw.train`) runs one fixed batch, the first ``n_tokens``
validation tokens cut into windows of its ``seq_len``, on the CPU or a GPU; forward hooks on every
:class:`~qatlaw.quant.QATLinear` see the layer's input before the layer's own fake quantization. The blocks run
one at a time over micro-batches of windows (:mod:`qatlaw.analysis_plan`), so only the residual stream and one
block's layer inputs are held for all tokens. Each tensor (the weight, ``(out, in)``, and the input,
``(tokens, in)``) is fake-quantized with :func:`qatlaw.quant.fake_quant` (plain AbsMax, no LAC, the run's
``clip`` and ``format``) for every group size that divides its row length ``in``.

The workflow analyses the runs of each (size, tokens, seed) cell in one job and gathers the cells' tables
(:func:`qatlaw.analysis_plan.gather_runs`) in the grid's run order.

``layer_error.parquet`` (:func:`run_layer_error`), one row per run, layer, tensor and group size:

| column | meaning |
|---|---|
| ``run_id``, ``size``, ``precision`` | the run, as in ``runs.parquet`` |
| ``run_group`` | the group the run was trained with (``32``, ``channel``, ``none`` for BF16) |
| ``layer_index`` | block number, from 0 |
| ``layer_type`` | ``qkv``, ``o``, ``fc1`` or ``fc2`` |
| ``tensor`` | ``weight`` or ``activation`` (the layer's input) |
| ``in_features`` | row length of the tensor (the layer's input dimension) |
| ``group`` | measured group size as a string: ``32`` … or ``channel`` (one group per row) |
| ``G`` | the same as an integer (``channel``: ``in_features``) |
| ``bits`` | bit width of the measurement (4) |
| ``rel_mse`` | mean((Q(x) − x)²) / mean(x²) |
| ``qsnr_db`` | −10 · log10(rel_mse) (inf when the tensor lies on its grid) |
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qatlaw import analysis_plan
from qatlaw.analysis_plan import AnalysisError
from qatlaw.grid import RunSettings
from qatlaw.io import write_parquet
from qatlaw.model import Model, ModelConfig
from qatlaw.quant import GroupSize, QATLinear, fake_quant, tensor_format
from qatlaw.tokens import DataError, Tokens, open_tokens
from qatlaw.train import quant_options

log = logging.getLogger("qatlaw.layer_error")

DEFAULT_TOKENS = 4096
DEFAULT_GROUPS: tuple[GroupSize, ...] = (32, 64, 128, 256, "channel")
RUN_COLUMNS = ("run_id", "size", "precision", "run_group")
LAYER_ERROR_COLUMNS = RUN_COLUMNS + (
    "layer_index", "layer_type", "tensor", "in_features", "group", "G", "bits", "rel_mse", "qsnr_db",
)


def torch_device(name: str) -> torch.device:
    """The device of an analysis: ``cpu``, or ``cuda`` when torch sees a GPU."""
    if name not in analysis_plan.DEVICES:
        raise AnalysisError(f"device must be {' or '.join(analysis_plan.DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise AnalysisError("device is cuda but torch sees no CUDA GPU")
    return torch.device(name)


def load_run(path: str | Path) -> tuple[Model, RunSettings]:
    """Rebuild a trained model from its ``model.pt`` (in eval mode, on the CPU) with its run settings."""
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"{path}: model file not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        settings = RunSettings(**saved["settings"])
        model = Model(ModelConfig(**saved["model_config"]), settings.precision, quant_options(settings))
        model.load_state_dict(saved["model"])
    except (OSError, RuntimeError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise AnalysisError(f"{path}: not a model.pt written by training ({str(exc).splitlines()[0]})") from None
    return model.eval(), settings


def token_windows(tokens: Tokens, n_tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens (at most) as non-overlapping windows, shape (windows, seq_len)."""
    n_windows = min(n_tokens, len(tokens)) // seq_len
    if n_windows < 1:
        raise AnalysisError(f"{min(n_tokens, len(tokens))} validation tokens are less than one window of {seq_len}")
    return torch.from_numpy(tokens[: n_windows * seq_len].astype(np.int64)).view(n_windows, seq_len)


@torch.no_grad()
def visit_layer_inputs(model: Model, idx: torch.Tensor, visit: Callable[[QATLinear, torch.Tensor], None],
                       micro_batch: int | None = None) -> None:
    """Run windows ``idx`` (windows, T) through the model's blocks and call ``visit(layer, x)`` for every quantized
    linear layer, in forward order, with its input ``x`` of shape (windows · T, in_features) as it enters the
    layer (before its fake quant), the windows' tokens in order.

    The blocks run one at a time, each over micro-batches of ``micro_batch`` windows (None:
    :func:`qatlaw.analysis_plan.micro_batch`); a block's layers are visited once it has seen every window. The
    final norm and the LM head are not run (the logits would be tokens × vocabulary).
    """
    n_windows, T = idx.shape
    cos, sin = model.rope(T)
    step = micro_batch or analysis_plan.micro_batch(T)
    residual = [model.tok_emb(windows) for windows in idx.split(step)]
    held: dict[QATLinear, torch.Tensor] = {}
    rows = slice(0, 0)

    def hook(layer: QATLinear, args: tuple[torch.Tensor, ...]) -> None:
        if layer not in held:
            held[layer] = args[0].new_empty(n_windows * T, layer.in_features)
        held[layer][rows] = args[0].reshape(-1, layer.in_features)

    handles = [layer.register_forward_pre_hook(hook) for layer in model.qat_linears()]
    try:
        for block in model.blocks:
            for i, x in enumerate(residual):
                rows = slice(i * step * T, (i * step + len(x)) * T)
                residual[i] = block(x, cos, sin)
            for layer in (m for m in block.modules() if isinstance(m, QATLinear)):
                visit(layer, held.pop(layer))
    finally:
        for handle in handles:
            handle.remove()


def relative_mse(x: torch.Tensor, bits: int, group: GroupSize, clip: str = "paper", fmt: str = "int") -> float:
    """mean((Q(x) − x)²) / mean(x²) of group-wise fake quantization along the last dim (rows are quantized
    independently: summed over chunks of ``CHUNK_TOKENS`` rows); NaN for x = 0."""
    power = noise = 0.0
    for rows in x.split(analysis_plan.CHUNK_TOKENS):
        power += float(rows.square().double().sum())
        noise += float((fake_quant(rows, bits, group, clip=clip, fmt=fmt) - rows).square().double().sum())
    return noise / power if power > 0 else float("nan")


def qsnr_db(rel_mse: float) -> float:
    """Quantization signal-to-noise ratio in dB, −10 · log10(rel_mse)."""
    return math.inf if rel_mse == 0 else -10 * math.log10(rel_mse)


def layer_error(model: Model, idx: torch.Tensor, groups: Iterable[GroupSize] = DEFAULT_GROUPS, *, bits: int = 4,
                clip: str = "paper", fmt: str = "int", micro_batch: int | None = None) -> pd.DataFrame:
    """Quantization error of every quantized linear layer's weight and input on batch ``idx``, run in
    micro-batches of ``micro_batch`` windows (the columns of ``layer_error.parquet`` from ``layer_index`` on)."""
    groups = list(groups)
    rows = []

    def visit(layer: QATLinear, x: torch.Tensor) -> None:
        n = layer.in_features
        for tensor, values in (("weight", layer.weight.detach()), ("activation", x)):
            for group in groups:
                g = n if group == "channel" else int(group)
                if n % g:
                    continue
                err = relative_mse(values, bits, group, clip, fmt)
                rows.append((layer.layer_index, layer.layer_type, tensor, n, str(group), g, bits, err, qsnr_db(err)))

    visit_layer_inputs(model, idx, visit, micro_batch)
    return pd.DataFrame(rows, columns=list(LAYER_ERROR_COLUMNS[len(RUN_COLUMNS):]))


def analyse_models(model_paths: Sequence[str | Path], val_path: str | Path, n_tokens: int,
                   analyse: Callable[[Model, RunSettings, torch.Tensor], pd.DataFrame],
                   device: str = "cpu") -> pd.DataFrame:
    """Concatenate ``analyse(model, settings, windows)`` over the models, each row prefixed by its run's
    ``RUN_COLUMNS``; every model sees the first ``n_tokens`` tokens of the validation shard, on ``device``
    (one model there at a time)."""
    where = torch_device(device)
    try:
        tokens = open_tokens(val_path)
    except DataError as exc:
        raise AnalysisError(str(exc)) from None
    frames = []
    for path in model_paths:
        model, s = load_run(path)
        windows = token_windows(tokens, n_tokens, s.seq_len)
        if int(windows.max()) >= model.cfg.vocab_size:
            raise AnalysisError(f"{val_path}: token id {int(windows.max())} is out of range for {path} "
                                f"(vocabulary {model.cfg.vocab_size})")
        frame = analyse(model.to(where), s, windows.to(where))
        del model  # the next model's weights take its place
        run = {"run_id": s.run_id, "size": s.size, "precision": s.precision,
               "run_group": "none" if s.group is None else str(s.group)}
        frames.append(frame.assign(**run).loc[:, list(RUN_COLUMNS) + list(frame.columns)])
    if not frames:
        raise AnalysisError("no model files given")
    return pd.concat(frames, ignore_index=True)


def run_layer_error(model_paths: Sequence[str | Path], val_path: str | Path, out_path: str | Path, *,
                    n_tokens: int = DEFAULT_TOKENS, groups: Iterable[GroupSize | str] = DEFAULT_GROUPS,
                    bits: int = 4, threads: int = 1, device: str = "cpu") -> pd.DataFrame:
    """Measure every model's per-layer quantization error (on ``device``) and write ``layer_error.parquet``."""
    torch.set_num_threads(threads)
    try:
        groups = [g if g == "channel" else int(g) for g in groups]
    except ValueError:
        raise AnalysisError(f"group sizes must be integers or 'channel', got {list(groups)}") from None
    t0 = time.perf_counter()
    table = analyse_models(model_paths, val_path, n_tokens,
                           lambda m, s, idx: layer_error(m, idx, groups, bits=bits, clip=s.clip,
                                                                    fmt=tensor_format(s.element_format, bits)),
                           device)
    write_parquet(table, out_path)
    log.info("layer error of %d models (%d rows) in %.1f s", len(model_paths), len(table), time.perf_counter() - t0)
    return table
