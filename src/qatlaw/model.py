"""A Llama-3-style decoder whose block linear layers are fake-quantized.

Architecture (paper App. F): pre-norm blocks with RMSNorm, RoPE,
grouped-query attention and a SwiGLU MLP; no biases; untied token embedding
and LM head. Each block has the paper's four linear layers, named as in the
paper so analyses can address them::

    model.blocks[i].attn.qkv   fused Q/K/V projection
    model.blocks[i].attn.o     attention output projection
    model.blocks[i].mlp.fc1    fused gate+up projection
    model.blocks[i].mlp.fc2    down projection (its input is the SwiGLU output)

Only these four are :class:`~qatlaw.quant.QATLinear`; the embedding, LM head,
norms and the attention score/value products stay unquantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qatlaw.grid import non_embedding_count, padded_vocab
from qatlaw.precision import Precision, parse
from qatlaw.quant import LAC, QATLinear, QuantOptions

__all__ = ["Model", "ModelConfig", "QuantOptions", "lm_loss", "non_embedding_params"]

INIT_STD = 0.02


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder; the paper's sizes are in its Table 3."""

    vocab_size: int
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    seq_len: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden {self.hidden} not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameter count N used by the scaling law (:func:`qatlaw.grid.non_embedding_count` of the shape)."""
    return non_embedding_count(cfg.n_layers, cfg.hidden, cfg.ffn, cfg.n_heads, cfg.n_kv_heads)


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, head_dim // 2)."""
    inv_freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) by position, pairing dim i with i + head_dim/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def logits(hidden: torch.Tensor, head: nn.Linear, vocab_size: int | None = None) -> torch.Tensor:
    """``head(hidden)`` over the true vocabulary: the first ``vocab_size`` of the padded head's outputs (None: all)."""
    out = head(hidden)
    return out if vocab_size is None or vocab_size == out.shape[-1] else out[..., :vocab_size]


