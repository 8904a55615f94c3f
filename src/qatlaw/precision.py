"""Precision strings and the per-layer quantization settings they stand for.

This module is the one place that interprets a precision name. Grammar::

    BF16                        nothing quantized (the unquantized baseline)
    W{w}A{a}                    weights of all four linear layers at w bits,
                                their input activations at a bits
    W{w}A{a}-{layer}{w|a}{b}    ... with per-layer overrides, several allowed
    W{w}A{a}-{format}           the 4-bit tensors in a block-scaled format:
                                ``mxfp4`` (OCP MX: E2M1, a power-of-two E8M0
                                scale per block) or ``nvfp4`` (E2M1, an FP8
                                E4M3 scale per block and one fp32 scale per
                                tensor); the block is the run's group size G
                                (the standards: 32 and 16)
    W{w}A{a}-had{k}             both operands of every quantized layer
                                rotated by a blockwise Hadamard of size k
                                along the reduction dimension (QuaRot,
                                Quartet) before they are quantized

Bits are 2..8, or 16 for "that tensor is not quantized". The layer types are
the paper's four linear layers of a block: ``qkv``, ``o``, ``fc1`` (gate+up)
and ``fc2`` (down_proj). Examples: ``W4A4``, ``W4A16`` (weights only),
``W16A4`` (activations only), ``W4A4-fc2a8`` (FC2 input at 8 bit, the paper's
mixed-precision ablation), ``W4A4-fc2a8-qkva8``, ``W4A4-fc2w8``,
``W4A4-mxfp4``, ``W4A4-mxfp4-had32``, ``W4A4-nvfp4-fc2a8``. A format applies
to the 4-bit tensors only (a precision naming one needs some): a tensor at
another width (``fc2a8``) stays integer AbsMax in the same blocks. Without a
format token the run's ``quant.format`` applies.

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
SCALED_FORMATS = ("mxfp4", "nvfp4")  # block-scaled 4-bit formats a precision string may name
FORMAT_BITS = 4
# Bits of one stored block scale: a 16-bit scale per group for integers (and the fp32-scaled "fp4"), E8M0 (MXFP4)
# and E4M3 (NVFP4) for the formats; NVFP4's one fp32 scale per tensor is 4 bytes a matrix, left out of memory counts.
SCALE_BITS = {"mxfp4": 8, "nvfp4": 8}
INT_SCALE_BITS = 16

_BASE_RE = re.compile(r"W([1-9][0-9]*)A([1-9][0-9]*)")
_OVERRIDE_RE = re.compile(rf"({'|'.join(LAYER_TYPES)})([wa])([1-9][0-9]*)")
_ROTATION_RE = re.compile(r"had([1-9][0-9]*)")


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
    """A named precision: one :class:`LayerQuant` per entry of ``LAYER_TYPES``, the element format of its 4-bit
    tensors (one of ``SCALED_FORMATS``; None: the run's ``quant.format``) and its Hadamard rotation size (None: no
    rotation).

    ``layers`` is stored read-only, so a Precision is immutable and hashable.
    """

    name: str
    layers: Mapping[str, LayerQuant]
    format: str | None = None
    rotation: int | None = None

    def __post_init__(self) -> None:
        if set(self.layers) != set(LAYER_TYPES):
            raise ValueError(f"precision {self.name!r}: layers must be exactly {LAYER_TYPES}")
        frozen = MappingProxyType({t: self.layers[t] for t in LAYER_TYPES})
        object.__setattr__(self, "layers", frozen)

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.layers.items()), self.format, self.rotation))

    def __reduce__(self):
        return (Precision, (self.name, dict(self.layers), self.format, self.rotation))

    def __str__(self) -> str:
        return self.name

    @property
    def is_baseline(self) -> bool:
        """True when no tensor of any layer is quantized."""
        return not any(lq.weight.enabled or lq.act.enabled for lq in self.layers.values())

    def scale_bits(self, bits: int) -> int:
        """Bits of the stored scale of a block of ``bits``-bit weights: the format's for its 4-bit tensors."""
        return SCALE_BITS.get(self.format, INT_SCALE_BITS) if bits == FORMAT_BITS else INT_SCALE_BITS

    @property
    def has_overrides(self) -> bool:
        """True when some layer's tensor differs from the base ``W<bits>A<bits>`` (e.g. ``W4A4-fc2a8``)."""
        return any(_OVERRIDE_RE.fullmatch(part) for part in self.name.split("-")[1:])


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
    base, *tokens = name.split("-")
    m = _BASE_RE.fullmatch(base)
    if m is None:
        raise fail(f"expected {BASELINE} or W<bits>A<bits>[-<format>][-had<k>][-<layer><w|a><bits>...], "
                   f"formats {'/'.join(SCALED_FORMATS)}, layers {'/'.join(LAYER_TYPES)}")
    bits = {(t, kind): int(m[i]) for t in LAYER_TYPES for i, kind in ((1, "w"), (2, "a"))}
    seen, fmt, rotation = set(), None, None
    for token in tokens:
        if token in SCALED_FORMATS:
            if fmt is not None:
                raise fail(f"two formats, {fmt} and {token}")
            fmt = token
            continue
        r = _ROTATION_RE.fullmatch(token)
        if r is not None:
            if rotation is not None:
                raise fail(f"two rotations, had{rotation} and {token}")
            rotation = int(r[1])
            if rotation < 2 or rotation & (rotation - 1):
                raise fail(f"Hadamard rotation size {rotation} is not a power of two of at least 2")
            continue
        o = _OVERRIDE_RE.fullmatch(token)
        if o is None:
            raise fail(f"bad override {token!r}, expected <layer><w|a><bits> with layer in {'/'.join(LAYER_TYPES)}, "
                       f"a format ({'/'.join(SCALED_FORMATS)}) or had<k>")
        key = (o[1], o[2])
        if key in seen:
            raise fail(f"duplicate override for {o[1]}{o[2]}")
        seen.add(key)
        bits[key] = int(o[3])
    bad = sorted({b for b in bits.values() if b not in VALID_BITS})
    if bad:
        raise fail(f"bits {bad} not in 2..8 or 16")
    if fmt is not None and FORMAT_BITS not in bits.values():
        raise fail(f"{fmt} is a {FORMAT_BITS}-bit format and no tensor here has {FORMAT_BITS} bits")
    layers = {t: LayerQuant(TensorQuant(bits[t, "w"]), TensorQuant(bits[t, "a"]))
              for t in LAYER_TYPES}
    name = _canonical_name(layers, fmt, rotation)
    if name == BASELINE and (fmt or rotation):
        raise fail("nothing is quantized, so a format or rotation has nothing to apply to")
    return Precision(name, layers, fmt, rotation)


