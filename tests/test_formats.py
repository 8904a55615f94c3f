"""The 4-bit formats of today's GPUs (MXFP4, NVFP4) and the Hadamard rotation: the precision grammar, the quantizer
against torchao's reference bit for bit, the layer, and the checks before any job."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

from qatlaw import config, findings, formats
from qatlaw import precision as prec
from qatlaw.grid import grid_runs
from qatlaw.quant import QATLinear, QuantOptions, _round_e2m1, fake_quant, rotate
from qatlaw.train import quant_options

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def torchao_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """torchao's MXFP4 (E2M1 elements, E8M0 scales, blocks of 32, FLOOR scales), dequantized."""
    scale, data = to_mx(x.contiguous(), torch.float4_e2m1fn_x2, 32)
    return to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32)


def torchao_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """torchao's NVFP4 (E2M1 elements, E4M3 scales per block of 16, one fp32 scale per tensor), dequantized as
    ``NVFP4Tensor.dequantize`` does: the elements times (tensor scale × block scale)."""
    tensor_scale = per_tensor_amax_to_scale(x.abs().amax())
    scales, data = nvfp4_quantize(x.contiguous(), 16, tensor_scale)
    values = f4_unpacked_to_f32(unpack_uint4(data)).view(*x.shape[:-1], -1, 16)
    return (values * (tensor_scale * scales.to(torch.float32)).view(*x.shape[:-1], -1, 1)).view(x.shape)


REFERENCES = {"mxfp4": (torchao_mxfp4, 32), "nvfp4": (torchao_nvfp4, 16)}


def boundary_rows() -> torch.Tensor:
    """Rows of 64 made of the E2M1 rounding midpoints (ties), one float32 ulp either side of them and the grid
    itself, both signs, times 2^k, in MX blocks of maximum 7·2^k (scale 2^k: the scaled values are those points)."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    ulp_below = torch.nextafter(mids, torch.zeros_like(mids))
    ulp_above = torch.nextafter(mids, torch.full_like(mids, 8.0))
    grid = torch.tensor(E2M1_VALUES)
    values = torch.cat([mids, ulp_below, ulp_above, grid, torch.tensor([7.0])])  # 30 values, the max 7.0
    row = torch.cat([values, torch.tensor([6.0, 0.0])])  # 32: one MX block, two NVFP4 blocks (maxima 6 and 7)
    rows = torch.stack([torch.cat([row, -row]), torch.cat([-row, row])])
    return torch.cat([rows * 2.0**k for k in (-3, 0, 5)])


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    zeros = torch.randn(8, 64, generator=g)
    zeros[2] = 0.0  # a row of all-zero blocks
    zeros[3, :32] = 0.0  # one all-zero MX block (two NVFP4 blocks)
    zeros[4, ::3] = 0.0  # scattered zeros
    zeros[5, 1::2] = -0.0  # negative zeros
    return {
        "normal": torch.randn(64, 256, generator=g),
        "heavy-tailed": torch.distributions.StudentT(torch.tensor(1.5)).sample((64, 256)),
        "outlier channels": torch.randn(32, 128, generator=g) * torch.where(torch.rand(128, generator=g) < 0.05,
                                                                              50.0, 1.0),
        "zeros": zeros,
        "rounding boundaries": boundary_rows(),
        "largest scales": torch.randn(8, 64, generator=g) * 1e37,
        "smallest scales": torch.randn(8, 64, generator=g) * 1e-39,  # subnormal blocks: E8M0's lowest scale
        "every scale": torch.randn(8, 64, generator=g) * torch.logspace(-40, 37, 64),
        "3d activations": torch.randn(4, 16, 64, generator=g),
    }


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("name", list(tensors()))
def test_block_formats_equal_torchao_bit_for_bit(fmt, name):
    x = tensors()[name]
    reference, block = REFERENCES[fmt]
    ours, theirs = fake_quant(x, 4, block, fmt=fmt), reference(x)
    assert torch.isfinite(theirs).all()
    different = bits(ours) != bits(theirs)  # signed zeros included
    assert not different.any(), f"{int(different.sum())} values differ, e.g. {x[different][:3].tolist()}"


def test_the_comparison_sees_the_edge_cases():
    """The boundary rows do hit ties, clamped maxima and the E8M0 floor; the smallest scales are E8M0's lowest."""
    x = boundary_rows()[2:4]  # scale 1 for both formats' 7-maximum blocks
    q = fake_quant(x, 4, 32, fmt="mxfp4")
    assert q[0, :7].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # ties to even
    assert q[0, 29:31].tolist() == [6.0, 6.0]  # 7 saturates
    tiny = fake_quant(tensors()["smallest scales"], 4, 32, fmt="mxfp4")
    codes = tiny.abs()[tiny != 0] / 2.0**-127  # every block at the lowest E8M0 scale, 2^-127
    assert len(codes) and set(codes.tolist()) <= set(E2M1_VALUES)


