"""Grid enumeration: which runs exist, their ids and settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from qatlaw import config, grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg() -> dict:
    return config.load(ROOT / "config.yaml")


def test_grid_has_one_baseline_per_cell_and_every_qat_run(cfg):
    cfg = {**cfg, "grid": {k: v for k, v in cfg["grid"].items() if k != "ablation"}}
    runs = grid.grid_runs(cfg)
    g = cfg["grid"]
    cells = len(g["sizes"]) * len(g["tokens"]) * len(g["seeds"])
    assert sum(r.is_baseline for r in runs) == cells
    assert sum(not r.is_baseline for r in runs) == cells * len(g["groups"]) * len(g["precisions"])
    assert len({r.run_id for r in runs}) == len(runs)
    assert all(r.group is None for r in runs if r.is_baseline)


def test_default_grid_covers_the_study(cfg):
    g = cfg["grid"]
    assert len(g["sizes"]) >= 2 and len(g["tokens"]) >= 2 and len(g["groups"]) >= 2
    assert {"W4A4", "W4A16", "W16A4", "W4A4-fc2a8"} <= set(g["precisions"])


def test_run_settings_follow_the_size_table(cfg):
    s = grid.run_settings(cfg, "74M", "10B", "W4A4", "channel", 0)
    assert (s.layers, s.hidden, s.ffn, s.heads, s.kv_heads) == (12, 768, 2048, 16, 4)
    assert s.lr == 1.5e-3 and s.batch_size == 256 and s.tokens == 10**10
    assert s.run_id == "74M/10B/seed0/W4A4_gchannel"
    assert grid.effective_group(s) == 768
    assert grid.RunSettings.from_json(s.to_json()) == s


@pytest.mark.parametrize(
    ("precision", "group", "fraction", "variant"),
    [("BF16", None, 1.0, "BF16"), ("W4A4", 32, 1.0, "W4A4_g32"), ("W4A4-fc2a8", "channel", 1.0, "W4A4-fc2a8_gchannel"),
     ("W4A4", 32, 0.35, "W4A4_g32_f0.35"), ("W4A4", 32, 0.0, "W4A4_g32_f0"), ("W4A16", "channel", 0.5, "W4A16_gchannel_f0.5")],
)
def test_variant_names_round_trip(precision, group, fraction, variant):
    assert grid.variant_name(precision, group, fraction) == variant
    assert grid.parse_variant(variant) == (precision, group, fraction)


@pytest.mark.parametrize("variant", ["W4A4", "W4A4_g32_f1", "W4A4_g32_f0.50", "W4A4_g32_fx", "W4A4_g32_f1.5", "X_g32"])
def test_bad_variant_is_a_clear_error(variant):
    with pytest.raises(grid.GridError, match="neither BF16 nor"):
        grid.parse_variant(variant)


@pytest.mark.parametrize(("n", "text"), [(250_000, "250K"), (10**10, "10B"), (1234, "1234"), (2_500_000, "2500K")])
def test_format_tokens_is_exact(n, text):
    assert grid.format_tokens(n) == text
    assert grid.parse_tokens(text) == n


def test_resource_estimates_grow_with_the_run(cfg):
    small = grid.estimate_resources(grid.run_settings(cfg, "0.1M", "200K", "W4A4", 32, 0), 2048)
    big = grid.estimate_resources(grid.run_settings(cfg, "74M", "10B", "W4A4", 32, 0), 2048)
    assert 500 < small["mem_mb"] < 2048 and small["runtime"] >= 5
    assert big["mem_mb"] > small["mem_mb"] and big["runtime"] > 100 * small["runtime"]


def test_ablation_adds_each_override_alone_without_repeats(cfg):
    cfg = {**cfg, "grid": {**cfg["grid"], "ablation": {
        "sizes": ["0.1M"], "tokens": ["1M"], "groups": [16], "precisions": ["W4A4"],
        "overrides": ["qkva8", "fc2a8", "fc2w8"]}}}
    main = {r.run_id for r in grid.grid_runs({**cfg, "grid": {k: v for k, v in cfg["grid"].items() if k != "ablation"}})}
    extra = {r.run_id for r in grid.grid_runs(cfg)} - main
    assert extra == {"0.1M/1M/seed0/W4A4-qkva8_g16", "0.1M/1M/seed0/W4A4-fc2w8_g16"}
    assert grid.token_budgets(cfg) == cfg["grid"]["tokens"]


def test_batches_keep_cells_apart_and_cover_every_run_once():
    cfg = config.load(ROOT / "config.yaml")
    runs = grid.grid_runs(cfg)
    batches = grid.batch_runs(runs, 6)
    assert sorted(r.run_id for b in batches for r in b) == sorted(r.run_id for r in runs)
    assert all(len({(r.size, r.tokens, r.seed) for r in b}) == 1 for b in batches)
    assert max(len(b) for b in batches) <= 6
    # 4 main cells of 9 runs (5 + 4), the ablation's 2 new runs join cell 0.1M/1M (11 = 6 + 5)
    assert sorted(len(b) for b in batches) == [4, 4, 4, 5, 5, 5, 5, 6]
    assert sorted(r.run_id for [r] in grid.batch_runs(runs, 1)) == sorted(r.run_id for r in runs)


def test_cells_group_the_runs_in_grid_order():
    runs = grid.grid_runs(config.load(ROOT / "config.yaml"))
    cells = grid.cells(runs)
    assert list(cells) == ["0.03M/1M/seed0", "0.03M/2M/seed0", "0.1M/1M/seed0", "0.1M/2M/seed0"]
    assert all(run.run_id.startswith(cell + "/") for cell, members in cells.items() for run in members)
    # the ablation's runs come last in the grid but belong to cell 0.1M/1M, after its main-grid runs
    assert [run.run_id for run in cells["0.1M/1M/seed0"]] == [
        run.run_id for run in runs if run.cell == "0.1M/1M/seed0"]
    assert cells["0.1M/1M/seed0"][-1].precision == "W4A4-fc2w8" and len(cells["0.1M/1M/seed0"]) == 11


def test_settings_json_of_several_runs():
    runs = grid.grid_runs(config.load(ROOT / "config.yaml"))[:2]
    text = "[" + ", ".join(r.to_json() for r in runs) + "]"
    assert grid.RunSettings.many_from_json(text) == runs
    with pytest.raises(grid.GridError, match="expected the settings of one run, got 2"):
        grid.RunSettings.from_json(text)
    with pytest.raises(grid.GridError, match="empty list"):
        grid.RunSettings.many_from_json("[]")


def test_extra_sub_grids_take_their_own_seeds(cfg):
    main = {k: v for k, v in cfg["grid"].items() if k != "ablation"}
    cfg = {**cfg, "grid": {**main, "extra": [
        {"sizes": ["0.1M"], "tokens": ["100K"], "groups": [32], "precisions": ["W4A4"], "seeds": [0, 1, 2]}]}}
    cfg = config.validate(cfg)
    runs = grid.grid_runs(cfg)
    assert {r.seed for r in runs if r.size == "0.1M" and r.tokens == 100_000 and r.precision == "W4A4"} == {0, 1, 2}
    # the main grid keeps its own seeds
    assert {r.seed for r in runs if r.tokens == 2_000_000} == set(main["seeds"])


def test_laptop_grid_covers_what_a_law_needs():
    """config/laptop.yaml: >= 3 sizes over >= 8x in N, >= 3 budgets over >= 8x in D with D/N >= 10 in every cell,
    >= 3 groups over >= 2x in log2 G, W4A4, W4A16, W16A4 and W4A4-fc2a8, and one cell with >= 3 seeds."""
    import math

    from qatlaw.model import non_embedding_params
    from qatlaw.train import model_config

    laptop = config.load(ROOT / "config.yaml", ROOT / "config" / "laptop.yaml")
    runs = grid.grid_runs(laptop)
    n = {r.size: non_embedding_params(model_config(r, laptop["data"]["vocab_size"])) for r in runs}
    assert len(n) >= 3 and max(n.values()) / min(n.values()) >= 8
    tokens = {r.tokens for r in runs}
    assert len(tokens) >= 3 and max(tokens) / min(tokens) >= 8
    assert min(r.tokens / n[r.size] for r in runs) >= 10
    log_g = {math.log2(grid.effective_group(r)) for r in runs if not r.is_baseline}
    assert len(log_g) >= 3 and max(log_g) / min(log_g) >= 2
    assert {"W4A4", "W4A16", "W16A4", "W4A4-fc2a8"} <= {r.precision for r in runs}
    seeds: dict[tuple, set] = {}
    for r in runs:
        seeds.setdefault((r.size, r.tokens, r.precision, r.group), set()).add(r.seed)
    assert max(len(s) for s in seeds.values()) >= 3
