import pytest
import torch
import torch.nn.functional as F

from qatlaw.precision import LayerQuant, TensorQuant
from qatlaw.quant import LAC, QATLinear, QuantOptions, fake_quant, uses_lac

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

# One row of 8 values. At G=4 the groups are [0.3, -1.2, 2.2, 4.0] (absmax 4)
# and [-0.8, 0.26, 0.14, -0.33] (absmax 0.8); at G=8 one group, absmax 4.
X = torch.tensor([[0.3, -1.2, 2.2, 4.0, -0.8, 0.26, 0.14, -0.33]])


def lq(w: int, a: int) -> LayerQuant:
    return LayerQuant(TensorQuant(w), TensorQuant(a))


def test_hand_values_paper_g4():
    # scale = absmax/8, codes clamped to [-8, 7].
    # group 1: s = 4/8 = 0.5;  x/s = [0.6, -2.4, 4.4, 8.0] -> [1, -2, 4, 7 (8 clamped)]
    # group 2: s = 0.8/8 = 0.1; x/s = [-8, 2.6, 1.4, -3.3] -> [-8, 3, 1, -3]
    expected = torch.tensor([[0.5, -1.0, 2.0, 3.5, -0.8, 0.3, 0.1, -0.3]])
    torch.testing.assert_close(fake_quant(X, 4, 4, clip="paper"), expected)


def test_hand_values_paper_g8():
    # s = 4/8 = 0.5; group-2 values / s = [-1.6, 0.52, 0.28, -0.66] -> [-2, 1, 0, -1]
    expected = torch.tensor([[0.5, -1.0, 2.0, 3.5, -1.0, 0.5, 0.0, -0.5]])
    torch.testing.assert_close(fake_quant(X, 4, 8, clip="paper"), expected)


def test_hand_values_symmetric_g4():
    # scale = absmax/7, codes in [-7, 7].
    # group 1: s = 4/7;   x/s = 1.75·x = [0.525, -2.1, 3.85, 7] -> [1, -2, 4, 7]
    # group 2: s = 0.8/7; x/s = 8.75·x = [-7, 2.275, 1.225, -2.8875] -> [-7, 2, 1, -3]
    expected = torch.tensor([[1, -2, 4, 7, 0, 0, 0, 0]]) * 4 / 7 + torch.tensor([[0, 0, 0, 0, -7, 2, 1, -3]]) * 0.8 / 7
    torch.testing.assert_close(fake_quant(X, 4, 4, clip="symmetric"), expected)


def test_hand_values_symmetric_g8():
    # s = 4/7; group-2 values · 1.75 = [-1.4, 0.455, 0.245, -0.5775] -> [-1, 0, 0, -1]
    expected = torch.tensor([[1, -2, 4, 7, -1, 0, 0, -1]]) * 4 / 7
    torch.testing.assert_close(fake_quant(X, 4, 8, clip="symmetric"), expected)


def test_hand_values_fp4_g4():
    # scale = absmax/6, nearest E2M1 magnitude.
    # group 1: s = 4/6;   x/s = [0.45, -1.8, 3.3, 6] -> [0.5, -2, 3, 6]
    # group 2: s = 0.8/6; x/s = [-6, 1.95, 1.05, -2.475] -> [-6, 2, 1, -2]
    expected = torch.cat([torch.tensor([0.5, -2, 3, 6]) * 4 / 6, torch.tensor([-6, 2, 1, -2]) * 0.8 / 6])[None]
    torch.testing.assert_close(fake_quant(X, 4, 4, fmt="fp4"), expected)


def test_eight_bit_paper():
    # s = 4/128; 4.0 -> code 128 clamped to 127; 0.3/s = 9.6 -> 10
    y = fake_quant(X, 8, 8, clip="paper")
    assert y[0, 3].item() == pytest.approx(127 * 4 / 128)
    assert y[0, 0].item() == pytest.approx(10 * 4 / 128)


