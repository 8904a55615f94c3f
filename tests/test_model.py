import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatlaw.grid import padded_vocab
from qatlaw.model import Model, ModelConfig, QuantOptions, lm_loss, non_embedding_params
from qatlaw.quant import QATLinear

TINY = ModelConfig(vocab_size=64, n_layers=2, hidden=32, ffn=64, n_heads=4, n_kv_heads=2, seq_len=16)
G16 = QuantOptions(group_size=16)


def make(precision="BF16", opts=None, seed=0, cfg=TINY):
    torch.manual_seed(seed)
    return Model(cfg, precision, opts)


def tokens(batch=2, T=16, seed=0):
    return torch.randint(0, TINY.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


# The paper's Table 3 sizes (App. F) and their stated N.
PAPER_SIZES = [
    (74.3e6, 12, 768, 2048, 16, 4),
    (144.7e6, 12, 1024, 3072, 16, 4),
    (297.3e6, 12, 1536, 4096, 24, 6),
    (594.5e6, 24, 1536, 4096, 24, 6),
    (973.1e6, 16, 2048, 8192, 32, 8),
]


@pytest.mark.parametrize("n, layers, hidden, ffn, heads, kv", PAPER_SIZES)
def test_paper_sizes_closed_form(n, layers, hidden, ffn, heads, kv):
    cfg = ModelConfig(vocab_size=100278, n_layers=layers, hidden=hidden, ffn=ffn,
                      n_heads=heads, n_kv_heads=kv, seq_len=2048)
    assert non_embedding_params(cfg) == pytest.approx(n, rel=5e-3)


@pytest.mark.parametrize("precision, opts", [("BF16", None), ("W4A4", QuantOptions(group_size="channel"))])
def test_param_count_matches_closed_form(precision, opts):
    model = make(precision, opts)
    assert model.num_params() == non_embedding_params(TINY)
    emb = 2 * padded_vocab(TINY.vocab_size) * TINY.hidden  # the embedding and head as held: padded to 128 rows
    assert model.num_params(non_embedding=False) == non_embedding_params(TINY) + emb


def test_padding_changes_no_weight_of_the_true_vocabulary(monkeypatch):
    """The padded model's weights are those of the same model without padding, its padding rows zero: so a run's
    training does not depend on the padding (the CPU grids' 512 needs none; a vocabulary of 600 gets 640 rows)."""
    import qatlaw.model

    padded = make()
    monkeypatch.setattr(qatlaw.model, "padded_vocab", lambda v: v)
    plain = make()
    for name, weight in plain.state_dict().items():
        torch.testing.assert_close(padded.state_dict()[name][: len(weight)], weight, rtol=0, atol=0)
    assert padded.lm_head.weight[TINY.vocab_size:].abs().max() == padded.tok_emb.weight[TINY.vocab_size:].abs().max() == 0


def test_vocabulary_is_padded_to_128_and_the_loss_is_over_the_true_vocabulary():
    """The paper's 100,278 ids get 100,352 rows (OLMo-2's padding); a multiple of 128 (the CPU grids' 512) is left
    as it is, so those runs are unchanged. Logits and loss cover the true vocabulary only: the padded rows get no
    gradient from the loss, and the loss is that of a head of the true rows."""
    assert [padded_vocab(v) for v in (100278, 512, 64, 129)] == [100352, 512, 128, 256]
    model = make()
    assert model.tok_emb.weight.shape[0] == model.lm_head.weight.shape[0] == 128
    idx = tokens()
    assert model(idx).shape == (2, 16, TINY.vocab_size)
    loss = model(idx[:, :-1], idx[:, 1:])
    hidden = model.hidden(idx[:, :-1])
    true_head = nn.Linear(TINY.hidden, TINY.vocab_size, bias=False)
    true_head.weight.data = model.lm_head.weight.data[: TINY.vocab_size]
    torch.testing.assert_close(loss, lm_loss(hidden, true_head, idx[:, 1:]), rtol=1e-6, atol=1e-6)
    for chunk in (None, 10):
        model.zero_grad()
        model(idx[:, :-1], idx[:, 1:], chunk).backward()
        assert model.lm_head.weight.grad[TINY.vocab_size:].abs().max() == 0
        assert model.lm_head.weight.grad[: TINY.vocab_size].abs().max() > 0


def test_shapes_and_loss():
    model = make()
    idx = tokens()
    logits = model(idx)
    assert logits.shape == (2, 16, TINY.vocab_size) and logits.dtype == torch.float32
    loss = model(idx[:, :-1], idx[:, 1:])
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(torch.log(torch.tensor(TINY.vocab_size)).item(), rel=0.1)


def test_rejects_too_long_sequence():
    with pytest.raises(ValueError):
        make()(torch.zeros(1, TINY.seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("precision, opts", [("BF16", None), ("W4A4", QuantOptions(group_size="channel"))])
def test_causal(precision, opts):
    model = make(precision, opts)
    idx = tokens(batch=1)
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % TINY.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_qatlinear_placement():
    model = make("W4A4", G16)
    qat = {name for name, m in model.named_modules() if isinstance(m, QATLinear)}
    assert qat == {f"blocks.{i}.{p}" for i in range(TINY.n_layers)
                   for p in ("attn.qkv", "attn.o", "mlp.fc1", "mlp.fc2")}
    assert [(m.layer_index, m.layer_type) for m in model.qat_linears()] == [
        (i, t) for i in range(TINY.n_layers) for t in ("qkv", "o", "fc1", "fc2")]
    assert type(model.lm_head) is nn.Linear and type(model.tok_emb) is nn.Embedding
    assert model.blocks[0].attn.qkv.out_features == (4 + 2 * 2) * 8
    assert model.blocks[0].mlp.fc1.out_features == 2 * TINY.ffn
    assert model.blocks[0].mlp.fc2.in_features == TINY.ffn
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))


def test_bf16_equals_w16a16():
    idx = tokens()
    a, b = make("BF16")(idx), make("W16A16", G16)(idx)
    assert torch.equal(a, b)


def test_quantization_changes_output():
    bf16, w4a4 = make("BF16"), make("W4A4", G16)
    w4a4.load_state_dict(bf16.state_dict())
    idx = tokens()
    a, b = bf16(idx), w4a4(idx)
    assert not torch.allclose(a, b, atol=1e-4)


def test_fc2_override_changes_only_fc2_act():
    base, mixed = make("W4A4", G16), make("W4A4-fc2a8", G16)
    for m0, m1 in zip(base.qat_linears(), mixed.qat_linears(), strict=True):
        assert m0.quant.weight.bits == m1.quant.weight.bits == 4
        assert (m0.quant.act.bits, m1.quant.act.bits) == ((4, 8) if m0.layer_type == "fc2" else (4, 4))


def test_quantized_needs_options():
    with pytest.raises(ValueError):
        Model(TINY, "W4A4")


def test_output_projections_scaled_init():
    cfg = ModelConfig(vocab_size=64, n_layers=8, hidden=64, ffn=256, n_heads=4, n_kv_heads=2, seq_len=16)
    model = make(cfg=cfg)
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.mlp.fc2.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)  # 1/sqrt(2·8) = 1/4
    assert block.attn.o.weight.std().item() == pytest.approx(0.02 / 4, rel=0.15)
    assert model.tok_emb.weight[: cfg.vocab_size].std().item() == pytest.approx(0.02, rel=0.1)  # its padding is zero
    assert model.tok_emb.weight[cfg.vocab_size :].abs().max() == 0