def canonical(name: str) -> str:
    """Canonical spelling of a precision string.

    Nothing quantized gives ``BF16`` (so ``W16A16`` -> ``BF16``). Otherwise the
    base ``W{w}A{a}`` uses, per tensor kind, the bit width most layers share
    (ties go to fewer bits), followed by the overrides of the layers that
    differ, in ``LAYER_TYPES`` order and weight before activation; e.g.
    ``W4A4-fc2a8-qkva8`` -> ``W4A4-qkva8-fc2a8`` and ``W4A4-fc2a4`` -> ``W4A4``. A format and a rotation come
    right after the base, in that order: ``W4A4-fc2a8-had32-mxfp4`` -> ``W4A4-mxfp4-had32-fc2a8``.
    """
    return parse(name).name


def _canonical_name(layers: Mapping[str, LayerQuant], fmt: str | None = None, rotation: int | None = None) -> str:
    if all(not (lq.weight.enabled or lq.act.enabled) for lq in layers.values()):
        return BASELINE
    w_bits = {t: layers[t].weight.bits for t in LAYER_TYPES}
    a_bits = {t: layers[t].act.bits for t in LAYER_TYPES}
    base_w, base_a = _most_common(w_bits.values()), _most_common(a_bits.values())
    parts = [f"W{base_w}A{base_a}"] + ([fmt] if fmt else []) + ([f"had{rotation}"] if rotation else [])
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