def _cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, reduction: str,
                   vocab_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the fp32 logits over the true vocabulary against ``targets``, flattened over tokens."""
    return F.cross_entropy(logits(hidden, head, vocab_size).float().flatten(0, -2), targets.flatten(),
                           reduction=reduction)


def lm_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk_tokens: int | None = None,
            vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the fp32 logits ``head(hidden)`` (hidden (..., h)) against ``targets`` (...), with the
    logits of at most ``chunk_tokens`` tokens alive at a time, in the forward and the backward pass (None: all),
    over the first ``vocab_size`` of the head's outputs (None: all; a padded head has more).

    Equal to the loss of all logits at once up to float rounding, gradients included; bit-identical when one chunk
    holds every token. Each chunk's logits are recomputed in the backward pass instead of kept.
    """
    if chunk_tokens is None or targets.numel() <= chunk_tokens:
        return _cross_entropy(hidden, head, targets, "mean", vocab_size)
    chunks = zip(hidden.flatten(0, -2).split(chunk_tokens), targets.flatten().split(chunk_tokens))
    total = sum(checkpoint(_cross_entropy, h, head, t, "sum", vocab_size, use_reentrant=False) for h, t in chunks)
    return total / targets.numel()


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE."""

    def __init__(self, cfg: ModelConfig, precision: Precision, opts: QuantOptions | None, index: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.qkv = QATLinear(cfg.hidden, qkv_out, precision.layers["qkv"], opts,
                             layer_type="qkv", layer_index=index)
        self.o = QATLinear(cfg.n_heads * cfg.head_dim, cfg.hidden, precision.layers["o"], opts,
                           layer_type="o", layer_index=index)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: fc2(silu(gate) * up) with [gate, up] = fc1(x)."""

    def __init__(self, cfg: ModelConfig, precision: Precision, opts: QuantOptions | None, index: int):
        super().__init__()
        self.fc1 = QATLinear(cfg.hidden, 2 * cfg.ffn, precision.layers["fc1"], opts,
                             layer_type="fc1", layer_index=index)
        self.fc2 = QATLinear(cfg.ffn, cfg.hidden, precision.layers["fc2"], opts,
                             layer_type="fc2", layer_index=index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, precision: Precision, opts: QuantOptions | None, index: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(cfg, precision, opts, index)
        self.mlp_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = MLP(cfg, precision, opts, index)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Model(nn.Module):
    """Decoder-only language model trained with QAT at a given precision.

    precision: a :class:`Precision` or a precision string (``"BF16"``,
        ``"W4A4"``, ``"W4A4-fc2a8"``, ...).
    opts: quantizer options; required unless nothing is quantized.

    Initialization: all linear and embedding weights ~ N(0, 0.02²); the
    residual output projections ``o`` and ``fc2`` use std 0.02/sqrt(2·n_layers)
    (GPT-2 / OLMo) so the residual stream's variance does not grow with depth.
    Norm weights start at 1, LAC γ at ``opts.lac_init``.

    ``activation_checkpointing`` (how the model executes, not what it is; off by default): in training with
    gradients on, each block keeps only its input for the backward pass and recomputes the rest there. Nothing in a
    block updates state in its forward pass (the quantizers are pure functions of their input, weight and γ), so
    the recomputation reproduces the forward pass bit for bit and the loss and gradients are the same (in eager
    mode; ``torch.compile`` may fuse the recomputation differently, equal up to rounding).
    """

    activation_checkpointing: bool = False

    def __init__(self, cfg: ModelConfig, precision: Precision | str = "BF16",
                 opts: QuantOptions | None = None):
        super().__init__()
        self.cfg = cfg
        self.precision = parse(precision) if isinstance(precision, str) else precision
        if opts is None and not self.precision.is_baseline:
            raise ValueError(f"precision {self.precision.name!r} quantizes tensors and needs QuantOptions")
        self.opts = opts
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, self.precision, opts, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()
        self._pad_vocabulary()

    def _init_weights(self) -> None:
        out_std = INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                residual_out = getattr(m, "layer_type", None) in ("o", "fc2")
                nn.init.normal_(m.weight, std=out_std if residual_out else INIT_STD)

    @torch.no_grad()
    def _pad_vocabulary(self) -> None:
        """Give the embedding and the LM head zero rows up to a multiple of 128 (grid.padded_vocab), for aligned
        matmul shapes. They are added after the init, which draws the true rows as an unpadded model does, so a
        run's weights, and its training, do not depend on the padding; the loss never sees those rows."""
        rows = padded_vocab(self.cfg.vocab_size) - self.cfg.vocab_size
        if rows:
            for m in (self.tok_emb, self.lm_head):
                m.weight = nn.Parameter(torch.cat([m.weight, m.weight.new_zeros(rows, self.cfg.hidden)]))
            self.tok_emb.num_embeddings = self.lm_head.out_features = padded_vocab(self.cfg.vocab_size)

    def qat_linears(self) -> list[QATLinear]:
        """The quantized linear layers, in block order (qkv, o, fc1, fc2)."""
        return [m for m in self.modules() if isinstance(m, QATLinear)]

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of model parameters; by default the scaling law's N.

        Quantizer parameters (LAC γ) are not counted, so N depends on the
        architecture only, not on the precision.
        """
        skip = {id(p) for m in self.modules() if isinstance(m, LAC) for p in m.parameters()}
        if non_embedding:
            skip |= {id(self.tok_emb.weight), id(self.lm_head.weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' RoPE cos and sin tables for sequences of ``T`` tokens."""
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds seq_len {self.cfg.seq_len}")
        return self.rope_cos[:T], self.rope_sin[:T]

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The LM head's input (B, T, hidden) for token ids (B, T): the normed output of the last block."""
        cos, sin = self.rope(idx.shape[1])
        x = self.tok_emb(idx)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, cos, sin, use_reentrant=False) if recompute else block(x, cos, sin)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, chunk_tokens: int | None = None
                ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); given ``targets`` (B, T), the mean next-token cross-entropy
        instead, never holding the logits of more than ``chunk_tokens`` tokens (see :func:`lm_loss`)."""
        x = self.hidden(idx)
        if targets is None:
            return logits(x, self.lm_head, self.cfg.vocab_size)
        return lm_loss(x, self.lm_head, targets, chunk_tokens, self.cfg.vocab_size)