def test_nvfp4_of_an_all_zero_tensor_is_zero():
    """torchao's per-tensor scale of 0 gives NaN; the fake quantizer keeps a zero tensor zero."""
    assert torch.equal(fake_quant(torch.zeros(4, 32), 4, 16, fmt="nvfp4"), torch.zeros(4, 32))


def test_e2m1_rounding_is_to_nearest_even():
    u = torch.linspace(-6, 6, 24001)
    grid = torch.tensor(E2M1_VALUES)
    grid = torch.cat([-grid.flip(0), grid])
    dist = (u[:, None] - grid[None]).abs()
    best = dist.min(1).values
    ties = (dist == best[:, None]).sum(1) > 1
    nearest = grid[dist.argmin(1)]
    ours = _round_e2m1(u)
    assert torch.equal(ours[~ties], nearest[~ties])
    codes = {0.0: 0, 0.5: 1, 1.0: 0, 1.5: 1, 2.0: 0, 3.0: 1, 4.0: 0, 6.0: 1}  # the mantissa bit
    assert all(codes[abs(v)] == 0 for v in ours[ties].tolist())


@pytest.mark.parametrize("fmt,block", [("mxfp4", 32), ("nvfp4", 16)])
def test_block_formats_pass_gradients_straight_through(fmt, block):
    x = torch.randn(4, 64, requires_grad=True)
    grad = torch.randn(4, 64)
    fake_quant(x, 4, block, fmt=fmt).backward(grad)
    assert torch.equal(x.grad, grad)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"fmt": "mxfp4", "bits": 8}, "4-bit format"),
    ({"fmt": "nvfp4", "gamma": torch.ones(2)}, "clipping factor"),
])
def test_block_formats_refuse_what_they_cannot_do(kwargs, fragment):
    args = {"bits": 4, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        fake_quant(torch.randn(2, 64), args.pop("bits"), 32, **args)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,block", [("mxfp4", 32), ("nvfp4", 16), ("fp4", 32)])
def test_compiled_block_formats_equal_eager(fmt, block):
    """The training recipe compiles: inductor must not reassociate the rounding's magic-number arithmetic."""
    x = torch.randn(128, 128) * 3
    compiled = torch.compile(lambda t: fake_quant(t, 4, block, fmt=fmt), dynamic=False)
    assert torch.equal(bits(compiled(x)), bits(fake_quant(x, 4, block, fmt=fmt)))


@pytest.mark.parametrize("name,canonical,fmt,rotation", [
    ("W4A4-mxfp4", "W4A4-mxfp4", "mxfp4", None),
    ("W4A4-fc2a8-had32-nvfp4", "W4A4-nvfp4-had32-fc2a8", "nvfp4", 32),
    ("W4A16-mxfp4", "W4A16-mxfp4", "mxfp4", None),
    ("W4A4-had64", "W4A4-had64", None, 64),
])
def test_precisions_name_formats_and_rotations(name, canonical, fmt, rotation):
    p = prec.parse(name)
    assert (p.name, p.format, p.rotation) == (canonical, fmt, rotation)
    assert prec.parse(p.name) == p and hash(prec.parse(p.name)) == hash(p)
    assert p.has_overrides == ("fc2a8" in name)


@pytest.mark.parametrize("name,fragment", [
    ("W8A8-mxfp4", "4-bit format"),
    ("W4A4-mxfp4-nvfp4", "two formats"),
    ("W4A4-had24", "not a power of two"),
    ("W4A4-had32-had64", "two rotations"),
    ("W16A16-nvfp4", "4-bit format"),
    ("W4A4-mxfp8", "bad override"),
])
def test_precision_errors_are_one_line(name, fragment):
    with pytest.raises(ValueError) as err:
        prec.parse(name)
    assert fragment in str(err.value) and "\n" not in str(err.value) and repr(name) in str(err.value)


def test_rotation_keeps_the_product():
    x, w = torch.randn(5, 64, dtype=torch.float64), torch.randn(7, 64, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, 32) @ rotate(w, 32).T, x @ w.T)
    torch.testing.assert_close(rotate(rotate(x, 16), 16), x)  # the Sylvester Hadamard is its own inverse


