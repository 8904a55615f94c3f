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


def measured_saved_bytes(s: RunSettings, micro_batch: int, loss_chunk_tokens: int | None) -> int:
    """Bytes of the distinct storages autograd saves in one forward pass with targets (parameters and buffers aside)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, n_layers=s.layers, hidden=s.hidden, ffn=s.ffn, n_heads=s.heads,
                      n_kv_heads=s.kv_heads, seq_len=s.seq_len)
    model = Model(cfg, s.precision, None if s.is_baseline else quant_options(s))
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    idx, targets = torch.randint(0, VOCAB, (2, micro_batch, s.seq_len))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
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
    from test_workflow import ROOT, write_paper_standin

    from qatlaw import cli, config

    monkeypatch.chdir(tmp_path)
    write_paper_standin(tmp_path)
    paper = [str(ROOT / "config.yaml"), str(ROOT / "config" / "paper.yaml")]
    assert cli.main(["validate", *paper]) == 0
    assert "973M: 4 sequences per micro-batch, predicted peak" in capsys.readouterr().out
    too_small = r"^training.gpu_memory_gb: \S+ needs a predicted [0-9.]+ GiB per GPU at one sequence per micro-batch"
    with pytest.raises(ConfigError, match=too_small + ", more than 16 GiB$"):
        config.load(*paper, {"training": {"gpu_memory_gb": 16}})
    with pytest.raises(ConfigError, match=r"^training.micro_batch_size: 8 sequences of 973M/\S+/seed0/\S+ need a"):
        config.load(*paper, {"training": {"micro_batch_size": 8}})
