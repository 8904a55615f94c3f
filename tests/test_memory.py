import contextlib

import pytest
import torch

from qatlaw import memory
from qatlaw.config import ConfigError
from qatlaw.grid import RunSettings
from qatlaw.model import Model, ModelConfig
from qatlaw.train import quant_options

VOCAB = 96


def settings(layers=2, hidden=48, ffn=80, heads=4, kv_heads=2, seq_len=20, batch_size=8, precision="BF16",
             group=None, numerics="bf16", lac="paper") -> RunSettings:
    return RunSettings(
        size="tiny", layers=layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, lr=1e-3,
        batch_size=batch_size, tokens=10**6, precision=precision, group=group, seed=0, seq_len=seq_len,
        warmup_fraction=0.05, min_lr_ratio=0.1, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0,
        loss_ema=0.9, eval_tokens=1024, clip="paper", format="int", lac=lac, numerics=numerics,
    )


def measured_saved_bytes(s: RunSettings, micro_batch: int, loss_chunk_tokens: int | None,
                         checkpointing: bool = False, block: int | None = None) -> int:
    """Bytes of the distinct storages autograd saves in one forward pass with targets (parameters and buffers aside),
    with the blocks checkpointed or not; given ``block``, only those first saved while that block runs."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, n_layers=s.layers, hidden=s.hidden, ffn=s.ffn, n_heads=s.heads,
                      n_kv_heads=s.kv_heads, seq_len=s.seq_len)
    model = Model(cfg, s.precision, None if s.is_baseline else quant_options(s))
    model.activation_checkpointing = checkpointing
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    idx, targets = torch.randint(0, VOCAB, (2, micro_batch, s.seq_len))
    saved: dict[int, int] = {}
    seen = set(own)
    running: list[int] = []  # the block whose forward pass is running
    for i, b in enumerate(model.blocks):
        b.register_forward_pre_hook(lambda module, args, i=i: running.append(i))
        b.register_forward_hook(lambda module, args, output: running.clear())

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            if block is None or running == [block]:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    numerics = torch.autocast("cpu", dtype=torch.bfloat16) if s.numerics == "bf16" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), numerics:
        model(idx, targets, loss_chunk_tokens)
    return sum(saved.values())


# (settings, tokens per loss chunk): the micro-batch of 3 sequences holds 48-96 tokens
SHAPES = [
    (settings(), None),
    (settings(precision="W4A4", group=16), None),
    (settings(precision="W4A4", group="channel"), 16),
    (settings(layers=3, hidden=64, ffn=160, heads=8, kv_heads=2, seq_len=32, precision="W16A4", group=32, lac="always"),
     None),
    (settings(layers=1, hidden=96, ffn=64, heads=4, kv_heads=4, seq_len=16, precision="W4A4-fc2a8", group="channel"),
     20),
    (settings(layers=2, hidden=32, ffn=96, heads=2, kv_heads=1, seq_len=24, precision="W4A16", group=16, lac="always"),
     8192),
    (settings(numerics="fp32"), None),
    (settings(numerics="fp32", precision="W4A4", group="channel"), 32),
]


@pytest.mark.parametrize("s, chunk", SHAPES,
                         ids=lambda v: f"{v.layers}x{v.hidden}x{v.ffn}-{v.precision}-{v.group}-{v.numerics}"
                         if isinstance(v, RunSettings) else f"chunk{v}")
def test_saved_activations_match_the_measured_tensors(s, chunk):
    predicted = memory.saved_activation_bytes(s, VOCAB, 3, chunk)
    assert predicted == pytest.approx(measured_saved_bytes(s, 3, chunk), rel=0.15)


def test_issue_numbers_per_token_and_layer():
    """The 74M and 973M bf16 figures measured for the issue: 39 / 74 KB and 126 / 241 KB per token per layer."""
    for (layers, hidden, ffn, heads, kv), (plain, lac) in [((12, 768, 2048, 16, 4), (39, 74)),
                                                          ((16, 2048, 8192, 32, 8), (126, 241))]:
        shape = dict(layers=layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv)
        assert memory.layer_activation_bytes(settings(**shape)) / 1000 == pytest.approx(plain, abs=1)
        quantized = settings(**shape, precision="W4A4", group="channel")
        assert memory.layer_activation_bytes(quantized) / 1000 == pytest.approx(lac, abs=1)


def test_micro_batch_is_the_largest_divisor_that_fits():
    s = settings(batch_size=12)
    peaks = {m: memory.peak_bytes(s, VOCAB, m) for m in (3, 4)}
    gb = (peaks[3] + peaks[4]) / 2 / memory.USABLE_FRACTION / 2**30
    assert memory.micro_batch_size(s, VOCAB, gb) == 3
    assert memory.micro_batch_size(s, VOCAB, 80) == 12


def test_a_size_that_does_not_fit_one_sequence_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^training.gpu_memory_gb: tiny/1M/seed0/BF16 needs a predicted [0-9.]+ GiB"):
        memory.micro_batch_size(settings(), VOCAB, 0.5)


def test_paper_grid_validates_and_is_refused_on_a_small_gpu(tmp_path, monkeypatch, capsys):
    from conftest import ROOT, write_paper_standin

    from qatlaw import cli, config

    monkeypatch.chdir(tmp_path)
    write_paper_standin(tmp_path)
    paper = [str(ROOT / "config.yaml"), str(ROOT / "config" / "paper.yaml")]
    assert cli.main(["validate", *paper]) == 0

    def row(printed: str, size: str) -> list[str]:
        """A size's row of the printed plan: runs, GPUs, nodes, micro-batch, checkpointed runs, peak, ..."""
        return next(line.split()[1:] for line in printed.splitlines() if line.startswith(f"{size} "))

    assert row(capsys.readouterr().out, "973M")[:5] == ["12", "64", "8", "4", "0"]  # runs, GPUs, nodes, micro, ckpt
    (tmp_path / "28gb.yaml").write_text("training: {gpu_memory_gb: 28}\n")
    assert cli.main(["validate", *paper, str(tmp_path / "28gb.yaml")]) == 0
    printed = capsys.readouterr().out
    # the 973M runs whose activations LAC quantizes (G=256, per channel) need checkpointing
    assert row(printed, "973M")[:5] == ["12", "64", "8", "1", "4"]
    assert row(printed, "595M")[:5] == ["108", "32", "4", "1", "0"]
    too_small = (r"^training.gpu_memory_gb: \S+ needs a predicted [0-9.]+ GiB per GPU at one sequence per micro-batch "
                 "with activation checkpointing")
    with pytest.raises(ConfigError, match=too_small + ", more than 16 GiB$"):
        config.load(*paper, {"training": {"gpu_memory_gb": 16}})
    # the first run of the grid that does not fit 8 sequences (595M at G = 256, with the model's headroom)
    with pytest.raises(ConfigError, match=r"^training.micro_batch_size: 8 sequences of (595M|973M)/\S+/seed0/\S+ need a"):
        config.load(*paper, {"training": {"micro_batch_size": 8}})


