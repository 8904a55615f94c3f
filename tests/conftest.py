"""Fixtures and helpers shared by the test modules (which import nothing from one another): the project root and
Snakemake runner with its stand-in projects, the toy training run and its tokens, a toy trained model file, and a
synthetic results folder in the workflow's layout."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from qatlaw import decompose, fit, mixed, outputs, runtable, train
from qatlaw.grid import RunSettings
from qatlaw.precision import LAYER_TYPES
from qatlaw.tokens import write_tokens

# -------------------- from test_workflow.py
ROOT = Path(__file__).resolve().parents[1]

SNAKEMAKE = [sys.executable, "-m", "snakemake"]

def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        [*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )

def dry_run_resources(output: str) -> dict[str, dict[str, str]]:
    """Resources of every job a dry run would submit (localrules run on the submit host), keyed like the SLURM
    job comment the executor sets: rule_<rule>[_wildcards_<values joined by _>]."""
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        rule = re.match(r"rule (\w+):", block)
        resources = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        if not rule or not resources:
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.MULTILINE)
        key = f"rule_{rule[1]}"
        if wildcards:
            key += "_wildcards_" + "_".join(part.split("=", 1)[1] for part in wildcards[1].split(", "))
        jobs[key] = dict(part.split("=", 1) for part in resources[1].split(", "))
    return jobs

def write_texts(workdir: Path) -> None:
    """A user corpus: 40 generated text files in workdir/texts (~50K training tokens at vocabulary 600)."""
    rng = random.Random(0)
    words = ["".join(rng.choices("etaoinshrdlucmfwypvbgk", k=rng.randint(2, 9))) for _ in range(400)]
    (workdir / "texts").mkdir(parents=True)
    for i in range(40):
        body = " ".join(" ".join(rng.choices(words, k=12)).capitalize() + "." for _ in range(30))
        (workdir / "texts" / f"doc{i:02d}.txt").write_text(body)

def write_paper_standin(workdir: Path) -> list[Path]:
    """A stand-in for config/paper.yaml's data: OLMo-mix-style compressed JSON-lines shards in olmo-mix-1124/
    (nested, as the mix ships) and an HF tokenizer file with <|endoftext|> as olmo2-tokenizer.json."""
    import gzip

    import zstandard

    from qatlaw import data

    lines = "".join(json.dumps({"id": f"d{i}", "text": f"Document {i} of the stand-in mix. " * 12}) + "\n"
                    for i in range(30)).encode()
    shards = [workdir / "olmo-mix-1124" / name for name in
              ("dclm/part-000.json.gz", "dclm/part-001.json.gz", "pes2o/part-000.jsonl.zst", "wiki/part-000.jsonl.gz")]
    for path in shards:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor().compress(lines) if path.suffix == ".zst" else gzip.compress(lines))
    data.train_tokenizer([lines.decode()], 600).save(str(workdir / "olmo2-tokenizer.json"))
    return shards

def write_user_project(workdir: Path, **data_overrides) -> None:
    """A project dir with a config.yaml whose corpus is the user's own text files."""
    write_texts(workdir)
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["data"].update({"sources": ["texts/*.txt"], "vocab_size": 600, "val_fraction": 0.1, **data_overrides})
    cfg["grid"].update(sizes=["0.1M"], tokens=["4K", "8K"], groups=[32], precisions=["W4A4", "W4A16", "W16A4", "W4A4-fc2a8"])
    del cfg["grid"]["ablation"]
    # budgets of a few steps, trained eager (compiling would take longer than these runs train)
    cfg["training"].update(eval_tokens=2048, batch_size=16, compile=False)
    cfg["analysis"]["tokens"] = 1024
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


def edit_config(workdir: Path, **changes) -> Path:
    """Change the project's config.yaml: a dict updates its section's keys, any other value replaces the key."""
    path = workdir / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return workdir


def copy_project(src: Path, dst: Path, **changes) -> Path:
    """A copy of project ``src`` at ``dst`` with its .snakemake (so that the outputs it has stay up to date), its
    config changed as edit_config does."""
    shutil.copytree(src, dst, symlinks=True)
    return edit_config(dst, **changes)


