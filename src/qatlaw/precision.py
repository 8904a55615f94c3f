"""Precision strings and the per-layer quantization settings they stand for.

This module is the one place that interprets a precision name. Grammar::

    BF16                        nothing quantized (the unquantized baseline)
    W{w}A{a}                    weights of all four linear layers at w bits,
                                their input activations at a bits
    W{w}A{a}-{layer}{w|a}{b}    ... with per-layer overrides, several allowed

Bits are 2..8, or 16 for "that tensor is not quantized". The layer types are
the paper's four linear layers of a block: ``qkv``, ``o``, ``fc1`` (gate+up)
and ``fc2`` (down_proj). Examples: ``W4A4``, ``W4A16`` (weights only),
``W16A4`` (activations only), ``W4A4-fc2a8`` (FC2 input at 8 bit, the paper's
mixed-precision ablation), ``W4A4-fc2a8-qkva8``, ``W4A4-fc2w8``.

Every string has a canonical form (see :func:`canonical`), which is the name
a parsed :class:`Precision` carries: two strings that mean the same per-layer
settings have the same canonical name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

LAYER_TYPES = ("qkv", "o", "fc1", "fc2")
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
BASELINE = "BF16"
LAC_MIN_GROUP = 256

_BASE_RE = re.compile(r"W([1-9][0-9]*)A([1-9][0-9]*)")
_OVERRIDE_RE = re.compile(rf"({'|'.join(LAYER_TYPES)})([wa])([1-9][0-9]*)")


@dataclass(frozen=True)
class TensorQuant:
    """Bit width of one tensor; 16 means the tensor is left unquantized."""

    bits: int

    def __post_init__(self) -> None:
        if self.bits not in VALID_BITS:
            raise ValueError(f"bits must be one of {VALID_BITS}, got {self.bits}")

    @property
    def enabled(self) -> bool:
        """Whether the tensor is fake-quantized."""
        return self.bits < 16


@dataclass(frozen=True)
class LayerQuant:
    """Quantization of one linear layer: its weight and its input activation."""

    weight: TensorQuant
    act: TensorQuant


@dataclass(frozen=True)
class Precision:
    """A named precision: one :class:`LayerQuant` per entry of ``LAYER_TYPES``.

    ``layers`` is stored read-only, so a Precision is immutable and hashable.
    """

    name: str
    layers: Mapping[str, LayerQuant]

    def __post_init__(self) -> None:
        if set(self.layers) != set(LAYER_TYPES):
            raise ValueError(f"precision {self.name!r}: layers must be exactly {LAYER_TYPES}")
        frozen = MappingProxyType({t: self.layers[t] for t in LAYER_TYPES})
        object.__setattr__(self, "layers", frozen)

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.layers.items())))

    def __reduce__(self):
        return (Precision, (self.name, dict(self.layers)))

    def __str__(self) -> str:
        return self.name

    @property
    def is_baseline(self) -> bool:
        """True when no tensor of any layer is quantized."""
        return not any(lq.weight.enabled or lq.act.enabled for lq in self.layers.values())

    @property
    def has_overrides(self) -> bool:
        """True when some layer's tensor differs from the base ``W<bits>A<bits>`` (e.g. ``W4A4-fc2a8``)."""
        return "-" in self.name


def is_precision(name: str) -> bool:
    """Whether ``name`` is a precision string of this grammar (a run table from outside may use labels of its own,
    e.g. MXFP4-fwd)."""
    try:
        parse(name)
    except ValueError:
        return False
    return True


def parse(name: str) -> Precision:
    """Parse a precision string; the result carries the canonical name.

    Raises ValueError (one line naming the string) for anything outside the
    grammar in the module docstring.
    """
    if name == BASELINE:
        lq = LayerQuant(TensorQuant(16), TensorQuant(16))
        return Precision(BASELINE, {t: lq for t in LAYER_TYPES})

    def fail(what: str) -> ValueError:
        return ValueError(f"invalid precision {name!r}: {what}")

    if not isinstance(name, str):
        raise fail("not a string")
    if name.startswith(BASELINE + "-"):
        raise fail(f"{BASELINE} takes no per-layer overrides")
    base, *overrides = name.split("-")
    m = _BASE_RE.fullmatch(base)
    if m is None:
        raise fail(f"expected {BASELINE} or W<bits>A<bits>[-<layer><w|a><bits>...], "
                   f"layers {'/'.join(LAYER_TYPES)}")
    bits = {(t, kind): int(m[i]) for t in LAYER_TYPES for i, kind in ((1, "w"), (2, "a"))}
    seen = set()
    for ov in overrides:
        o = _OVERRIDE_RE.fullmatch(ov)
        if o is None:
            raise fail(f"bad override {ov!r}, expected <layer><w|a><bits> "
                       f"with layer in {'/'.join(LAYER_TYPES)}")
        key = (o[1], o[2])
        if key in seen:
            raise fail(f"duplicate override for {o[1]}{o[2]}")
        seen.add(key)
        bits[key] = int(o[3])
    bad = sorted({b for b in bits.values() if b not in VALID_BITS})
    if bad:
        raise fail(f"bits {bad} not in 2..8 or 16")
    layers = {t: LayerQuant(TensorQuant(bits[t, "w"]), TensorQuant(bits[t, "a"]))
              for t in LAYER_TYPES}
    return Precision(_canonical_name(layers), layers)


def canonical(name: str) -> str:
    """Canonical spelling of a precision string.

    Nothing quantized gives ``BF16`` (so ``W16A16`` -> ``BF16``). Otherwise the
    base ``W{w}A{a}`` uses, per tensor kind, the bit width most layers share
    (ties go to fewer bits), followed by the overrides of the layers that
    differ, in ``LAYER_TYPES`` order and weight before activation; e.g.
    ``W4A4-fc2a8-qkva8`` -> ``W4A4-qkva8-fc2a8`` and ``W4A4-fc2a4`` -> ``W4A4``.
    """
    return parse(name).name


def _canonical_name(layers: Mapping[str, LayerQuant]) -> str:
    if all(not (lq.weight.enabled or lq.act.enabled) for lq in layers.values()):
        return BASELINE
    w_bits = {t: layers[t].weight.bits for t in LAYER_TYPES}
    a_bits = {t: layers[t].act.bits for t in LAYER_TYPES}
    base_w, base_a = _most_common(w_bits.values()), _most_common(a_bits.values())
    parts = [f"W{base_w}A{base_a}"]
    for t in LAYER_TYPES:
        if w_bits[t] != base_w:
            parts.append(f"{t}w{w_bits[t]}")
        if a_bits[t] != base_a:
            parts.append(f"{t}a{a_bits[t]}")
    return "-".join(parts)


def _most_common(values) -> int:
    values = list(values)
    return max(sorted(set(values)), key=values.count)


def uses_lac(group_size: int | str) -> bool:
    """The paper's rule: LAC for activations when G >= 256 or per-token (``"channel"``)."""
    return group_size == "channel" or group_size >= LAC_MIN_GROUP