# (settings, tokens per loss chunk) with LAC on and off, bf16 and fp32, the loss whole and in chunks
CHECKPOINTED = [
    (settings(), None),
    (settings(precision="W4A4", group="channel"), 16),
    (settings(layers=3, hidden=64, ffn=160, heads=8, kv_heads=2, seq_len=32, precision="W4A4", group=32, lac="always"),
     None),
    (settings(numerics="fp32", precision="W4A4", group="channel"), None),
]


@pytest.mark.parametrize("s, chunk", CHECKPOINTED,
                         ids=lambda v: f"{v.layers}x{v.hidden}x{v.ffn}-{v.precision}-{v.group}-{v.numerics}"
                         if isinstance(v, RunSettings) else f"chunk{v}")
def test_checkpointed_activations_match_the_measured_tensors(s, chunk):
    """With activation checkpointing the hooks see what the forward pass keeps for the backward pass: each block's
    input (saved by the checkpoint), the head's and the loss's tensors. They do not see inside a checkpointed block,
    whose tensors are made again while its backward pass runs; what one block holds then is measured as what it
    saves in a forward pass without checkpointing (its activations and its weight copies)."""
    tokens = 3 * s.seq_len
    kept = memory.saved_activation_bytes(s, VOCAB, 3, chunk, checkpointing=True)
    assert kept == pytest.approx(measured_saved_bytes(s, 3, chunk, checkpointing=True), rel=0.15)
    assert kept < memory.saved_activation_bytes(s, VOCAB, 3, chunk) / 2
    one_block = tokens * memory.layer_activation_bytes(s) + memory.weight_copy_bytes(s, 0) // s.layers
    for block in range(s.layers):
        assert one_block == pytest.approx(measured_saved_bytes(s, 3, chunk, block=block), rel=0.15)


