"""Config loading: the shipped configs validate, and every kind of bad value fails with one line naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from qatlaw import config, grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def base() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults(base):
    cfg = config.load(ROOT / "config.yaml")
    assert cfg["grid"]["seeds"] == base["grid"].get("seeds", [0])
    assert cfg["quant"]["clip"] == "paper"
    # a default that config.yaml leaves out is filled in from the schema
    del base["training"]["loss_ema"]
    assert config.validate(base)["training"]["loss_ema"] == 0.9


@pytest.mark.parametrize("grid", sorted(p.name for p in (ROOT / "config").glob("*.yaml") if p.name != "schema.yaml"))
def test_every_shipped_grid_validates_over_the_default(grid, tmp_path, monkeypatch):
    from conftest import write_paper_standin

    # user corpora and tokenizer files (the paper grid's OLMo-mix) are relative to the working directory
    monkeypatch.chdir(tmp_path)
    write_paper_standin(tmp_path)
    config.load(ROOT / "config.yaml", ROOT / "config" / grid)


def test_paper_grid_without_its_corpus_names_the_missing_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError, match=r"^data.sources\[0\]: 'olmo-mix-1124' .* matches no file"):
        config.load(ROOT / "config.yaml", ROOT / "config" / "paper.yaml")


def test_schema_file_in_config_dir_is_the_package_schema():
    assert (ROOT / "config" / "schema.yaml").resolve() == config.SCHEMA_PATH.resolve()


def test_paper_sizes_are_in_the_table(base):
    assert {"74M", "145M", "297M", "595M", "973M"} <= set(base["models"])


def _set(cfg: dict, path: tuple[str, ...], value) -> None:
    *parents, last = path
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value


BAD = [
    (('grid', 'precisions'), ["W4A4", "W3A9"], "grid.precisions[1]"),
    (('grid', 'precisions'), ["W4A4-xxa8"], "grid.precisions[0]"),
    (('grid', 'precisions'), ["W16A16"], "quantizes nothing"),
    (('grid', 'groups'), [32, 48], "grid.groups[1]: group size 48 does not divide"),
    (('grid', 'groups'), [128], "does not divide the qkv input dimension 32 of size '0.03M'"),
    (('grid', 'groups'), ["token"], "grid.groups[0]"),
    (('grid', 'groups'), [0], "grid.groups[0]"),
    (('grid', 'sizes'), ["0.1M", "5M"], "grid.sizes[1]: size '5M' is not in the models table"),
    (('models', '0.1M', 'heads'), 3, "models.0.1M: hidden 64 is not divisible by heads 3"),
    (('models', '0.1M', 'kv_heads'), 3, "models.0.1M: heads 4 is not divisible by kv_heads 3"),
    (('grid', 'tokens'), [-5], "grid.tokens[0]"),
    (('grid', 'tokens'), [0], "grid.tokens[0]"),
    (('grid', 'tokens'), [1.5], "grid.tokens[0]"),
    (('grid', 'tokens'), ["1.2345K"], "grid.tokens[0]: '1.2345K' is not a whole number of tokens"),
    (('grid', 'tokens'), ["lots"], "grid.tokens[0]"),
    (('grid', 'tokens'), [100], "less than one optimizer step"),
    (('data', 'sources'), ["no/such/corpus/*.txt"], "data.sources[0]: 'no/such/corpus/*.txt' is not a built-in source"),
    (('data', 'sources'), ["sotuu"], "matches no file (missing corpus)"),
    (('data', 'vocab_size'), 10, "data.vocab_size"),
    (('data', 'val_fraction'), 0.0, "data.val_fraction"),
    (('training', 'learning_rate'), 1.0, "training: unknown key 'learning_rate'"),
    (('quant', 'clip'), "asym", "quant.clip"),
    (('training', 'device'), "tpu", "training.device"),
    (('training', 'warmup_steps'), 0, "training.warmup_steps"),
    (('grid', 'extra'), [{"sizes": ["7M"], "tokens": ["100K"], "groups": [32], "precisions": ["W4A4"]}],
     "grid.extra[0].sizes[0]: size '7M'"),
    (('grid', 'extra'), [{"sizes": ["0.1M"], "tokens": ["100K"], "groups": [48], "precisions": ["W4A4"]}],
     "grid.extra[0].groups[0]: group size 48 does not divide"),
    (('training', 'gpus_per_run'), 3, "training.gpus_per_run: batch of 32 sequences of size '0.03M' does not split over 3 GPUs"),
    (('training', 'gpus_per_run'), {"0.1M": 4, "7M": 2}, "training.gpus_per_run: '7M' is not a size of the models table"),
    (('training', 'gpus_per_run'), {"0.1M": 0}, "training.gpus_per_run"),
    (('training', 'job_hours'), 0, "training.job_hours"),
    (('training', 'micro_batch_size'), 5, "training.micro_batch_size: 5 does not divide the 32 sequences per GPU"),
    (('training', 'micro_batch_size'), 0, "training.micro_batch_size"),
    (('training', 'activation_checkpointing'), "sometimes", "training.activation_checkpointing"),
    (('grid', 'ablation'), {"sizes": ["0.1M"], "tokens": ["100K"], "groups": [32], "precisions": ["W4A4"],
                            "overrides": ["fc3a8"]}, "grid.ablation.overrides[0]"),
    (('grid', 'ablation'), {"sizes": ["7M"], "tokens": ["100K"], "groups": [32], "precisions": ["W4A4"],
                            "overrides": ["fc2a8"]}, "grid.ablation.sizes[0]: size '7M'"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD, ids=[f"{'.'.join(k)}={v}" for k, v, _ in BAD])
def test_bad_values_fail_with_one_line_naming_the_key(base, key, value, expected):
    cfg = copy.deepcopy(base)
    _set(cfg, key, value)
    with pytest.raises(config.ConfigError) as err:
        config.validate(cfg)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_missing_section_is_named(base):
    del base["grid"]
    with pytest.raises(config.ConfigError, match="'grid' is a required property"):
        config.validate(base)


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  sizes: [0.1M\n  tokens: 3\n")
    with pytest.raises(config.ConfigError, match=r"bad.yaml: malformed YAML at line \d+"):
        config.load(bad)


def test_missing_config_file(tmp_path):
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")


def test_user_corpus_path_is_accepted(base, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    base["data"]["sources"] = ["sotu", "*.txt"]
    cfg = config.validate(base)
    assert config.source_ids(cfg) == {"sotu": "sotu", "user1": "*.txt"}


def test_merge_overrides_nested_keys_and_keeps_the_rest(base):
    merged = config.merge(base, {"grid": {"sizes": ["1M"]}, "models": {"x": {"layers": 1}}})
    assert merged["grid"]["sizes"] == ["1M"]
    assert merged["grid"]["precisions"] == base["grid"]["precisions"]
    assert "74M" in merged["models"] and "x" in merged["models"]


@pytest.mark.parametrize("extra", [None, []])
def test_an_overlay_switches_the_sub_grids_off_with_null(base, tmp_path, extra):
    from qatlaw import grid

    sub = {"sizes": ["0.1M"], "tokens": ["3M"], "groups": [16], "precisions": ["W4A4"]}
    with_both = config.load(ROOT / "config.yaml", {"grid": {"extra": [sub]}})
    assert with_both["grid"]["ablation"] and with_both["grid"]["extra"]
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"grid": {"ablation": None, "extra": extra}}))
    cfg = config.load(ROOT / "config.yaml", {"grid": {"extra": [sub]}}, overlay)
    assert "ablation" not in cfg["grid"] and cfg["grid"]["extra"] == []
    main = {key: value for key, value in base["grid"].items() if key != "ablation"}
    assert grid.grid_runs(cfg) == grid.grid_runs(config.validate({**base, "grid": main}))
    assert len(grid.grid_runs(cfg)) < len(grid.grid_runs(with_both))
    with pytest.raises(config.ConfigError, match="grid.ablation: 5 is not of type 'object', 'null'"):
        config.load(ROOT / "config.yaml", {"grid": {"ablation": 5}})


def test_cli_defaults_are_the_schema_defaults():
    from qatlaw.cli import build_parser

    parser = build_parser()
    train = parser.parse_args(["train", *(f"--{k}=x" for k in ("settings", "train-tokens", "val-tokens", "manifest",
                                                                 "summary", "metrics", "model", "checkpoint"))])
    assert (train.threads, train.gpus, train.device, train.checkpoint_every, train.checkpoint_minutes, train.compile,
            train.micro_batch_size, train.loss_chunk_tokens, train.activation_checkpointing
            ) == (1, 0, "auto", 200, 30, 0, 0, 8192, "auto")
    fitted = parser.parse_args(["fit", "--runs", "r", "--out-dir", "o"])
    assert (fitted.bootstrap, fitted.seed, fitted.metric) == tuple(config.schema_default("fit", k)
                                                                   for k in ("bootstrap", "seed", "metric"))
    errors = parser.parse_args(["layer-error", "m.pt", "--val", "v", "--out", "o"])
    assert (errors.tokens, errors.groups, errors.bits) == (4096, ["32", "64", "128", "256", "channel"], 4)
    bpe = parser.parse_args(["tokenizer", "--out", "t.json"])
    assert (bpe.min_frequency, bpe.sample_mb, bpe.val_fraction, bpe.seed, bpe.text_field, bpe.min_chars) == (
        2, 256, 0.02, 1234, "text", 200)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(500000, 500000), ("500K", 500_000), ("2.5M", 2_500_000), ("10B", 10**10), ("1T", 10**12), ("7", 7)],
)
def test_parse_tokens(value, expected):
    assert grid.parse_tokens(value) == expected


def test_linear_inputs_cover_the_four_layer_types():
    assert grid.linear_inputs({"hidden": 64, "ffn": 256}) == {"qkv": 64, "o": 64, "fc1": 64, "fc2": 256}


def test_cli_validate_counts_the_runs(capsys):
    from qatlaw.cli import main

    assert main(["validate", str(ROOT / "config.yaml")]) == 0
    assert "config OK: 38 runs (4 BF16 baselines, 34 QAT)" in capsys.readouterr().out


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    from qatlaw.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  groups: [48]\n")
    assert main(["validate", str(ROOT / "config.yaml"), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qatlaw validate: error: grid.groups[0]: group size 48 does not divide the qkv input dimension 32 of size '0.03M'"]
