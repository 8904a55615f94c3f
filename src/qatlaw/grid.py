"""The runs of the study: one per grid cell, described by plain settings (no torch needed to enumerate them)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from qatlaw import precision as prec
from qatlaw.errors import QatlawError

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}

BASELINE = prec.BASELINE
# Conservative CPU training speed used for the runtime resource: FLOP/s per thread (see docs/cluster.md).
CPU_FLOPS_PER_THREAD = 5e9
# Sustained bf16 training FLOP/s of one data-centre GPU (A100: 312 TFLOP/s peak at about 1/3 utilisation).
GPU_FLOPS_PER_GPU = 1e14
GPU_HOST_MEM_MB = 32000


class GridError(QatlawError):
    """A run that is not part of the grid, or a malformed run name."""


def format_tokens(n: int) -> str:
    """Exact short form of a token count for paths: 250000 -> '250K', 10**10 -> '10B'."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def format_fraction(fraction: float) -> str:
    """Shortest exact form of a QAT fraction for run ids: 0.35 -> '0.35', 0.0 -> '0'."""
    return repr(float(fraction)).removesuffix(".0")


def variant_name(precision: str, group: int | str | None, qat_fraction: float = 1.0) -> str:
    """Directory name of a run: 'BF16', '<precision>_g<group>' (QAT from scratch), or
    '<precision>_g<group>_f<fraction>' for a run that trains only its last ``qat_fraction`` of tokens in QAT
    (``_f0``: post-training quantization)."""
    name = prec.canonical(precision)
    if prec.parse(name).is_baseline:
        return BASELINE
    return f"{name}_g{group}" + ("" if qat_fraction == 1 else f"_f{format_fraction(qat_fraction)}")


_VARIANT = re.compile(r"(?P<precision>[^_]+)_g(?P<group>channel|[0-9]+)(?:_f(?P<fraction>[0-9.e-]+))?")


def parse_variant(variant: str) -> tuple[str, int | str | None, float]:
    """Inverse of :func:`variant_name`: (precision, group, QAT fraction), group None for the baseline."""
    if variant == BASELINE:
        return BASELINE, None, 1.0
    match = _VARIANT.fullmatch(variant)
    try:
        if match is None:
            raise ValueError
        fraction = 1.0 if match["fraction"] is None else float(match["fraction"])
        if not 0 <= fraction <= 1 or variant_name(match["precision"], match["group"], fraction) != variant:
            raise ValueError
    except ValueError:
        raise GridError(f"run variant {variant!r} is neither BF16 nor <precision>_g<group>[_f<fraction below 1>]") from None
    group = match["group"]
    return match["precision"], (group if group == "channel" else int(group)), fraction


def branch_step(qat_fraction: float, steps: int) -> int:
    """K, the steps a run with QAT fraction f trains as its BF16 baseline before fake quantization starts:
    (1 − f) · steps rounded to the nearest step, halves up, computed on f's decimal form (f = 0.35 of 20 steps:
    exactly 13). 0 for QAT from scratch (f = 1), every step for post-training quantization (f = 0)."""
    exact = (1 - Decimal(repr(float(qat_fraction)))) * steps
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