@pytest.mark.parametrize("clip", ["paper", "symmetric"])
def test_group_size_changes_output(clip):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    outs = [fake_quant(x, 4, g, clip=clip) for g in (16, 32, 64)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("fmt", ["int", "fp4"])
def test_channel_is_whole_row(fmt):
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(fake_quant(x, 4, "channel", fmt=fmt), fake_quant(x, 4, 48, fmt=fmt), rtol=0, atol=0)


def test_groups_are_per_token_along_last_dim():
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(fake_quant(x, 4, 8), fake_quant(x.reshape(6, 32), 4, 8).reshape(2, 3, 32))
    # moving one large value only changes its own group
    x2 = x.clone()
    x2[0, 0, 0] = 100.0
    diff = (fake_quant(x2, 4, 8) != fake_quant(x, 4, 8)).reshape(6, 4, 8).any(-1)
    assert diff[0, 0] and diff.sum() == 1


@pytest.mark.parametrize("group_size, n_groups", [(8, 32), (16, 16), (32, 8), ("channel", 4)])
def test_distinct_scales_equal_groups(group_size, n_groups):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    y = fake_quant(x, 4, group_size, clip="symmetric")
    g = 64 if group_size == "channel" else group_size
    scales = y.reshape(-1, g).abs().amax(-1) / 7  # symmetric: a group's max code is ±7
    assert scales.numel() == n_groups
    assert torch.unique(scales).numel() == n_groups
    # every group is on its own grid: values / scale are integers
    codes = y.reshape(-1, g) / scales[:, None]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("clip, fmt", [("paper", "int"), ("symmetric", "int"), ("paper", "fp4")])
def test_ste_gradient_is_identity(clip, fmt):
    x = torch.randn(4, 32, requires_grad=True)
    g_out = torch.randn(4, 32)
    fake_quant(x, 4, 8, clip=clip, fmt=fmt).backward(g_out)
    torch.testing.assert_close(x.grad, g_out, rtol=0, atol=0)


def test_paper_idempotent_only_when_lowest_code_used():
    # Group 1 (X[:4]) has a positive absmax, which lands on code 8 and is clamped to 7:
    # the group's absmax shrinks 4 -> 3.5, the next pass uses s = 3.5/8 = 0.4375 and
    # [0.5, -1, 2, 3.5]/s = [1.14, -2.29, 4.57, 8] -> [1, -2, 5, 7].
    once = fake_quant(X[:, :4], 4, 4)
    torch.testing.assert_close(fake_quant(once, 4, 4), torch.tensor([[1.0, -2, 5, 7]]) * 0.4375)
    # Group 2 (X[4:]) has its absmax at -0.8 -> code -8: absmax kept, exactly idempotent.
    once = fake_quant(X[:, 4:], 4, 4)
    assert torch.equal(fake_quant(once, 4, 4), once)


@pytest.mark.parametrize("clip, fmt", [("symmetric", "int"), ("paper", "fp4")])
def test_symmetric_and_fp4_idempotent(clip, fmt):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    once = fake_quant(x, 4, 16, clip=clip, fmt=fmt)
    torch.testing.assert_close(fake_quant(once, 4, 16, clip=clip, fmt=fmt), once, rtol=1e-6, atol=0)


def test_fp4_values_on_e2m1_grid():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)) * 3
    y = fake_quant(x, 4, 16, fmt="fp4").reshape(-1, 16)
    scale = x.reshape(-1, 16).abs().amax(-1, keepdim=True) / 6
    mags = (y / scale).abs()
    dist = (mags[..., None] - E2M1).abs().amin(-1)
    assert dist.max() < 1e-5
    # and each value is the nearest grid point to x/scale
    u = (x.reshape(-1, 16) / scale).abs()
    nearest = E2M1[(u[..., None] - E2M1).abs().argmin(-1)]
    torch.testing.assert_close(mags, nearest, rtol=0, atol=1e-5)


