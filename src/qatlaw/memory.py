"""Peak GPU memory of one training rank, predicted from a run's shapes (torch-free, for the Snakefile and config).

The activation terms count the tensors autograd saves for the backward pass of :class:`qatlaw.model.Model`, byte for
byte as measured under bf16 autocast or fp32 on CPU (tests/test_memory.py), with and without activation
checkpointing; on a GPU the attention kernel, fused norms and ``torch.compile`` may save somewhat different tensors,
so the model has not been validated on a GPU. :func:`plan_run` decides how a run trains on a GPU: activation
checkpointing and the micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qatlaw.errors import ConfigError
from qatlaw.grid import RunSettings, non_embedding_count, padded_vocab, run_gpus
from qatlaw.precision import LAYER_TYPES, parse

FP32 = 4
# fp32 master weight, gradient and the two AdamW moments
STATE_BYTES_PER_PARAM = 16
# per logit of a loss chunk, beyond the logits themselves: fp32 log-probabilities saved by the cross-entropy, their
# fp32 gradient and one fp32 temporary of the softmax backward
LOSS_BYTES_PER_LOGIT = 12
CUDA_CONTEXT_BYTES = 2**30
# NCCL's buffers and streams of a data-parallel process, outside torch's allocator like the CUDA context: an
# allowance, not a measurement (the GPU check's mem_get_info rows measure what a process really holds)
NCCL_BYTES = 2**30
# what the model does not count of the tensors (other kernels' saved tensors and workspaces under torch.compile and
# the fused attention, cuBLAS workspaces), as a share of those it counts
HEADROOM = 0.05
# share of the GPU's memory the caching allocator can fill (fragmentation)
USABLE_FRACTION = 0.9
# bytes per parameter of a resumable checkpoint: fp32 weights and the two AdamW moments (and the weight average,
# where a run keeps one, as much again as the weights)
CHECKPOINT_BYTES_PER_PARAM = 12


def element_bytes(s: RunSettings) -> int:
    """Bytes per element of what the matmuls see: 2 under bf16 autocast, 4 in fp32."""
    return 2 if s.numerics == "bf16" else FP32


def lac_inputs(s: RunSettings) -> dict[str, bool]:
    """Per linear layer type, whether its input activation is quantized with LAC (learnable clipping)."""
    precision = parse(s.precision)
    lac = s.uses_lac
    return {layer: lac and precision.layers[layer].act.enabled for layer in LAYER_TYPES}


def layer_activation_bytes(s: RunSettings) -> int:
    """Bytes per token of one block's tensors saved for the backward pass."""
    h, f, heads = s.hidden, s.ffn, s.heads
    kv = s.kv_heads * (h // heads)
    a = element_bytes(s)
    norms = 2 * (FP32 * 2 * h + FP32)  # fp32 input, normalized input and 1/rms of both RMSNorms
    linear_inputs = a * (3 * h + f)  # qkv, o, fc1 (h wide) and fc2 (f wide)
    # q and k after RoPE, the fused qkv output (v is a view of it), the output, and the fp32 log-sum-exp per head
    attention = a * (h + kv + (h + 2 * kv) + h) + FP32 * heads
    swiglu = a * (2 * f + f)  # the fused gate+up output and silu(gate)
    # LAC keeps two fp32 tensors of its input's size for the backward (clipping mask and dγ)
    widths = {"qkv": h, "o": h, "fc1": h, "fc2": f}
    lac = sum(2 * FP32 * widths[layer] for layer, on in lac_inputs(s).items() if on)
    return norms + linear_inputs + attention + swiglu + lac


def checkpointed_block_bytes(s: RunSettings) -> int:
    """Bytes per token that one block keeps for the backward pass under activation checkpointing: its fp32 input
    (the residual stream), from which the backward pass recomputes the rest."""
    return FP32 * s.hidden


def head_activation_bytes(s: RunSettings) -> int:
    """Bytes per token saved outside the blocks and the loss: token ids and targets, and the final norm's."""
    return 2 * 8 + FP32 * 2 * s.hidden + FP32


def logit_bytes(s: RunSettings) -> int:
    """Bytes per logit of one loss chunk: the logits and what the cross-entropy keeps for and makes in the backward."""
    return element_bytes(s) + LOSS_BYTES_PER_LOGIT


def whole_loss(tokens: int, loss_chunk_tokens: int | None) -> bool:
    """Whether the loss of ``tokens`` tokens is computed in one piece, its logits saved for the backward pass."""
    return loss_chunk_tokens is None or tokens <= loss_chunk_tokens


def saved_activation_bytes(s: RunSettings, vocab_size: int, micro_batch: int, loss_chunk_tokens: int | None = None,
                           checkpointing: bool = False) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one micro-batch (the autocast copies of the
    weights included). In one piece, the loss saves the LM head's input and the fp32 log-probabilities; in chunks
    (recomputed in the backward pass) only the fp32 input of each chunk. With activation ``checkpointing`` each
    block saves only its input, and none of its weight copies."""
    tokens = micro_batch * s.seq_len
    whole = whole_loss(tokens, loss_chunk_tokens)
    loss = tokens * (element_bytes(s) * s.hidden + FP32 * vocab_size if whole else FP32 * s.hidden)
    copies = weight_copy_bytes(s, padded_vocab(vocab_size) if whole else 0, blocks=not checkpointing)
    block = checkpointed_block_bytes(s) if checkpointing else layer_activation_bytes(s)
    return tokens * (s.layers * block + head_activation_bytes(s)) + loss + copies


def parameter_count(s: RunSettings, vocab_size: int) -> int:
    """Every parameter held: N, the token embedding and the untied LM head, both padded (grid.padded_vocab; LAC γ
    are negligible)."""
    return non_embedding_count(s.layers, s.hidden, s.ffn, s.heads, s.kv_heads) + 2 * padded_vocab(vocab_size) * s.hidden


def checkpoint_bytes(s: RunSettings, vocab_size: int) -> int:
    """Size of a run's resumable checkpoint."""
    per_param = CHECKPOINT_BYTES_PER_PARAM + (FP32 if s.weight_ema > 0 else 0)
    return per_param * parameter_count(s, vocab_size)


def weight_copy_bytes(s: RunSettings, vocab_size: int, blocks: bool = True) -> int:
    """The weight copies that the matmuls keep through a pass: under bf16 autocast a bf16 copy of every block
    matmul weight (fake-quantized or not; ``blocks`` False: none) and of an LM head of ``vocab_size`` rows (0: none);
    in fp32 the fake-quantized block weights."""
    h, f = s.hidden, s.ffn
    kv = s.kv_heads * (h // s.heads)
    sizes = {"qkv": h * (h + 2 * kv), "o": h * h, "fc1": h * 2 * f, "fc2": f * h}
    layers = s.layers if blocks else 0
    if s.numerics == "bf16":
        return 2 * (layers * sum(sizes.values()) + vocab_size * h)
    quantized = parse(s.precision).layers
    return FP32 * layers * sum(n for layer, n in sizes.items() if quantized[layer].weight.enabled)


def peak_bytes(s: RunSettings, vocab_size: int, micro_batch: int, gpus: int = 1,
               loss_chunk_tokens: int | None = None, checkpointing: bool = False) -> int:
    """Predicted peak GPU memory of one rank training ``s`` at ``micro_batch`` sequences per pass.

    Parameters, gradients and AdamW moments in fp32 (DDP's buckets hold the gradients themselves:
    ``gradient_as_bucket_view``), the autocast weight copies, the saved activations of the micro-batch, one block's
    gradients during its backward, and the logits of one loss chunk of ``loss_chunk_tokens`` tokens (None: the whole
    micro-batch), over the padded vocabulary; all that with :data:`HEADROOM` for what the model does not count;
    then the CUDA context, and on several GPUs NCCL's buffers. With activation ``checkpointing`` the blocks keep
    only their inputs, and during a block's backward its recomputed activations are alive as well (the weight
    copies stay counted in full: an upper bound then).
    """
    tokens = micro_batch * s.seq_len
    chunk = tokens if whole_loss(tokens, loss_chunk_tokens) else loss_chunk_tokens
    state = STATE_BYTES_PER_PARAM * parameter_count(s, vocab_size)
    chunk_inputs = 0 if chunk == tokens else FP32 * s.hidden
    if checkpointing:
        blocks = s.layers * checkpointed_block_bytes(s) + 2 * layer_activation_bytes(s)
    else:
        blocks = (s.layers + 1) * layer_activation_bytes(s)
    activations = tokens * (blocks + head_activation_bytes(s) + chunk_inputs)
    loss = chunk * (padded_vocab(vocab_size) * element_bytes(s) + vocab_size * LOSS_BYTES_PER_LOGIT
                    + element_bytes(s) * s.hidden)
    tensors = state + weight_copy_bytes(s, padded_vocab(vocab_size)) + activations + loss
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if gpus > 1 else 0) + int((1 + HEADROOM) * tensors)


def usable_bytes(gpu_memory_gb: float) -> int:
    """What training may fill of a GPU of ``gpu_memory_gb`` GiB."""
    return int(USABLE_FRACTION * gpu_memory_gb * 2**30)


def required_gib(peak: int) -> float:
    """The GPU memory in GiB that a predicted peak of ``peak`` bytes needs."""
    return peak / USABLE_FRACTION / 2**30


_CHECKPOINTED = " with activation checkpointing"


@dataclass(frozen=True)
class Plan:
    """How one rank trains a run on a GPU: sequences per micro-batch, whether the blocks are checkpointed (their
    activations recomputed in the backward pass), and the predicted peak memory in bytes."""

    micro_batch: int
    checkpointing: bool
    peak_bytes: int


def needs_checkpointing(s: RunSettings, vocab_size: int, gpu_memory_gb: float, gpus: int = 1,
                        loss_chunk_tokens: int | None = None) -> bool:
    """Whether not even one sequence per micro-batch fits the GPU without activation checkpointing."""
    return peak_bytes(s, vocab_size, 1, gpus, loss_chunk_tokens) > usable_bytes(gpu_memory_gb)


def micro_batch_size(s: RunSettings, vocab_size: int, gpu_memory_gb: float, gpus: int = 1,
                     loss_chunk_tokens: int | None = None, checkpointing: bool = False) -> int:
    """The largest micro-batch (a divisor of the per-GPU batch) whose predicted peak fits the GPU; a ConfigError
    when not even one sequence fits."""
    per_gpu = s.batch_size // gpus
    usable = usable_bytes(gpu_memory_gb)
    for micro in (m for m in range(per_gpu, 0, -1) if per_gpu % m == 0):
        if peak_bytes(s, vocab_size, micro, gpus, loss_chunk_tokens, checkpointing) <= usable:
            return micro
    need = required_gib(peak_bytes(s, vocab_size, 1, gpus, loss_chunk_tokens, checkpointing))
    raise ConfigError(f"training.gpu_memory_gb: {s.run_id} needs a predicted {need:.1f} GiB per GPU at one sequence "
                      f"per micro-batch{_CHECKPOINTED if checkpointing else ''}, more than {gpu_memory_gb:g} GiB")


def plan_run(s: RunSettings, vocab_size: int, training: Mapping[str, Any]) -> Plan:
    """How a GPU run trains: ``training.activation_checkpointing`` ("auto": on only when one sequence per
    micro-batch does not fit ``training.gpu_memory_gb`` without it), then ``training.micro_batch_size``, or when
    null the largest that fits; a ConfigError when its predicted peak does not fit."""
    gpus, micro, gb = max(1, run_gpus(training, s.size)), training["micro_batch_size"], training["gpu_memory_gb"]
    chunk, setting = training["loss_chunk_tokens"], training["activation_checkpointing"]
    checkpointing = needs_checkpointing(s, vocab_size, gb, gpus, chunk) if setting == "auto" else setting
    if micro is None:
        micro = micro_batch_size(s, vocab_size, gb, gpus, chunk, checkpointing)
    elif (peak := peak_bytes(s, vocab_size, micro, gpus, chunk, checkpointing)) > usable_bytes(gb):
        raise ConfigError(f"training.micro_batch_size: {micro} sequences of {s.run_id} need a predicted "
                          f"{required_gib(peak):.1f} GiB per GPU{_CHECKPOINTED if checkpointing else ''}, more than "
                          f"training.gpu_memory_gb {gb:g}; lower it or set it to null")
    return Plan(micro, checkpointing, peak_bytes(s, vocab_size, micro, gpus, chunk, checkpointing))

