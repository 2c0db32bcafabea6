"""LoRA adapters: invisible at init, the only thing training moves, foldable into the base
weights, and saved/loaded on their own."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_job import job_train_config, make_get_batch, tiny_model

from parley.model.lora import LoRALinear, apply_lora, load_lora, lora_state_dict, merge_lora
from parley.train.loop import train
from parley.train.losses import lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def trained_adapter(tmp_path, moe=False, targets=None):
    model = tiny_model(moe=moe)
    params = apply_lora(model, r=4, alpha=8, **({"targets": targets} if targets else {}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = job_train_config(steps=5, save_every=0)
    train(model, cfg, tmp_path, make_get_batch(cfg), lm_loss, params=params, peak_flops=1e12)
    return model, before, params


def test_model_unchanged_at_init_and_names_kept():
    model = tiny_model()
    base_logits, base_names = model(IDS), set(model.state_dict())
    params = apply_lora(model)
    assert torch.equal(model(IDS), base_logits)  # B starts at zero
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert set(model.state_dict()) - base_names == {n for n, _ in model.named_parameters() if "lora_" in n}
    assert len(params) == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


def test_training_moves_only_the_adapters(tmp_path):
    model, before, params = trained_adapter(tmp_path)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != ("lora_" in name), name


def test_gradients_reach_only_adapters():
    model = tiny_model()
    apply_lora(model)
    lm_loss(model, make_get_batch(job_train_config())(0, 0, 0, 1))[0].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("moe", [False, True])
def test_merge_matches_adapter_and_restores_base_layout(tmp_path, moe):
    targets = ("q_proj", "v_proj", "w1", "w2", "w3") if moe else None
    model, before, _ = trained_adapter(tmp_path, moe=moe, targets=targets)
    if moe:
        assert isinstance(model.model.layers[0].block_sparse_moe.experts[0].w2, LoRALinear)
    with torch.no_grad():
        adapted = model(IDS)
        merge_lora(model)
        merged = model(IDS)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    state = model.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in tiny_model(moe=moe).state_dict().items()}
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])


def test_save_and_load_adapter(tmp_path):
    model, _, _ = trained_adapter(tmp_path / "run")
    save_file(lora_state_dict(model), tmp_path / "adapter.safetensors")
    fresh = tiny_model()
    apply_lora(fresh, r=4, alpha=8)
    load_lora(fresh, load_file(tmp_path / "adapter.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), model(IDS))
    other_rank = tiny_model()
    apply_lora(other_rank, r=2, alpha=8)
    with pytest.raises(ValueError, match="another rank"):
        load_lora(other_rank, lora_state_dict(model))
    fewer = tiny_model()
    apply_lora(fewer, r=4, alpha=8, targets=("q_proj",))
    with pytest.raises(ValueError, match="adapter does not fit"):
        load_lora(fewer, lora_state_dict(model))