@pytest.mark.parametrize("clip, fmt", [("paper", "int"), ("symmetric", "int"), ("paper", "fp4")])
def test_zero_tensor(clip, fmt):
    x = torch.zeros(2, 16, requires_grad=True)
    gamma = torch.ones(2, requires_grad=True)
    for g in (None, gamma):
        y = fake_quant(x, 4, 8, clip=clip, fmt=fmt, gamma=g)
        assert torch.equal(y, torch.zeros(2, 16))
        y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(gamma.grad).all()


def test_partially_zero_groups():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -0.5, 0.25, 0.0]])
    y = fake_quant(x, 4, 4)
    assert torch.isfinite(y).all() and torch.equal(y[0, :4], torch.zeros(4))


def test_gamma_clips_and_gets_gradient():
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    lac = LAC(4, init=0.5)
    y = fake_quant(x, 4, 8, clip="symmetric", gamma=lac.gamma)
    # range is absmax·γ: the largest output magnitude per group is 0.5·absmax
    absmax = x.detach().reshape(6, 4, 8).abs().amax(-1)
    torch.testing.assert_close(y.detach().reshape(6, 4, 8).abs().amax(-1), 0.5 * absmax)
    (y ** 2).sum().backward()
    assert lac.gamma.grad is not None and (lac.gamma.grad != 0).all()
    # rounding is straight-through; elements whose code is clamped (|x/s| > 7.5) get no gradient
    u = x.detach() / (0.5 * absmax / 7).repeat_interleave(8, dim=1)
    clipped = u.abs() > 7.5
    assert clipped.sum() > 0 and torch.all(x.grad[clipped] == 0)
    torch.testing.assert_close(x.grad[~clipped], 2 * y.detach()[~clipped])


@pytest.mark.parametrize("clip, fmt", [("paper", "int"), ("symmetric", "int"), ("paper", "fp4")])
def test_gamma_gradient_matches_autograd_reference(clip, fmt):
    # PrefixQuant-style LAC written with plain autograd: round straight-through, then clamp
    x = torch.randn(5, 3, 32, generator=torch.Generator().manual_seed(5)) * 2
    qmin, qmax, m = {("paper", "int"): (-8, 7, 8), ("symmetric", "int"): (-7, 7, 7),
                     ("paper", "fp4"): (-6, 6, 6)}[clip, fmt]
    # E2M1 rounding continues with step 2 past 6 (γ ≥ 0.8 keeps |u| ≤ 7.5), so codes above 7 clamp
    grid = torch.cat([E2M1, torch.tensor([8.0])])
    rnd = (lambda u: grid[(u.abs()[..., None] - grid).abs().argmin(-1)] * u.sign()
           ) if fmt == "fp4" else torch.round
    grad_out = torch.randn(5, 3, 32)
    results = []
    for use_ref in (True, False):
        xr = x.clone().requires_grad_()
        gamma = torch.tensor([0.8, 0.9, 1.0, 0.85], requires_grad=True)
        if use_ref:
            s = xr.detach().reshape(5, 3, 4, 8).abs().amax(-1, keepdim=True) * gamma[:, None] / m
            u = xr.reshape(5, 3, 4, 8) / s
            y = ((u + (rnd(u.detach()) - u).detach()).clamp(qmin, qmax) * s).reshape(5, 3, 32)
        else:
            y = fake_quant(xr, 4, 8, clip=clip, fmt=fmt, gamma=gamma)
        y.backward(grad_out)
        results.append((y.detach(), xr.grad, gamma.grad))
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_scalar_gamma():
    x = torch.randn(4, 16)
    gamma = torch.tensor(0.9, requires_grad=True)
    y = fake_quant(x, 4, 8, gamma=gamma)
    torch.testing.assert_close(y, fake_quant(x, 4, 8, gamma=torch.full((2,), 0.9)))
    y.sum().backward()
    assert gamma.grad.shape == ()


