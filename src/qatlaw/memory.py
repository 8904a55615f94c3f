"""Peak GPU memory of one training rank, predicted from a run's shapes (torch-free, for the Snakefile and config).

The activation terms count the tensors autograd saves for the backward pass of :class:`qatlaw.model.Model`, byte for
byte as measured under bf16 autocast or fp32 on CPU (tests/test_memory.py); on a GPU the attention kernel, fused
norms and ``torch.compile`` may save somewhat different tensors, so the model has not been validated on a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qatlaw.config import ConfigError, run_gpus
from qatlaw.grid import RunSettings, non_embedding_count
from qatlaw.precision import LAYER_TYPES, parse, uses_lac

FP32 = 4
# fp32 master weight, gradient and the two AdamW moments
STATE_BYTES_PER_PARAM = 16
# per logit of a loss chunk, beyond the logits themselves: fp32 log-probabilities saved by the cross-entropy, their
# fp32 gradient and one fp32 temporary of the softmax backward
LOSS_BYTES_PER_LOGIT = 12
CUDA_CONTEXT_BYTES = 2**30
# share of the GPU's memory the caching allocator can fill (fragmentation)
USABLE_FRACTION = 0.9


def element_bytes(s: RunSettings) -> int:
    """Bytes per element of what the matmuls see: 2 under bf16 autocast, 4 in fp32."""
    return 2 if s.numerics == "bf16" else FP32


def lac_inputs(s: RunSettings) -> dict[str, bool]:
    """Per linear layer type, whether its input activation is quantized with LAC (learnable clipping)."""
    precision = parse(s.precision)
    lac = {"always": True, "never": False}.get(s.lac, s.group is not None and uses_lac(s.group))
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


def head_activation_bytes(s: RunSettings) -> int:
    """Bytes per token saved outside the blocks and the loss: token ids and targets, and the final norm's."""
    return 2 * 8 + FP32 * 2 * s.hidden + FP32


def logit_bytes(s: RunSettings) -> int:
    """Bytes per logit of one loss chunk: the logits and what the cross-entropy keeps for and makes in the backward."""
    return element_bytes(s) + LOSS_BYTES_PER_LOGIT


def whole_loss(tokens: int, loss_chunk_tokens: int | None) -> bool:
    """Whether the loss of ``tokens`` tokens is computed in one piece, its logits saved for the backward pass."""
    return loss_chunk_tokens is None or tokens <= loss_chunk_tokens


