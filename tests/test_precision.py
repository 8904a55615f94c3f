import pickle

import pytest

from qatlaw.precision import (
    LAYER_TYPES,
    LayerQuant,
    Precision,
    TensorQuant,
    canonical,
    parse,
)


def bits(p: Precision) -> dict[str, tuple[int, int]]:
    return {t: (lq.weight.bits, lq.act.bits) for t, lq in p.layers.items()}


def test_bf16_is_baseline():
    p = parse("BF16")
    assert p.is_baseline
    assert set(p.layers) == set(LAYER_TYPES)
    assert all(not lq.weight.enabled and not lq.act.enabled for lq in p.layers.values())


@pytest.mark.parametrize("name, w, a", [("W4A4", 4, 4), ("W4A16", 4, 16), ("W16A4", 16, 4),
                                        ("W8A8", 8, 8), ("W2A3", 2, 3)])
def test_uniform(name, w, a):
    p = parse(name)
    assert bits(p) == {t: (w, a) for t in LAYER_TYPES}
    assert p.name == name
    assert not p.is_baseline


@pytest.mark.parametrize("name, expected", [("BF16", False), ("W4A4", False), ("W4A16", False), ("W16A16", False),
                                             ("W4A4-fc2a4", False), ("W4A4-fc2a8", True), ("W4A4-fc2a8-qkva8", True),
                                             ("W16A4-fc2a8", True)])
def test_has_overrides(name, expected):
    """Per-layer overrides of the canonical name: one spelled to equal its base has none."""
    assert parse(name).has_overrides is expected


def test_tensor_enabled():
    assert TensorQuant(4).enabled and TensorQuant(8).enabled
    assert not TensorQuant(16).enabled


def test_fc2_act_override():
    p = parse("W4A4-fc2a8")
    assert bits(p) == {"qkv": (4, 4), "o": (4, 4), "fc1": (4, 4), "fc2": (4, 8)}


def test_several_overrides():
    p = parse("W4A4-fc2a8-qkva8-fc2w8-oa8-fc1a8")
    assert bits(p) == {"qkv": (4, 8), "o": (4, 8), "fc1": (4, 8), "fc2": (8, 8)}


def test_override_on_unquantized_base():
    assert bits(parse("W16A4-fc2w8"))["fc2"] == (8, 4)
    assert bits(parse("W4A16-qkva4"))["qkv"] == (4, 4)


@pytest.mark.parametrize("name, expected", [
    ("W4A4", "W4A4"),
    ("W16A16", "BF16"),
    ("W4A4-fc2a8-qkva8", "W4A4-qkva8-fc2a8"),
    ("W4A4-fc2a4", "W4A4"),
    ("W4A4-qkva8-oa8-fc1a8-fc2a8", "W4A8"),
    ("W4A8-qkva4-oa4", "W4A4-fc1a8-fc2a8"),  # 2-2 tie: base takes fewer bits
    ("W4A16-qkva16-oa16-fc1a16-fc2a16-qkvw16-ow16-fc1w16-fc2w16", "BF16"),
])
def test_canonical(name, expected):
    assert canonical(name) == expected
    assert parse(name).name == expected
    assert canonical(expected) == expected


def test_same_settings_equal_and_hash():
    a, b = parse("W4A4-fc2a8-qkva8"), parse("W4A4-qkva8-fc2a8")
    assert a == b and hash(a) == hash(b)
    assert len({a, b, parse("W4A4")}) == 2


def test_frozen_and_picklable():
    p = parse("W4A4-fc2a8")
    with pytest.raises(TypeError):
        p.layers["fc2"] = LayerQuant(TensorQuant(4), TensorQuant(4))
    with pytest.raises(AttributeError):
        p.name = "x"
    assert pickle.loads(pickle.dumps(p)) == p


@pytest.mark.parametrize("name, fragment", [
    ("W4", "expected"),
    ("bf16", "expected"),
    ("w4a4", "expected"),
    ("FP4", "expected"),
    ("", "expected"),
    ("BF16-fc2a8", "BF16 takes no"),
    ("W4A4-fc2a8-fc2a4", "duplicate"),
    ("W4A4-fc3a8", "bad override"),
    ("W4A4-fc2x8", "bad override"),
    ("W4A4-fc2a", "bad override"),
    ("W4A4-", "bad override"),
    ("W4A04", "expected"),
    ("W1A4", "not in 2..8 or 16"),
    ("W4A9", "not in 2..8 or 16"),
    ("W4A32", "not in 2..8 or 16"),
    ("W4A4-fc2a12", "not in 2..8 or 16"),
])
def test_rejects(name, fragment):
    with pytest.raises(ValueError) as err:
        parse(name)
    msg = str(err.value)
    assert "\n" not in msg
    assert repr(name) in msg and fragment in msg


def test_tensor_bits_validated():
    with pytest.raises(ValueError):
        TensorQuant(12)