@dataclass(frozen=True)
class RunSettings:
    """Everything one run needs, independent of how the config file is laid out."""

    size: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    lr: float
    batch_size: int
    tokens: int
    precision: str
    group: int | str | None
    seed: int
    seq_len: int
    warmup_fraction: float
    min_lr_ratio: float
    beta1: float
    beta2: float
    weight_decay: float
    grad_clip: float
    loss_ema: float
    eval_tokens: int
    clip: str
    format: str
    lac: str
    warmup_steps: int | None = None
    weight_ema: float = 0.0
    numerics: str = "fp32"
    qat_fraction: float = 1.0

    @property
    def weight_ema_decay(self) -> float:
        """Per-step decay of the weight average: its time constant is ``weight_ema`` × the run's steps
        (0: no average, the final weights are scored)."""
        if self.weight_ema <= 0:
            return 0.0
        return 1.0 - 1.0 / max(1.0, self.weight_ema * self.steps)

    @property
    def uses_lac(self) -> bool:
        """Whether the run's activation quantizers clip with LAC: the ``lac`` option ("always", "never", or "paper":
        the paper's rule for its group, :func:`qatlaw.precision.uses_lac`)."""
        return {"always": True, "never": False}.get(self.lac, self.group is not None and prec.uses_lac(self.group))

    @property
    def element_format(self) -> str:
        """The format of the run's 4-bit tensors: its precision's (``W4A4-mxfp4``), else ``quant.format``."""
        return prec.parse(self.precision).format or self.format

    @property
    def cell(self) -> str:
        """Path-like id of the run's (size, tokens, seed) cell: size/tokens/seed."""
        return f"{self.size}/{format_tokens(self.tokens)}/seed{self.seed}"

    @property
    def run_id(self) -> str:
        """Path-like id: size/tokens/seed/variant."""
        return f"{self.cell}/{variant_name(self.precision, self.group, self.qat_fraction)}"

    @property
    def is_branch(self) -> bool:
        """Whether the run starts from its baseline's trunk checkpoint: QAT fraction strictly between 0 and 1."""
        return 0 < self.qat_fraction < 1

    @property
    def is_ptq(self) -> bool:
        """Whether the run is post-training quantization (QAT fraction 0): its baseline's final model, not trained."""
        return self.qat_fraction == 0

    @property
    def branch_step(self) -> int:
        """Steps trained as the BF16 baseline before fake quantization starts (:func:`branch_step`)."""
        return branch_step(self.qat_fraction, self.steps)

    @property
    def baseline(self) -> RunSettings:
        """The BF16 baseline of the run's cell (itself for a baseline)."""
        return replace(self, precision=BASELINE, group=None, qat_fraction=1.0)

    @property
    def trained_tokens(self) -> int:
        """Tokens the run's own job trains: its budget, or after a trunk only the last f · D (whole steps; none for
        post-training quantization)."""
        return self.tokens if self.qat_fraction == 1 else (self.steps - self.branch_step) * self.tokens_per_step

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step

    @property
    def warmup(self) -> int:
        """Warm-up steps: ``warmup_steps`` if set (capped at the run's steps), else ``warmup_fraction`` of them."""
        if self.warmup_steps is not None:
            return max(1, min(self.warmup_steps, self.steps))
        return max(1, round(self.warmup_fraction * self.steps))

    @property
    def is_baseline(self) -> bool:
        return prec.parse(self.precision).is_baseline

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), also the run's identity for checkpoints and Snakemake's rerun trigger.
        fp32 numerics and QAT fraction 1, the defaults, are left out, so the runs of grids made before these
        settings keep their identity."""
        fields = asdict(self)
        if fields["numerics"] == "fp32":
            del fields["numerics"]
        if fields["qat_fraction"] == 1:
            del fields["qat_fraction"]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSettings:
        runs = cls.many_from_json(text)
        if len(runs) != 1:
            raise GridError(f"expected the settings of one run, got {len(runs)}")
        return runs[0]

    @classmethod
    def many_from_json(cls, text: str) -> list[RunSettings]:
        """Runs from one JSON object or a non-empty list of them."""
        try:
            data = json.loads(text)
            items = data if isinstance(data, list) else [data]
            if not items:
                raise TypeError("empty list of runs")
            return [cls(**item) for item in items]
        except (TypeError, json.JSONDecodeError) as exc:
            raise GridError(f"run settings are not valid: {exc}") from None


def run_settings(cfg: Mapping[str, Any], size: str, tokens: int | str, precision: str, group: int | str | None,
                 seed: int, qat_fraction: float = 1.0) -> RunSettings:
    """Settings of one grid cell from a validated config (a baseline's QAT fraction is always 1)."""
    arch, training, quant = cfg["models"][size], cfg["training"], cfg["quant"]
    name = prec.canonical(precision)
    return RunSettings(
        size=size, layers=arch["layers"], hidden=arch["hidden"], ffn=arch["ffn"], heads=arch["heads"],
        kv_heads=arch["kv_heads"], lr=float(arch["lr"]), batch_size=arch.get("batch_size", training["batch_size"]),
        tokens=parse_tokens(tokens), precision=name, group=None if prec.parse(name).is_baseline else group,
        seed=seed, seq_len=training["seq_len"], warmup_fraction=training["warmup_fraction"],
        min_lr_ratio=training["min_lr_ratio"], beta1=training["beta1"], beta2=training["beta2"],
        weight_decay=training["weight_decay"], grad_clip=training["grad_clip"], loss_ema=training["loss_ema"],
        eval_tokens=training["eval_tokens"], clip=quant["clip"], format=quant["format"],
        lac=quant["lac"], warmup_steps=training["warmup_steps"], weight_ema=float(training["weight_ema"]),
        numerics=training["numerics"], qat_fraction=1.0 if prec.parse(name).is_baseline else float(qat_fraction),
    )


def grid_runs(cfg: Mapping[str, Any]) -> list[RunSettings]:
    """Every run: per (size, tokens, seed) one BF16 baseline and each precision × group × QAT fraction, for the
    main grid, the extra sub-grids (each with its own seeds and QAT fractions, by default the main grid's) and then
    the ablation sub-grid (each base precision with each override alone, QAT from scratch), without repeats."""
    runs: dict[str, RunSettings] = {}

    def add_cells(sub: Mapping[str, Any], precisions: list[str], fractions: list[float]) -> None:
        for size in sub["sizes"]:
            for tokens in sub["tokens"]:
                for seed in sub.get("seeds", cfg["grid"]["seeds"]):
                    variants = [(p, g, f) for p in precisions for g in sub["groups"] for f in fractions]
                    for name, group, fraction in [(BASELINE, None, 1.0), *variants]:
                        run = run_settings(cfg, size, tokens, name, group, seed, fraction)
                        runs.setdefault(run.run_id, run)

    main = cfg["grid"].get("qat_fractions", [1.0])
    add_cells(cfg["grid"], cfg["grid"]["precisions"], main)
    for extra in cfg["grid"].get("extra", []):
        add_cells(extra, extra["precisions"], extra.get("qat_fractions", main))
    ablation = cfg["grid"].get("ablation")
    if ablation:
        bases = ablation["precisions"]
        add_cells(ablation, bases + [f"{b}-{o}" for b in bases for o in ablation["overrides"]], [1.0])
    return list(runs.values())


def cells(runs: list[RunSettings]) -> dict[str, list[RunSettings]]:
    """The runs of each (size, tokens, seed) cell, by :attr:`RunSettings.cell`, cells and runs in ``runs``'s order."""
    by_cell: dict[str, list[RunSettings]] = {}
    for run in runs:
        by_cell.setdefault(run.cell, []).append(run)
    return by_cell


def batch_runs(runs: list[RunSettings], per_job: int) -> list[list[RunSettings]]:
    """Runs split into training jobs of at most ``per_job`` runs; a job never mixes (size, tokens, seed) cells,
    nor a branch (0 < QAT fraction < 1) with the runs trained from scratch (the branch waits for its baseline's
    trunk checkpoint), and a cell's runs of each kind are spread evenly over its jobs (11 runs at 6 per job: 6 + 5).
    Post-training quantization runs are not trained: GridError."""
    if any(run.is_ptq for run in runs):
        raise GridError(f"run {next(run for run in runs if run.is_ptq).run_id} is post-training quantization, not a "
                        "training run")
    jobs = []
    for cell in cells(runs).values():
        for kind in ([run for run in cell if not run.is_branch], [run for run in cell if run.is_branch]):
            n_jobs = math.ceil(len(kind) / per_job)
            jobs += [kind[i::n_jobs] for i in range(n_jobs)]
    return jobs


def trunk_steps(runs: list[RunSettings]) -> dict[str, list[int]]:
    """The steps at which each BF16 baseline keeps a trunk checkpoint for the branches of its cell among ``runs``,
    by the baseline's run id (sorted; baselines without branches left out)."""
    steps: dict[str, set[int]] = {}
    for run in runs:
        if run.is_branch:
            steps.setdefault(run.baseline.run_id, set()).add(run.branch_step)
    return {run_id: sorted(ks) for run_id, ks in steps.items()}


def token_budgets(cfg: Mapping[str, Any]) -> list[str | int]:
    """Every token budget of the main grid and its sub-grids, as written in the config."""
    subgrids = [cfg["grid"], *cfg["grid"].get("extra", []), cfg["grid"].get("ablation") or {}]
    return list(dict.fromkeys(tokens for sub in subgrids for tokens in sub.get("tokens", [])))


def effective_group(s: RunSettings) -> int | None:
    """The integer G of the law: the group length, or for 'channel' the hidden size (the row length of the
    qkv, o and fc1 inputs; fc2 rows are ffn long); None for the baseline."""
    if s.group is None:
        return None
    return s.hidden if s.group == "channel" else int(s.group)


# The embedding and LM head have a multiple of this many rows (GPU matmul tiles); OLMo-2 pads its 100,278 to 100,352.
VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int) -> int:
    """Rows of a model's embedding and LM head for a tokenizer of ``vocab_size`` ids: the next multiple of
    :data:`VOCAB_MULTIPLE`. The rows past the vocabulary are never a token nor a target; the loss is over the true
    vocabulary, and N and the FLOPs count it, not the padding."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def non_embedding_count(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int) -> int:
    """N of the scaling law for a model shape: every parameter but the token embedding and the LM head (norm
    weights included)."""
    head_dim = hidden // heads
    attn = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    mlp = hidden * 2 * ffn + ffn * hidden
    norms = 2 * hidden
    return layers * (attn + mlp + norms) + hidden


def _non_embedding(s: RunSettings) -> int:
    return non_embedding_count(s.layers, s.hidden, s.ffn, s.heads, s.kv_heads)


def training_flops(s: RunSettings, vocab_size: int) -> int:
    """FLOPs of a run's own training, 6·(N + V·h)·D with D its :attr:`RunSettings.trained_tokens` (the LM head
    included: at CPU sizes it is much of the work)."""
    return 6 * (_non_embedding(s) + vocab_size * s.hidden) * s.trained_tokens


def estimate_resources(s: RunSettings, vocab_size: int, threads: int = 1, gpus: int = 0, nodes: int = 1
                       ) -> dict[str, int]:
    """Memory (MB, per node) and runtime (minutes) to request for a run, on CPU threads or on ``gpus`` GPUs over
    ``nodes`` nodes.

    Training costs 6·(N + V·h)·D FLOPs. On CPU: at ``CPU_FLOPS_PER_THREAD`` per thread, doubled for fake
    quantization and margin, plus 5 minutes; memory is fp32 weights, gradients and two AdamW moments plus the
    activations of one batch (about 24 floats per hidden unit per layer and the logits), with 500 MB for the
    interpreter and torch. On GPUs: at ``GPU_FLOPS_PER_GPU`` per GPU, ×1.5 for fake quantization and margin, plus
    15 minutes; host memory ``GPU_HOST_MEM_MB`` per GPU of a node (tokens and data loading; the model lives on
    the GPU).
    """
    flops = training_flops(s, vocab_size)
    if gpus > 0:
        runtime = 15 + math.ceil(1.5 * flops / (GPU_FLOPS_PER_GPU * gpus) / 60)
        return {"mem_mb": GPU_HOST_MEM_MB * gpus // nodes, "runtime": int(runtime)}
    params = _non_embedding(s) + 2 * vocab_size * s.hidden
    activations = s.batch_size * s.seq_len * (24 * s.hidden * s.layers + 3 * vocab_size)
    mem_mb = 500 + (16 * params + 4 * activations) // 2**20
    runtime = 5 + math.ceil(2 * flops / (CPU_FLOPS_PER_THREAD * threads) / 60)
    return {"mem_mb": int(mem_mb), "runtime": int(runtime)}


def parse_tokens(value: int | str) -> int:
    """Turn a token budget such as 500000, "500K" or "2.5M" into a positive integer."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a token count")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{value} is not a positive token count")
        return value
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([KMBT]?)", str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a token count (use e.g. 500000, 500K, 2.5M, 10B)")
    mantissa, suffix = match.groups()
    whole, _, frac = mantissa.partition(".")
    scale = _SUFFIX[suffix]
    numerator = int(whole + frac)
    denominator = 10 ** len(frac)
    if (numerator * scale) % denominator:
        raise ValueError(f"{value!r} is not a whole number of tokens")
    count = numerator * scale // denominator
    if count < 1:
        raise ValueError(f"{value!r} is not a positive token count")
    return count


def linear_inputs(arch: Mapping[str, int]) -> dict[str, int]:
    """Input dimension of each quantized linear layer type of one model size."""
    return {"qkv": arch["hidden"], "o": arch["hidden"], "fc1": arch["hidden"], "fc2": arch["ffn"]}


def run_gpus(training: Mapping[str, Any], size: str) -> int:
    """GPUs of one run of model ``size`` (0: CPU): training.gpus_per_run, one number or one per size (1 for a size
    it leaves out)."""
    gpus = training["gpus_per_run"]
    return gpus.get(size, 1) if isinstance(gpus, Mapping) else gpus


def run_nodes(training: Mapping[str, Any], size: str) -> int:
    """Cluster nodes of one run of model ``size``: 1, or its GPUs over training.gpus_per_node."""
    return max(1, run_gpus(training, size) // training["gpus_per_node"])


def on_gpu(training: Mapping[str, Any]) -> bool:
    """Whether runs train on GPUs: device cuda, or GPUs given to runs (per size: at least one each)."""
    gpus = training["gpus_per_run"]
    return training["device"] == "cuda" or isinstance(gpus, Mapping) or gpus > 0
