"""Group-wise symmetric fake quantization for quantization-aware training.

One quantizer, :func:`fake_quant`, is used by every quantized linear layer and
by the analyses. It follows the paper (§4.1, App. E): AbsMax scale shared by
a group of ``G`` consecutive elements along the last (input) dimension,
round-to-nearest, no zero point, dequantized straight away ("fake" quant).
Only the forward pass is quantized; gradients use a straight-through
estimator (STE).

Weights ``(out, in)`` are grouped within each output row and activations
``(..., in)`` within each token; ``group_size="channel"`` means one group per
row, i.e. per-channel weights and per-token activations.

Activations with coarse groups (``G >= 256`` or per-token) use LAC, a
learnable clipping factor γ per group index shared across tokens
(PrefixQuant); weights always use plain AbsMax.

Besides integers, 4-bit tensors may take E2M1 (FP4) elements: ``"fp4"`` with
a per-group fp32 AbsMax scale, and the block-scaled formats of today's GPUs,
bit for bit as torchao's reference quantization (``torchao.prototype.mx_formats``:
``to_mx`` and ``nvfp4_quantize`` with a per-tensor scale), the group being the
block:

- ``"mxfp4"`` (OCP Microscaling): one power-of-two E8M0 scale per block,
  2^(floor(log2 absmax) - 2), elements saturated to ±6;
- ``"nvfp4"``: one FP8 E4M3 scale per block, absmax/6 relative to one fp32
  scale per tensor, absmax_tensor / (448·6).

A blockwise Hadamard rotation (:func:`rotate`) of both operands along the
reduction dimension leaves the product unchanged and spreads outliers across
a block before quantization (QuaRot, Quartet).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qatlaw.precision import LayerQuant, uses_lac

GroupSize = int | Literal["channel"]
Clip = Literal["paper", "symmetric"]
Fmt = Literal["int", "fp4", "mxfp4", "nvfp4"]

CLIP_MODES = ("paper", "symmetric")
FORMATS = ("int", "fp4", "mxfp4", "nvfp4")
BLOCK_SCALED = ("mxfp4", "nvfp4")
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6  # the smallest block scale of NVFP4 (torchao clamps to it)


@dataclass(frozen=True)
class QuantOptions:
    """Quantizer settings shared by all quantized layers of a model.

    group_size: elements per group (block) along the input dim, or ``"channel"``.
    clip: ``"paper"``: scale absmax/2^(b-1), integer range
        [-2^(b-1), 2^(b-1)-1] (the paper's Eq. 6-7, INT4: M=8, [-8, 7]);
        ``"symmetric"``: scale absmax/(2^(b-1)-1), range
        [-(2^(b-1)-1), 2^(b-1)-1] (the authors' INT_vs_FP code, INT4: [-7, 7]).
    fmt: ``"int"``; ``"fp4"`` (E2M1, 4-bit tensors only; ``clip`` is moot);
        ``"mxfp4"`` or ``"nvfp4"`` (the 4-bit tensors in that format, tensors of
        other widths integer; ``clip`` is moot for the 4-bit ones).
    lac: learnable activation clipping on/off; None follows the paper's rule
        :func:`uses_lac`. Never for the block-scaled formats' 4-bit tensors.
    lac_init: initial γ of LAC.
    rotation: size of the blockwise Hadamard rotation of both operands
        (a power of two), or None.
    """

    group_size: GroupSize
    clip: Clip = "paper"
    fmt: Fmt = "int"
    lac: bool | None = None
    lac_init: float = 0.95
    rotation: int | None = None

    def __post_init__(self) -> None:
        _check_group_size(self.group_size)
        if self.clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {CLIP_MODES}, got {self.clip!r}")
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.rotation is not None and (self.rotation < 2 or self.rotation & (self.rotation - 1)):
            raise ValueError(f"rotation must be a power of two of at least 2, got {self.rotation}")
        if self.fmt in BLOCK_SCALED and self.lac:
            raise ValueError(f"LAC does not apply to {self.fmt}: its block scales are fixed by the format")

    def tensor_format(self, bits: int) -> Fmt:
        """The format of this model's tensors of ``bits`` bits (:func:`tensor_format`)."""
        return tensor_format(self.fmt, bits)


def tensor_format(fmt: Fmt, bits: int) -> Fmt:
    """The format of a tensor of ``bits`` bits in a model of format ``fmt``: a block-scaled format takes the 4-bit
    tensors only, the others are integer in the same groups."""
    return fmt if bits == 4 or fmt not in BLOCK_SCALED else "int"


def fake_quant(
    x: torch.Tensor,
    bits: int,
    group_size: GroupSize,
    *,
    clip: Clip = "paper",
    fmt: Fmt = "int",
    gamma: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` group-wise along its last dimension.

    Returns a tensor of ``x``'s shape and dtype whose every group of
    ``group_size`` elements lies on a symmetric grid times the group's scale
    ``absmax·γ / M`` (``M`` = 2^(b-1), 2^(b-1)-1 or 6, see
    :class:`QuantOptions`). All-zero groups give zeros.

    gamma: optional clipping factor (LAC), broadcastable to the per-group
        absmax of shape ``x.shape[:-1] + (n_groups,)``; a ``[n_groups]``
        tensor shares γ across rows. It receives the LSQ/PrefixQuant gradient
        through the scale.

    Gradient w.r.t. ``x``: without ``gamma``, identity (pure STE; the scale is
    a forward-only statistic). With ``gamma``, identity except zero where
    the rounded code is clamped (STE through the rounding only, as in
    PrefixQuant).

    Idempotence: ``"paper"`` keeps a group's absmax exactly only when some
    element lands on the lowest code -2^(b-1) (its scale is a power-of-two
    fraction of the absmax); then re-quantizing returns the same tensor
    bit-for-bit. Otherwise the positive maximum was clamped to
    (2^(b-1)-1)/2^(b-1) of the absmax, a second pass uses a smaller scale and
    changes the values: "paper" is not idempotent in general. ``"symmetric"``
    and ``"fp4"`` keep the absmax, so re-quantizing returns the same codes
    and values equal up to one rounding of the recomputed scale (~1 ulp).

    ``"mxfp4"`` and ``"nvfp4"`` (``bits`` 4, no ``gamma``) return torchao's
    dequantized values bit for bit (module docstring); an all-zero tensor
    gives zeros under ``"nvfp4"`` (torchao: NaN, from a per-tensor scale of 0).
    Their gradient is the identity.
    """
    _check_group_size(group_size)
    shape, n = x.shape, x.shape[-1]
    g = n if group_size == "channel" else group_size
    if n % g:
        raise ValueError(f"group size {g} does not divide the last dim {n}")
    xg = x.reshape(*shape[:-1], n // g, g).float()  # grid arithmetic in fp32
    if fmt in BLOCK_SCALED:
        if bits != 4:
            raise ValueError(f"fmt={fmt!r} is a 4-bit format, got bits={bits}")
        if gamma is not None:
            raise ValueError(f"fmt={fmt!r} takes no clipping factor (LAC)")
        q = _BlockScaled.apply(xg, fmt)
    else:
        q = _FakeQuant.apply(xg, gamma, *_grid(bits, clip, fmt))
    return q.reshape(shape).to(x.dtype)


def _grid(bits: int, clip: Clip, fmt: Fmt) -> tuple[float, float, float, Callable]:
    """(scale divisor M, lowest code, highest code, rounding to the grid)."""
    if fmt == "fp4":
        if bits != 4:
            raise ValueError(f"fmt='fp4' is E2M1 and needs bits=4, got {bits}")
        return E2M1_MAX, -E2M1_MAX, E2M1_MAX, _round_e2m1
    if fmt != "int":
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"integer bits must be in 2..8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    if clip == "paper":
        return qmax + 1, -(qmax + 1), qmax, torch.round
    if clip == "symmetric":
        return qmax, -qmax, qmax, torch.round
    raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")


_TINY = torch.finfo(torch.float32).tiny


def _scale(absmax: torch.Tensor, gamma: torch.Tensor | None, divisor: float) -> torch.Tensor:
    """Per-group step size (``absmax`` is overwritten); kept above zero so all-zero groups give zeros."""
    scale = absmax.div_(divisor) if gamma is None else absmax.mul_(gamma.unsqueeze(-1)).div_(divisor)
    return scale.clamp_min_(_TINY)


def _round_(u: torch.Tensor, to_grid: Callable) -> torch.Tensor:
    """``to_grid(u)``, in place."""
    return u.round_() if to_grid is torch.round else _round_e2m1_(u)


class _FakeQuant(torch.autograd.Function):
    """Fake quantization of ``xg`` of shape (..., n_groups, G), one scale per
    group, with the gradients documented in :func:`fake_quant`.

    Speed (every op here is a full pass over the tensor, and on CPU these
    passes cost as much as the layer's matmul at the small sizes): without γ
    the forward allocates one buffer (``|x|``, then ``x/scale`` in place,
    rounded, clamped and scaled in place) and the backward is the identity,
    no tensors saved. With γ the forward also derives what the backward
    needs, so the backward is one product and one reduction instead of
    recomputing the quantization: the mask of unclamped elements (the
    gradient w.r.t. ``x``) and ``e`` = ∂output/∂γ per element (the gradient
    w.r.t. γ is the sum of ``grad · e`` over the elements that share a γ).
    """

    @staticmethod
    def forward(ctx, xg, gamma, divisor, qmin, qmax, to_grid):
        buf = torch.abs(xg)
        absmax = buf.amax(dim=-1, keepdim=True)
        if gamma is None:
            scale = _scale(absmax, None, divisor)
            u = torch.div(xg, scale, out=buf)
            return _round_(u, to_grid).clamp_(qmin, qmax).mul_(scale)
        unit = absmax / divisor  # ∂scale/∂γ (before the clamp at tiny, as before)
        scale = _scale(absmax, gamma, divisor)
        u = torch.div(xg, scale, out=buf)
        rounded = to_grid(u)
        code = rounded.clamp(qmin, qmax)
        # 1.0 where the code is not clamped (a float mask: bool masks take CPU kernels several times slower)
        inside = torch.eq(code, rounded, out=rounded)
        # output = scale·code, so ∂output/∂scale is code - u where rounding is straight-through, the clamped code
        # elsewhere (LSQ / PrefixQuant); times ∂scale/∂γ = absmax/divisor
        e = torch.addcmul(code, u, inside, value=-1.0, out=u).mul_(unit)
        ctx.save_for_backward(e, inside, gamma)
        return code.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors  # read once: activation checkpointing lets saved tensors be unpacked only once
        if not saved:  # no γ: straight-through
            return grad, None, None, None, None, None
        e, inside, gamma = saved
        if gamma.numel() == 1:  # one γ (e.g. per-token activations): a single dot product
            grad_gamma = torch.dot(grad.reshape(-1), e.reshape(-1)).reshape(gamma.shape)
        else:
            grad_gamma = (grad * e).sum(-1).sum_to_size(gamma.shape)
        return grad * inside, grad_gamma.to(gamma.dtype), None, None, None, None


_E2M1_MAGIC = 1.5 * 2.0**22  # u + 2^e·this rounds u to a multiple of 2^(e-1): E2M1's step at exponent e


def _round_e2m1(u: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6), ties to even (as IEEE casts and
    torchao's do), signed zeros kept; magnitudes past 6 continue in steps of 2, for the caller to clamp."""
    return _round_e2m1_(u.clone())


def _round_e2m1_(u: torch.Tensor) -> torch.Tensor:
    """:func:`_round_e2m1` in place. The step is 2^(e-1) for u in [2^e, 2^(e+1)), e >= 0, and 0.5 below 1: adding
    and subtracting 1.5·2^(e+22) rounds to it in fp32's own round-to-nearest-even (exact: no fast-math)."""
    magic = u.view(torch.int32).bitwise_and(0x7F800000).view(torch.float32)  # 2^e (0 for subnormals)
    magic = magic.clamp_min_(1.0).mul_(_E2M1_MAGIC)
    sign = u.view(torch.int32).bitwise_and(-0x80000000)  # the sign bit, for the rounded zeros
    return u.add_(magic).sub_(magic).view(torch.int32).bitwise_or_(sign).view(torch.float32)


class _BlockScaled(torch.autograd.Function):
    """MXFP4 or NVFP4 fake quantization of ``xg`` of shape (..., n_blocks, block), straight-through gradient.

    The arithmetic is torchao's reference (``to_mx`` FLOOR mode; ``nvfp4_quantize`` with a per-tensor scale), op
    for op where the rounding of fp32 matters: MX divides by its power-of-two scale (at least the smallest normal,
    as torchao's does) and multiplies back by 2^e itself; NVFP4 multiplies by (1/s_tensor)/s_block and back by
    s_tensor·s_block.
    """

    @staticmethod
    def forward(ctx, xg, fmt):
        buf = torch.abs(xg)
        absmax = buf.amax(dim=-1, keepdim=True)
        if fmt == "mxfp4":
            biased = absmax.view(torch.int32).bitwise_right_shift(23).bitwise_and_(0xFF)  # absmax's biased exponent
            e = biased.sub_(127 + 2).clamp_min_(-127)  # floor(log2 absmax) - log2(6's power of two), E8M0's range
            divide = e.clamp_min(-126).add_(127).bitwise_left_shift_(23).view(torch.float32)  # 2^max(e, -126)
            multiply = torch.where(e < -126, divide * 0.5, divide)  # 2^e: 2^-127 is a float32 subnormal
            u = torch.div(xg, divide, out=buf)
        else:
            tensor_scale = absmax.amax() / (E4M3_MAX * E2M1_MAX)
            tensor_scale = torch.where(tensor_scale > 0, tensor_scale, 1.0)  # an all-zero tensor: zeros
            block = (absmax / E2M1_MAX / tensor_scale).clamp_(E4M3_MIN_NORMAL, E4M3_MAX)
            block = block.to(torch.float8_e4m3fn).to(torch.float32)
            multiply = tensor_scale * block
            u = torch.mul(xg, (1.0 / tensor_scale) / block, out=buf)
        return _round_e2m1_(u.clamp_(-E2M1_MAX, E2M1_MAX)).mul_(multiply)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def hadamard(size: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of a power-of-two ``size`` (fp32, symmetric, its own inverse)."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)


def rotate(x: torch.Tensor, size: int | torch.Tensor) -> torch.Tensor:
    """``x`` times a block-diagonal Hadamard of blocks of ``size`` (or of the given :func:`hadamard` matrix) along
    its last dimension: orthonormal, so ``rotate(x) @ rotate(w).T == x @ w.T`` up to rounding."""
    h = hadamard(size) if isinstance(size, int) else size
    n, k = x.shape[-1], h.shape[0]
    if n % k:
        raise ValueError(f"rotation size {k} does not divide the last dim {n}")
    return (x.reshape(*x.shape[:-1], n // k, k) @ h.to(dtype=x.dtype)).reshape(x.shape)


def _check_group_size(group_size: GroupSize) -> None:
    if group_size == "channel":
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or 'channel', got {group_size!r}")


class LAC(nn.Module):
    """Learnable activation clipping: one γ per group index, shared by all tokens."""

    def __init__(self, n_groups: int, init: float = 0.95):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((n_groups,), float(init)))

    def extra_repr(self) -> str:
        return f"n_groups={self.gamma.numel()}"


class QATLinear(nn.Linear):
    """Bias-free linear layer whose input and weight are fake-quantized.

    ``quant`` gives the bit widths (16 = tensor untouched); ``opts`` the
    quantizer, and may be None only when nothing is quantized. The input uses
    LAC when ``opts.lac`` says so (None: :func:`uses_lac`). ``layer_type``
    (``qkv``/``o``/``fc1``/``fc2``) and ``layer_index`` (block number) let
    hooks and analyses address the layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        quant: LayerQuant,
        opts: QuantOptions | None,
        *,
        layer_type: str | None = None,
        layer_index: int | None = None,
    ):
        super().__init__(in_features, out_features, bias=False)
        self.quant = quant
        self.opts = opts
        self.layer_type = layer_type
        self.layer_index = layer_index
        self.lac = None
        enabled = [t for t in (quant.weight, quant.act) if t.enabled]
        if not enabled:
            return
        if opts is None:
            raise ValueError("QATLinear with quantized tensors needs QuantOptions")
        g = in_features if opts.group_size == "channel" else opts.group_size
        if in_features % g:
            raise ValueError(f"group size {g} does not divide in_features {in_features}")
        if opts.fmt == "fp4" and any(t.bits != 4 for t in enabled):
            raise ValueError(f"fmt='fp4' needs 4-bit tensors, got {quant}")
        if opts.rotation is not None:
            if in_features % opts.rotation:
                raise ValueError(f"rotation size {opts.rotation} does not divide in_features {in_features}")
            self.register_buffer("hadamard", hadamard(opts.rotation), persistent=False)  # not in checkpoints
        use_lac = uses_lac(opts.group_size) if opts.lac is None else opts.lac
        if quant.act.enabled and use_lac and opts.tensor_format(quant.act.bits) not in BLOCK_SCALED:
            self.lac = LAC(in_features // g, opts.lac_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant, opts, w = self.quant, self.opts, self.weight
        if opts is not None and opts.rotation is not None:
            x, w = rotate(x, self.hadamard), rotate(w, self.hadamard)
        if quant.act.enabled:
            gamma = None if self.lac is None else self.lac.gamma
            x = fake_quant(x, quant.act.bits, opts.group_size, clip=opts.clip,
                           fmt=opts.tensor_format(quant.act.bits), gamma=gamma)
        if quant.weight.enabled:
            w = fake_quant(w, quant.weight.bits, opts.group_size, clip=opts.clip,
                           fmt=opts.tensor_format(quant.weight.bits))
        return F.linear(x, w)

    def extra_repr(self) -> str:
        q = f"w{self.quant.weight.bits}a{self.quant.act.bits}"
        opts = "" if self.opts is None else (
            f", G={self.opts.group_size}, clip={self.opts.clip}, fmt={self.opts.fmt}"
            + ("" if self.opts.rotation is None else f", rotation={self.opts.rotation}"))
        return f"{super().extra_repr()}, {q}{opts}, type={self.layer_type}, index={self.layer_index}"