@pytest.mark.parametrize("precision, opts", [
    ("BF16", None),
    ("W4A4-fc2a8", QuantOptions(group_size="channel")),  # LAC on activations
    ("W4A4", QuantOptions(group_size=8, clip="symmetric")),
])
def test_loss_decreases(precision, opts):
    model = make(precision, opts)
    idx = tokens(batch=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    lacs = [m.lac for m in model.qat_linears() if m.lac is not None]
    assert bool(lacs) == (opts is not None and opts.group_size == "channel")
    assert all(lac.gamma.grad is not None for lac in lacs)


def loss_and_grads(model: Model, idx: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(idx[:, :-1], idx[:, 1:], chunk)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def whole_logits_loss_and_grads(model: Model, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss as computed before chunking: cross-entropy of the whole batch's fp32 logits."""
    model.zero_grad()
    loss = F.cross_entropy(model(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


QUANTIZED = [("BF16", None), ("W4A4", G16), ("W4A4", QuantOptions(group_size="channel"))]


@pytest.mark.parametrize("precision, opts", QUANTIZED)
def test_loss_in_one_chunk_is_bit_identical_to_the_whole_logits(precision, opts):
    model, idx = make(precision, opts), tokens(batch=4)
    loss, grads = whole_logits_loss_and_grads(model, idx)
    for chunk in (None, 4 * 15, 8192):
        chunked, chunked_grads = loss_and_grads(model, idx, chunk)
        assert torch.equal(chunked, loss)
        assert all(torch.equal(chunked_grads[name], g) for name, g in grads.items())


@pytest.mark.parametrize("precision, opts", QUANTIZED)
def test_loss_in_chunks_equals_the_whole_logits_up_to_rounding(precision, opts):
    model, idx = make(precision, opts), tokens(batch=4)
    loss, grads = whole_logits_loss_and_grads(model, idx)
    chunked, chunked_grads = loss_and_grads(model, idx, 14)  # 60 tokens: chunks of 14, 14, 14, 14 and 4
    torch.testing.assert_close(chunked, loss, rtol=1e-6, atol=0)
    for name, g in grads.items():  # elements that cancel to near 0 are judged on the gradient's scale
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-6, atol=1e-6 * g.abs().max().item())


def test_loss_in_chunks_under_bf16_autocast():
    """training.numerics: bf16. One chunk is bit-identical; in several the loss is equal to rounding and the
    gradients are equal up to bf16 rounding (each chunk's bf16 matmuls round on their own)."""
    model, idx = make("W4A4", G16), tokens(batch=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = whole_logits_loss_and_grads(model, idx)
        one, one_grads = loss_and_grads(model, idx, 8192)
        chunked, chunked_grads = loss_and_grads(model, idx, 14)
    assert torch.equal(one, loss) and all(torch.equal(one_grads[name], g) for name, g in grads.items())
    torch.testing.assert_close(chunked, loss, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=0, atol=2**-6 * g.abs().max().item())


def test_chunks_bound_the_logits_kept_for_backward():
    """Bytes saved for the backward pass: with chunks they grow with the tokens by the trunk's activations only,
    without by at least the fp32 logits and their log-softmax (two vocabulary rows per token)."""
    cfg = ModelConfig(vocab_size=8192, n_layers=2, hidden=32, ffn=64, n_heads=4, n_kv_heads=2, seq_len=32)
    model = make(cfg=cfg)

    def saved_bytes(batch: int, chunk: int | None) -> tuple[int, int]:
        sizes = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(idx[:, :-1], idx[:, 1:], chunk)
        loss.backward()
        return sum(sizes), max(sizes)

    row = 4 * cfg.vocab_size  # one token's fp32 logits
    added = 4 * cfg.seq_len  # tokens from a batch of 4 to one of 8
    (small, _), (large, largest) = saved_bytes(4, 32), saved_bytes(8, 32)
    assert largest < 32 * row and (large - small) / added < row / 4
    (small, _), (large, _) = saved_bytes(4, None), saved_bytes(8, None)
    assert (large - small) / added >= 2 * row


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("precision, opts", [("BF16", None), ("W4A4", QuantOptions(group_size="channel")),
                                             ("W4A4-fc2a8", QuantOptions(group_size=16, lac=True))])
def test_activation_checkpointing_trains_bit_identically(precision, opts, bf16):
    """Three AdamW steps with the blocks checkpointed or not (LAC on for the W4A4 runs): the same losses, gradients
    (LAC γ included) and weights, bit for bit; the backward pass runs outside autocast, as in training."""
    numerics = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    trained = {}
    for checkpointing in (False, True):
        model = make(precision, opts)
        model.activation_checkpointing = checkpointing
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        steps = []
        for step in range(3):
            idx = tokens(batch=4, seed=step)
            opt.zero_grad()
            with numerics:
                loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            steps.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
            opt.step()
        trained[checkpointing] = steps, model.state_dict()
    (plain, weights), (checkpointed, checkpointed_weights) = trained[False], trained[True]
    assert any(name.endswith("lac.gamma") for name in weights) == (opts is not None)
    for (loss, grads), (loss_c, grads_c) in zip(plain, checkpointed):
        assert torch.equal(loss, loss_c)
        assert all(torch.equal(grads[name], grads_c[name]) for name in grads)
    assert all(torch.equal(weights[name], checkpointed_weights[name]) for name in weights)


def test_activation_checkpointing_recomputes_only_in_training_with_gradients():
    """Checkpointed blocks start their forward pass twice in a training step (again in the backward pass), once in
    evaluation or without gradients."""
    model, idx = make("W4A4", QuantOptions(group_size="channel")), tokens()
    model.activation_checkpointing = True
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(module.training))
    model(idx[:, :-1], idx[:, 1:]).backward()
    assert calls == [True, True]
    with torch.no_grad():
        model(idx[:, :-1], idx[:, 1:])
    model.eval()
    model(idx[:, :-1], idx[:, 1:]).backward()
    assert calls == [True, True, True, False]