def test_gamma_one_matches_absmax():
    x = torch.randn(6, 32)
    torch.testing.assert_close(fake_quant(x, 4, 8, gamma=torch.ones(4)), fake_quant(x, 4, 8))


def test_bf16_input_keeps_dtype():
    x = torch.randn(4, 32)
    y = fake_quant(x.bfloat16(), 4, 8)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fake_quant(x.bfloat16().float(), 4, 8), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kwargs", [
    {"bits": 4, "group_size": 7}, {"bits": 4, "group_size": 0}, {"bits": 4, "group_size": -8},
    {"bits": 4, "group_size": "token"}, {"bits": 4, "group_size": 64}, {"bits": 1, "group_size": 8},
    {"bits": 16, "group_size": 8}, {"bits": 8, "group_size": 8, "fmt": "fp4"},
    {"bits": 4, "group_size": 8, "clip": "asym"}, {"bits": 4, "group_size": 8, "fmt": "nf4"},
])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        fake_quant(torch.randn(2, 32), **kwargs)


def test_uses_lac_rule():
    assert [uses_lac(g) for g in (32, 64, 128, 256, 512, "channel")] == [False] * 3 + [True] * 3


def test_quant_options_validated():
    with pytest.raises(ValueError):
        QuantOptions(group_size="tensor")
    with pytest.raises(ValueError):
        QuantOptions(group_size=32, clip="sym")
    with pytest.raises(ValueError):
        QuantOptions(group_size=32, fmt="fp8")


def test_qatlinear_unquantized_is_plain_linear():
    layer = QATLinear(32, 16, lq(16, 16), None, layer_type="fc2", layer_index=3)
    x = torch.randn(2, 5, 32)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    assert layer.bias is None and layer.lac is None
    assert (layer.layer_type, layer.layer_index) == ("fc2", 3)


def test_qatlinear_quantizes_input_and_weight():
    opts = QuantOptions(group_size=8, clip="symmetric")
    layer = QATLinear(32, 16, lq(4, 4), opts)
    x = torch.randn(2, 5, 32)
    expected = F.linear(fake_quant(x, 4, 8, clip="symmetric"), fake_quant(layer.weight, 4, 8, clip="symmetric"))
    torch.testing.assert_close(layer(x), expected)
    w_only = QATLinear(32, 16, lq(4, 16), opts)
    w_only.weight = layer.weight
    torch.testing.assert_close(w_only(x), F.linear(x, fake_quant(layer.weight, 4, 8, clip="symmetric")))


@pytest.mark.parametrize("group_size, lac, expect_groups", [
    (8, None, None), (256, None, 2), ("channel", None, 1), (8, True, 64), ("channel", False, None),
])
def test_qatlinear_lac_placement(group_size, lac, expect_groups):
    layer = QATLinear(512, 16, lq(4, 4), QuantOptions(group_size=group_size, lac=lac, lac_init=0.9))
    if expect_groups is None:
        assert layer.lac is None
    else:
        assert layer.lac.gamma.shape == (expect_groups,)
        assert torch.all(layer.lac.gamma == 0.9)
        layer(torch.randn(3, 512)).sum().backward()
        assert layer.lac.gamma.grad is not None


def test_qatlinear_no_lac_for_weight_only():
    assert QATLinear(512, 16, lq(4, 16), QuantOptions(group_size="channel")).lac is None


def test_qatlinear_rejects_bad_setup():
    with pytest.raises(ValueError):
        QATLinear(48, 16, lq(4, 4), QuantOptions(group_size=32))
    with pytest.raises(ValueError):
        QATLinear(32, 16, lq(4, 4), None)
    with pytest.raises(ValueError):
        QATLinear(32, 16, lq(4, 8), QuantOptions(group_size=8, fmt="fp4"))