def saved_activation_bytes(s: RunSettings, vocab_size: int, micro_batch: int, loss_chunk_tokens: int | None = None
                           ) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one micro-batch (the autocast copies of the
    weights included). In one piece, the loss saves the LM head's input and the fp32 log-probabilities; in chunks
    (recomputed in the backward pass) only the fp32 input of each chunk."""
    tokens = micro_batch * s.seq_len
    if whole_loss(tokens, loss_chunk_tokens):
        loss = tokens * (element_bytes(s) * s.hidden + FP32 * vocab_size) + weight_copy_bytes(s, vocab_size)
    else:
        loss = tokens * FP32 * s.hidden + weight_copy_bytes(s, 0)
    return tokens * (s.layers * layer_activation_bytes(s) + head_activation_bytes(s)) + loss


def parameter_count(s: RunSettings, vocab_size: int) -> int:
    """Every trained parameter: N, the token embedding and the untied LM head (LAC γ are negligible)."""
    return non_embedding_count(s.layers, s.hidden, s.ffn, s.heads, s.kv_heads) + 2 * vocab_size * s.hidden


def weight_copy_bytes(s: RunSettings, vocab_size: int) -> int:
    """The weight copies that the matmuls keep through a pass: under bf16 autocast a bf16 copy of every block
    matmul weight (fake-quantized or not) and of an LM head of ``vocab_size`` rows (0: none); in fp32 the
    fake-quantized block weights."""
    h, f = s.hidden, s.ffn
    kv = s.kv_heads * (h // s.heads)
    sizes = {"qkv": h * (h + 2 * kv), "o": h * h, "fc1": h * 2 * f, "fc2": f * h}
    if s.numerics == "bf16":
        return 2 * (s.layers * sum(sizes.values()) + vocab_size * h)
    layers = parse(s.precision).layers
    return FP32 * s.layers * sum(n for layer, n in sizes.items() if layers[layer].weight.enabled)


def peak_bytes(s: RunSettings, vocab_size: int, micro_batch: int, gpus: int = 1,
               loss_chunk_tokens: int | None = None) -> int:
    """Predicted peak GPU memory of one rank training ``s`` at ``micro_batch`` sequences per pass.

    Parameters, gradients and AdamW moments in fp32 (plus DDP's gradient buckets on several GPUs), the autocast
    weight copies, the CUDA context, the saved activations of the micro-batch, one block's gradients during its
    backward, and the logits of one loss chunk of ``loss_chunk_tokens`` tokens (None: the whole micro-batch).
    """
    tokens = micro_batch * s.seq_len
    chunk = tokens if whole_loss(tokens, loss_chunk_tokens) else loss_chunk_tokens
    state = (STATE_BYTES_PER_PARAM + (FP32 if gpus > 1 else 0)) * parameter_count(s, vocab_size)
    chunk_inputs = 0 if chunk == tokens else FP32 * s.hidden
    activations = tokens * ((s.layers + 1) * layer_activation_bytes(s) + head_activation_bytes(s) + chunk_inputs)
    loss = chunk * (vocab_size * logit_bytes(s) + element_bytes(s) * s.hidden)
    return CUDA_CONTEXT_BYTES + state + weight_copy_bytes(s, vocab_size) + activations + loss


def usable_bytes(gpu_memory_gb: float) -> int:
    """What training may fill of a GPU of ``gpu_memory_gb`` GiB."""
    return int(USABLE_FRACTION * gpu_memory_gb * 2**30)


def required_gib(peak: int) -> float:
    """The GPU memory in GiB that a predicted peak of ``peak`` bytes needs."""
    return peak / USABLE_FRACTION / 2**30


def micro_batch_size(s: RunSettings, vocab_size: int, gpu_memory_gb: float, gpus: int = 1,
                     loss_chunk_tokens: int | None = None) -> int:
    """The largest micro-batch (a divisor of the per-GPU batch) whose predicted peak fits the GPU; a ConfigError
    when not even one sequence fits."""
    per_gpu = s.batch_size // gpus
    usable = usable_bytes(gpu_memory_gb)
    for micro in (m for m in range(per_gpu, 0, -1) if per_gpu % m == 0):
        if peak_bytes(s, vocab_size, micro, gpus, loss_chunk_tokens) <= usable:
            return micro
    need = required_gib(peak_bytes(s, vocab_size, 1, gpus, loss_chunk_tokens))
    raise ConfigError(f"training.gpu_memory_gb: {s.run_id} needs a predicted {need:.1f} GiB per GPU at one sequence "
                      f"per micro-batch, more than {gpu_memory_gb:g} GiB")


def planned_micro_batch(s: RunSettings, vocab_size: int, training: Mapping[str, Any]) -> int:
    """A GPU run's sequences per micro-batch: ``training.micro_batch_size``, or when null the largest that fits
    ``training.gpu_memory_gb``; a ConfigError when its predicted peak does not fit."""
    gpus, micro, gb = max(1, run_gpus(training, s.size)), training["micro_batch_size"], training["gpu_memory_gb"]
    chunk = training["loss_chunk_tokens"]
    if micro is None:
        return micro_batch_size(s, vocab_size, gb, gpus, chunk)
    if (peak := peak_bytes(s, vocab_size, micro, gpus, chunk)) > usable_bytes(gb):
        raise ConfigError(f"training.micro_batch_size: {micro} sequences of {s.run_id} need a predicted "
                          f"{required_gib(peak):.1f} GiB per GPU, more than training.gpu_memory_gb {gb:g}; "
                          "lower it or set it to null")
    return micro


def size_plans(runs: list[RunSettings], vocab_size: int, training: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Per model size on GPUs: the smallest micro-batch of its runs, and the largest predicted peak (bytes) of one
    of its runs at its own micro-batch."""
    plans: dict[str, tuple[int, int]] = {}
    for run in runs:
        micro = planned_micro_batch(run, vocab_size, training)
        peak = peak_bytes(run, vocab_size, micro, max(1, run_gpus(training, run.size)), training["loss_chunk_tokens"])
        old_micro, old_peak = plans.get(run.size, (micro, peak))
        plans[run.size] = (min(micro, old_micro), max(peak, old_peak))
    return plans