def gpu(**training) -> dict:
    """The training section of a one-GPU config."""
    return {"gpus_per_run": 1, "micro_batch_size": None, "loss_chunk_tokens": None, "activation_checkpointing": "auto",
            "gpu_memory_gb": 80} | training


def between(low: int, high: int) -> float:
    """A GPU size in GiB whose usable memory lies halfway between two predicted peaks."""
    return (low + high) / 2 / memory.USABLE_FRACTION / 2**30


def test_auto_checkpointing_is_on_exactly_when_one_sequence_does_not_fit_without_it():
    s = settings(batch_size=12)
    plain, checkpointed = memory.peak_bytes(s, VOCAB, 1), memory.peak_bytes(s, VOCAB, 1, checkpointing=True)
    assert checkpointed < plain
    fits = memory.plan_run(s, VOCAB, gpu(gpu_memory_gb=between(plain, memory.peak_bytes(s, VOCAB, 2))))
    assert fits == memory.Plan(1, False, plain)
    tight = between(checkpointed, plain)
    plan = memory.plan_run(s, VOCAB, gpu(gpu_memory_gb=tight))
    assert plan.checkpointing and plan.micro_batch == memory.micro_batch_size(s, VOCAB, tight, checkpointing=True)
    assert plan.peak_bytes == memory.peak_bytes(s, VOCAB, plan.micro_batch, checkpointing=True)
    assert plan.peak_bytes <= memory.usable_bytes(tight)
    assert memory.plan_run(s, VOCAB, gpu(activation_checkpointing=True)) == memory.Plan(
        12, True, memory.peak_bytes(s, VOCAB, 12, checkpointing=True))
    assert not memory.plan_run(s, VOCAB, gpu()).checkpointing
    with pytest.raises(ConfigError, match=r"^training.gpu_memory_gb: tiny/1M/seed0/BF16 needs a predicted [0-9.]+ GiB "
                                          r"per GPU at one sequence per micro-batch, more than [0-9.]+ GiB$"):
        memory.plan_run(s, VOCAB, gpu(gpu_memory_gb=tight, activation_checkpointing=False))
    with pytest.raises(ConfigError, match=r"^training.micro_batch_size: 12 sequences of tiny/1M/seed0/BF16 need a "
                                          r"predicted [0-9.]+ GiB per GPU with activation checkpointing, more than"):
        memory.plan_run(s, VOCAB, gpu(gpu_memory_gb=tight, micro_batch_size=12))


def test_a_size_that_fits_neither_way_is_refused_in_one_line_with_the_gib_it_needs():
    s = settings()
    need = memory.required_gib(memory.peak_bytes(s, VOCAB, 1, checkpointing=True))
    small = between(memory.CUDA_CONTEXT_BYTES, memory.peak_bytes(s, VOCAB, 1, checkpointing=True))
    with pytest.raises(ConfigError, match=rf"^training.gpu_memory_gb: tiny/1M/seed0/BF16 needs a predicted {need:.1f} "
                                          rf"GiB per GPU at one sequence per micro-batch with activation "
                                          rf"checkpointing, more than {small:g} GiB$"):
        memory.plan_run(s, VOCAB, gpu(gpu_memory_gb=small))