@pytest.fixture(scope="session")
def data_project(tmp_path_factory) -> Path:
    """The user-corpus project (write_user_project) with its data stage built, once per test run: copy it
    (copy_project) rather than build the data again."""
    workdir = tmp_path_factory.mktemp("shared") / "data"
    write_user_project(workdir)
    result = run_snakemake(workdir, "--cores", "2", "results/data/manifest.json")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def trained_project(data_project, tmp_path_factory) -> Path:
    """data_project with its whole workflow run (two cells, five precisions: every stage), once per test run;
    read it, or copy it (copy_project) to change it."""
    workdir = copy_project(data_project, tmp_path_factory.mktemp("shared") / "trained")
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


# -------------------- from test_train.py
VOCAB = 64

MANIFEST = {"vocab_size": VOCAB, "corpus_sha256": "c" * 64, "tokenizer_sha256": "t" * 64, "token_dtype": "uint16"}

def write_store(tmp_path, tokens) -> None:
    """train.npy, val.npy and a manifest that lists them, as the data stage writes them."""
    splits = {name: write_tokens(part, tmp_path / f"{name}.npy", VOCAB) for name, part in zip(("train", "val"), tokens)}
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST | {"splits": splits}))

def settings(**changes) -> RunSettings:
    base = RunSettings(
        size="toy", layers=2, hidden=32, ffn=64, heads=4, kv_heads=2, lr=3e-3, batch_size=4, tokens=4 * 16 * 12,
        precision="W4A4", group=16, seed=0, seq_len=16, warmup_fraction=0.1, min_lr_ratio=0.1, beta1=0.9,
        beta2=0.95, weight_decay=0.1, grad_clip=1.0, loss_ema=0.9, eval_tokens=256, clip="paper", format="int", lac="paper",
    )
    return replace(base, **changes)

@pytest.fixture(scope="module")
def tokens() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # a learnable stream: a noisy repeating pattern
    pattern = rng.integers(1, VOCAB, size=97)
    stream = np.tile(pattern, 60)
    noise = rng.random(len(stream)) < 0.1
    stream[noise] = rng.integers(1, VOCAB, size=noise.sum())
    return stream[:5000].astype(np.uint16), stream[5000:].astype(np.uint16)


# -------------------- from test_layer_error.py
MODEL_SETTINGS = RunSettings(
    size="toy", layers=2, hidden=32, ffn=64, heads=4, kv_heads=2, lr=3e-3, batch_size=4, tokens=1024,
    precision="W4A4", group="channel", seed=0, seq_len=16, warmup_fraction=0.1, min_lr_ratio=0.1, beta1=0.9,
    beta2=0.95, weight_decay=0.1, grad_clip=1.0, loss_ema=0.9, eval_tokens=256, clip="paper", format="int", lac="paper",
)

def save_model(path, s: RunSettings = MODEL_SETTINGS) -> torch.nn.Module:
    """A model with non-initial weights (and LAC γ), saved the way train.py saves it."""
    model = train.build_model(s, VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"settings": asdict(s), "model_config": asdict(model.cfg), "model": model.state_dict()}, path)
    return model.eval()


# -------------------- from test_plots.py
SIZES = {"s1": (100_000, 64), "s2": (300_000, 128), "s3": (1_000_000, 256)}  # N, hidden size

TOKENS = (1_000_000, 2_000_000, 4_000_000)

GROUPS = ("32", "128", "channel")

LAWS = {  # (k, γN, γD, γG) per precision; W16A4-fc2a8 is left unfitted (NaN) in the params table
    "W4A4": (0.16, 0.22, 0.075, 0.78), "W4A16": (0.25, 0.36, 0.16, 0.35), "W16A4": (0.10, 0.18, 0.033, 0.98),
    "W4A4-fc2a8": (0.35, 0.26, 0.096, 0.34), "W16A4-fc2a8": (0.13, 0.23, 0.083, 0.45),
}

