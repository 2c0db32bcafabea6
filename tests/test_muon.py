"""Muon (parley/train/muon.py) in the loop: which tensors it takes, that its Newton-Schulz
step orthogonalizes, that its AdamW half is torch's AdamW, and that a run with it learns and
resumes exactly. The two-process run with Muon is in test_train.py (the torchrun harness)."""

import functools
import math

import pytest
import torch
from safetensors.torch import load_file
from train_job import VOCAB, make_get_batch, job_train_config, tiny_model

from parley.model.lora import apply_lora
from parley.model.transformer import ModelConfig, Transformer
from parley.train.loop import build_optimizer, latest_checkpoint, muon_matrices, train
from parley.train.losses import lm_loss
from parley.train.muon import Muon, orthogonalize
from test_train import fixed_batch, losses

pytestmark = pytest.mark.usefixtures("one_thread")


def _split(model) -> tuple[set[str], set[str]]:
    """(names Muon optimizes, names AdamW optimizes) for optimizer=muon."""
    opt = build_optimizer(model, model.parameters(), job_train_config(optimizer="muon"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    return muon, adamw


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    muon, adamw = _split(tiny_model(moe=True))
    assert not muon & adamw
    assert all(n.startswith("model.layers.") and n.endswith("_proj.weight") or ".experts." in n for n in muon)
    assert sum(".self_attn." in n for n in muon) == 2 * 4 and sum(".experts." in n for n in muon) == 2 * 4 * 3
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.1.input_layernorm.weight"} <= adamw
    assert all("norm" in n or n.endswith(".gate.weight") or n == "model.embed_tokens.weight" for n in adamw)
    dense_muon, _ = _split(tiny_model())
    assert {"model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"} <= dense_muon
    # an untied output head is no hidden matrix either; AdamW decays it as a matrix
    untied = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    opt = build_optimizer(untied, untied.parameters(), job_train_config(optimizer="muon", weight_decay=0.1))
    head = next(g for g in opt.param_groups if any(p is untied.lm_head.weight for p in g["params"]))
    assert not head["muon"] and head["weight_decay"] == 0.1 and head["lr"] == 1e-2
    assert id(untied.lm_head.weight) not in muon_matrices(untied)
    hidden = next(g for g in opt.param_groups if g["muon"])
    assert hidden["lr"] == hidden["peak_lr"] == 0.02 and hidden["weight_decay"] == 0.1
    # LoRA adapters are low-rank factors, not hidden maps: they stay on AdamW
    adapted = tiny_model()
    adapters = apply_lora(adapted, r=2, alpha=4)
    assert adapters and not {id(p) for p in adapters} & muon_matrices(adapted)


def test_adamw_keeps_torch_adamw_and_muon_groups_take_only_matrices():
    adamw = build_optimizer(tiny_model(), tiny_model().parameters(), job_train_config())
    assert type(adamw) is torch.optim.AdamW
    with pytest.raises(ValueError, match="matrices only"):
        Muon([{"params": [torch.nn.Parameter(torch.ones(3))], "muon": True}])


@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (64, 64)])
def test_newton_schulz_output_is_nearly_orthogonal(shape):
    """A matrix whose singular values span 100x comes out with all of them near 1 (the quintic
    leaves them in about [0.7, 1.2], by design), pointing the way U V^T of its SVD does."""
    rows, cols = shape
    k = min(shape)
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    m = 7 * u @ torch.diag(torch.logspace(0, -2, k)) @ v.T
    for dtype in (torch.bfloat16, torch.float32):
        out = orthogonalize(m, dtype=dtype)
        assert out.shape == m.shape and out.dtype == m.dtype
        singular = torch.linalg.svdvals(out)
        assert singular.min() > 0.6 and singular.max() < 1.25
        assert torch.trace(out.T @ (u @ v.T)) / k > 0.85  # cosine with the exact U V^T
    with pytest.raises(ValueError, match="matrix"):
        orthogonalize(torch.ones(2, 3, 4))


def test_adamw_half_of_muon_is_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))
    mine = [p.detach().clone().requires_grad_() for p in (a, b)]
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ours = Muon([{"params": mine[:1], "muon": False, "weight_decay": 0.1},
                 {"params": mine[1:], "muon": False, "weight_decay": 0.0}], **settings)
    ref = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                            foreach=False, **settings)
    for step in range(5):
        grads = [torch.randn_like(a), torch.randn_like(b)]
        for p, q, grad in zip((a, b), mine, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        ref.step()
        ours.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip((a, b), mine))


def test_muon_step_is_nesterov_momentum_then_orthogonalized_and_scaled():
    """Each step moves a (48, 16) matrix by -lr * sqrt(48 / 16) * orthogonalize(g + mu * buf),
    where buf = mu * buf + g: Nesterov momentum. A wide matrix is not scaled."""
    torch.manual_seed(0)
    tall, wide = torch.nn.Parameter(torch.zeros(48, 16)), torch.nn.Parameter(torch.zeros(16, 48))
    opt = Muon([{"params": [tall, wide]}], lr=0.1, momentum=0.5, ns_dtype=torch.float32)
    g1, g2 = torch.randn(48, 16), torch.randn(48, 16)
    for g in (g1, g2):
        tall.grad, wide.grad = g.clone(), g.T.clone()
        opt.step()
    ortho = functools.partial(orthogonalize, dtype=torch.float32)
    updates = ortho(1.5 * g1) + ortho(g2 + 0.5 * (0.5 * g1 + g2))
    assert torch.allclose(tall.detach(), -0.1 * math.sqrt(3) * updates, atol=1e-5)
    assert torch.allclose(wide.detach(), -0.1 * updates.T, atol=1e-5)


def test_a_tiny_model_learns_with_muon(tmp_path):
    cfg = job_train_config(steps=40, warmup_steps=5, save_every=0, optimizer="muon")
    final = train(tiny_model(), cfg, tmp_path, fixed_batch, lm_loss, peak_flops=1e12)
    first = losses(tmp_path)[1]
    assert first == pytest.approx(math.log(VOCAB), rel=0.05)
    assert final["loss"] < 0.5 * first


@pytest.mark.parametrize("moe", [False, True])  # MoE: experts without tokens in a step have no gradient
def test_muon_run_resumes_exactly_on_cpu(tmp_path, moe):
    settings = dict(steps=8, save_every=4, optimizer="muon", device="cpu", grad_accum=2, batch_size=2)
    cfg = job_train_config(**settings)
    train(tiny_model(moe), cfg, tmp_path / "whole", make_get_batch(cfg), lm_loss, peak_flops=1e12)
    # steps 0-3 are warm-up and the peak in both schedules; then a model of other weights resumes the half run
    train(tiny_model(moe), job_train_config(**{**settings, "steps": 4}), tmp_path / "half", make_get_batch(cfg),
          lm_loss, peak_flops=1e12)
    resumed = tiny_model(moe, seed=1)  # everything must come from the checkpoint
    train(resumed, cfg, tmp_path / "half", make_get_batch(cfg), lm_loss, resume=True, peak_flops=1e12)
    assert sorted(losses(tmp_path / "half")) == list(range(1, 9))
    assert losses(tmp_path / "half") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)
    a = load_file(latest_checkpoint(tmp_path / "half") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "whole") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    state = torch.load(latest_checkpoint(tmp_path / "half") / "trainer.pt", weights_only=True)["optimizer"]
    assert any("momentum_buffer" in s for s in state["state"].values())