def test_a_layer_quantizes_each_tensor_in_its_format():
    """W4A4-mxfp4-fc2a8's FC2: weights MXFP4, input INT8 AbsMax in the same blocks; rotated operands first."""
    p = prec.parse("W4A4-mxfp4-had32-fc2a8")
    opts = QuantOptions(group_size=32, fmt=p.format, lac=False, rotation=p.rotation)
    layer = QATLinear(64, 16, p.layers["fc2"], opts)
    x = torch.randn(3, 64)
    xr, wr = rotate(x, 32), rotate(layer.weight.detach(), 32)
    expected = fake_quant(xr, 8, 32) @ fake_quant(wr, 4, 32, fmt="mxfp4").T
    torch.testing.assert_close(layer(x).detach(), expected, rtol=0, atol=0)


def test_runs_take_the_format_of_their_precision(tmp_path):
    cfg = config.load("config.yaml", {"grid": {"sizes": ["0.03M"], "tokens": ["16K"], "groups": [16],
                                               "precisions": ["W4A4-nvfp4", "W4A4"], "seeds": [0]},
                                      "quant": {"lac": "paper"}})
    runs = {r.precision: r for r in grid_runs(cfg) if not r.is_baseline}
    assert runs["W4A4-nvfp4"].element_format == "nvfp4" and runs["W4A4"].element_format == "int"
    opts = quant_options(runs["W4A4-nvfp4"])
    assert (opts.fmt, opts.lac, opts.rotation) == ("nvfp4", False, None)


@pytest.mark.parametrize("overlay,fragment", [
    ({"grid": {"precisions": ["W4A4-had128"]}}, "rotation size 128 of 'W4A4-had128' does not divide"),
    ({"grid": {"precisions": ["W4A4-mxfp4"]}, "quant": {"lac": "always"}}, "takes no learnable activation clipping"),
    ({"grid": {"precisions": ["W4A4-nvfp4"], "groups": [24]}}, "group size 24 does not divide"),
])
def test_bad_format_grids_fail_before_any_job(overlay, fragment):
    base = {"grid": {"sizes": ["0.03M"], "tokens": ["16K"], "groups": [16], "seeds": [0]}}
    merged = {**base, **overlay, "grid": {**base["grid"], **overlay["grid"]}}
    with pytest.raises(config.ConfigError) as err:
        config.load("config.yaml", merged)
    assert fragment in str(err.value) and "\n" not in str(err.value)