CHIN = {"A": 50.0, "B": 100.0, "E": 2.0, "alpha": 0.3, "beta": 0.3}

ABLATION = ("W4A4-qkva8", "W4A4-fc2w8", "W4A4-fc2a8")

CAPTION = "sizes s1,s2,s3 · tokens 1M,2M,4M · G 32,128,channel"

STEPS = 40

def synthetic_runs() -> pd.DataFrame:
    """A run table: BF16 from the Chinchilla law, QAT runs with δ from LAWS times lognormal noise; the largest
    size's W16A4 runs and one W4A4 cell have δ < 0."""
    rng = np.random.default_rng(0)
    rows = []
    for (size, (N, hidden)), D in itertools.product(SIZES.items(), TOKENS):
        bf16 = fit.predict_loss(CHIN, N, D)
        cell = {"size": size, "N": N, "D": D - 1000, "tokens_requested": D, "seed": 0, "diverged": False}
        rows.append(cell | {"precision": "BF16", "group": "none", "G": None, "loss": bf16})
        for precision, group in itertools.product(LAWS, GROUPS):
            G = hidden if group == "channel" else int(group)
            delta = fit.predict_delta(dict(zip(fit.DELTA_CONSTANTS, LAWS[precision], strict=True)), N, D, G)
            delta *= float(np.exp(0.05 * rng.standard_normal()))
            if (precision == "W16A4" and size == "s3") or (precision == "W4A4" and (size, D, group) ==
                                                           ("s1", 1_000_000, "128")):
                delta = -0.004
            rows.append(cell | {"precision": precision, "group": group, "G": G, "loss": bf16 + delta})
    base = next(r for r in rows if (r["size"], r["tokens_requested"], r["group"], r["precision"]) ==
                ("s1", 1_000_000, "32", "W4A4"))
    rows += [base | {"precision": p, "loss": base["loss"] - 0.01 * (i + 1)} for i, p in enumerate(ABLATION[:2])]
    runs = pd.DataFrame(rows)
    variant = np.where(runs["precision"] == "BF16", "BF16", runs["precision"] + "_g" + runs["group"])
    return runs.assign(
        run_id=runs["size"] + "/" + (runs["tokens_requested"] // 1_000_000).astype(str) + "M/seed0/" + variant,
        G=runs["G"].astype("Int64"), val_loss=runs["loss"] + 0.05,
    )

def fit_tables(runs: pd.DataFrame, deltas: pd.DataFrame, fitted: bool) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """params and predictions tables with the fit module's columns: the true constants with ±20% intervals
    (every law NaN unless ``fitted``); predictions in sample and for the largest N and D held out."""
    params, preds, draws = [], [], []
    rng = np.random.default_rng(0)

    def add(law: str, precision: str, values: dict, n_runs: int, n_dropped: int) -> None:
        for name, value in values.items():
            value = value if fitted else np.nan
            params.append({"law": law, "precision": precision, "constant": name, "value": value,
                           "ci_low": 0.8 * value, "ci_high": 1.2 * value, "n_runs": n_runs,
                           "n_dropped": n_dropped, "objective": 0.1})

    def predict(law: str, precision: str, table: pd.DataFrame, observed: str, predicted: np.ndarray) -> None:
        for held, scale in (("none", 1.0), ("largest_N", 1.15), ("largest_D", 0.9)):
            part = np.ones(len(table), bool) if held == "none" else \
                (table["N" if held == "largest_N" else "D"] == table["N" if held == "largest_N" else "D"].max())
            obs = table.loc[part, observed].to_numpy(float)
            pred = scale * predicted[np.asarray(part)]
            preds.append(pd.DataFrame({"run_id": table.loc[part, "run_id"], "law": law, "precision": precision,
                                       "N": table.loc[part, "N"], "D": table.loc[part, "D"],
                                       "G": table.loc[part, "G"], "observed": obs, "predicted": pred,
                                       "residual": pred - obs, "rel_error": np.abs(pred - obs) / obs,
                                       "held_out": held}))

    bf16 = runs[runs["precision"] == "BF16"]
    add("chinchilla", "BF16", CHIN, len(bf16), 0)
    if fitted:
        predict("chinchilla", "BF16", bf16, "loss", fit.predict_loss(CHIN, bf16["N"], bf16["D"]) + 0.01)
    for precision, consts in LAWS.items():
        sub = deltas[deltas["precision"] == precision]
        ok = sub[sub["delta"] > 0]
        law = dict(zip(fit.DELTA_CONSTANTS, consts, strict=True))
        usable = fitted and precision != "W16A4-fc2a8"
        add("unified", precision, law if usable else dict.fromkeys(law, np.nan), len(ok), len(sub) - len(ok))
        add("no_D", precision, law | {"gamma_D": 0.0}, len(ok), len(sub) - len(ok))
        add("epm", precision, {f"eff_G{g}": 0.8 for g in GROUPS}, len(ok), len(sub) - len(ok))
        if usable:
            for draw in range(20):  # bootstrap refits scattered around the law
                draws += [{"law": "unified", "precision": precision, "draw": draw, "constant": name,
                           "value": value * (1 + 0.05 * rng.standard_normal())} for name, value in law.items()]
            predict("unified", precision, ok, "delta",
                    np.asarray(fit.predict_delta(law, ok["N"], ok["D"], ok["G"].astype(float)), float))
    predictions = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame(columns=fit.PREDICTIONS_COLUMNS)
    return (pd.DataFrame(params, columns=fit.PARAMS_COLUMNS), predictions.loc[:, list(fit.PREDICTIONS_COLUMNS)],
            pd.DataFrame(draws, columns=fit.BOOTSTRAP_COLUMNS).astype({"draw": int, "value": float}))

def outlier_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Outlier statistics of every run's two blocks: FC2 input kurtosis 120 in BF16, 90 under QAT, others ~5."""
    rows = []
    for run in runs.itertuples():
        for index, layer in itertools.product(range(2), LAYER_TYPES):
            kurt = (120.0 if run.precision == "BF16" else 90.0) if layer == "fc2" else 5.0 + index
            rows.append({"run_id": run.run_id, "size": run.size, "precision": run.precision,
                         "run_group": run.group, "layer_index": index, "layer_type": layer, "in_features": 64,
                         "n_tokens": 512, "kurtosis_token": kurt, "kurtosis_all": 2 * kurt,
                         "max_median_ratio": 30.0, "top1_share": 0.05})
    return pd.DataFrame(rows)

def write_results(root: Path, fitted: bool = True) -> dict[str, Path]:
    """Write the synthetic Parquet outputs under ``root`` in the workflow's layout; the input paths by key."""
    runs = synthetic_runs()
    deltas = runtable.delta_table(runs)
    decomp = decompose.decomposition(deltas)
    mix = mixed.mixed_precision(deltas)
    params, predictions, bootstrap = fit_tables(runs, deltas, fitted)
    tables = {"runs": runs, "decomposition": decomp, "decomposition_fit": decompose.decomposition_fit(decomp),
              "outliers": outlier_table(runs), "mixed_ranking": mixed.ranking(mix), "params": params,
              "predictions": predictions, "bootstrap": bootstrap}
    paths = {key: root / outputs.INPUTS[key] for key in tables}
    for key, table in tables.items():
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(paths[key], index=False)
    for run in runs.itertuples():
        step = np.arange(1, STEPS + 1)
        loss = 7.5 - 1.5 * np.log1p(step) / np.log1p(STEPS) + (run.loss - runs["loss"].min()) * step / STEPS
        metrics = pd.DataFrame({"step": step, "tokens": step * 4096, "loss": loss, "loss_ema": loss, "lr": 1e-3,
                                "grad_norm": 0.5, "tokens_per_s": 1e4})
        out = root / "results" / "runs" / run.run_id / "metrics.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        metrics.to_parquet(out, index=False)
    return paths