def format_runs(ratios: dict[str, float], seeds=(0, 1), noise: float = 0.0) -> pd.DataFrame:
    """A run table of two cells × seeds: BF16, INT4 W4A4 G32 (δ 0.1 · cell factor) and each format at its ratio."""
    rows, rng = [], np.random.default_rng(0)
    blocks = {"W4A4": 32, "W4A4-mxfp4": 32, "W4A4-mxfp4-had32": 32, "W4A4-nvfp4": 16}
    for size, N, factor in (("0.1M", 1e5, 1.0), ("0.3M", 3e5, 0.7)):
        for seed in seeds:
            base = 3.0 + 0.01 * seed
            rows.append({"precision": "BF16", "group": "none", "G": np.nan, "val_loss": base, "format": "int"})
            for precision, ratio in {"W4A4": 1.0, **ratios}.items():
                delta = 0.1 * factor * ratio * (1 + noise * rng.standard_normal())
                fmt = prec.parse(precision).format or "int"
                rows.append({"precision": precision, "group": str(blocks[precision]), "G": blocks[precision],
                             "val_loss": base + delta, "format": fmt})
            for r in rows[-(len(ratios) + 2):]:
                r.update(size=size, N=N, D=4e6, tokens_requested=4e6, seed=seed,
                         run_id=f"{size}/4M/seed{seed}/{r['precision']}_{r['group']}", diverged=False)
    table = pd.DataFrame(rows)
    return table.assign(loss=table["val_loss"])


def test_formats_are_set_against_paired_int4_runs():
    runs = format_runs({"W4A4-mxfp4": 1.2, "W4A4-nvfp4": 0.9})
    pairs = formats.pairs(runs, "val_loss")
    assert len(pairs) == 8 and set(pairs["int4_G"]) == {"32"}  # no INT4 G16 here: NVFP4 against G 32
    cells = formats.per_cell(pairs).set_index(["precision", "size"])
    np.testing.assert_allclose(cells["ratio"].to_numpy(), [1.2, 1.2, 0.9, 0.9])
    pooled = formats.pooled(pairs).set_index("precision")
    assert pooled.loc["W4A4-mxfp4", "ratio"] == pytest.approx(1.2)
    assert pooled.loc["W4A4-mxfp4", "low"] == pytest.approx(1.2)  # no noise: every resample gives 1.2
    assert (pooled["cells"] == 2).all() and (pooled["pairs"] == 4).all()


def test_the_formats_section_says_where_the_noise_covers_the_difference():
    runs = format_runs({"W4A4-mxfp4-had32": 1.3, "W4A4-nvfp4": 1.0}, seeds=(0, 1, 2), noise=0.3)
    text = formats.markdown(runs, "val_loss")
    assert "## The 4-bit formats against INT4" in text and "1.35 [1.13, 1.44]" in text
    pooled = formats.pooled(formats.pairs(runs, "val_loss")).set_index("precision")
    for precision, r in pooled.iterrows():  # the pooled row says where its interval lies against 1
        assert f"| {precision} | {r['ratio']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] | " \
               f"{formats.against_one(r['low'], r['high'])} |" in text
    assert formats.against_one(0.8, 1.3) == "spans 1: the noise covers the difference"
    assert formats.against_one(1.1, 1.3) == "costs more than INT4"
    assert formats.against_one(0.7, 0.9) == "costs less than INT4"
    found = findings.format_findings(runs, "val_loss")
    assert [r["finding"] for r in found] == ["δ W4A4-mxfp4-had32 / δ INT4 W4A4 > 1 (paired, pooled)"]
    assert found[0]["verdict"] in findings.VERDICTS and found[0]["n"] == 6
    assert findings.format_findings(format_runs({}), "val_loss") == []  # a grid without formats: no finding


def test_int4_of_another_format_is_not_the_reference():
    runs = format_runs({"W4A4-mxfp4": 1.2})
    runs.loc[runs["precision"] == "W4A4", "format"] = "fp4"  # quant.format fp4: E2M1 W4A4, not INT4
    assert formats.pairs(runs, "val_loss").empty and formats.markdown(runs, "val_loss") == ""
