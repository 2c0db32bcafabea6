"""The model on its own: cached decoding equals uncached, padded batches equal single rows,
MoE routing and its auxiliary loss. (Equality with `transformers` is in test_weights.py,
which goes through real checkpoint files.)"""

import pytest
import torch

from parley.model.transformer import KVCache, ModelConfig, Transformer, load_balancing_loss


def tiny(**overrides) -> Transformer:
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**cfg, **overrides}))
    model.init_weights(std=0.1)
    return model.eval()


@pytest.mark.parametrize("moe", [False, True])
def test_cached_decoding_equals_uncached(moe):
    model = tiny(num_local_experts=4 if moe else 0)
    ids = torch.randint(0, 97, (1, 12))
    full = model(ids)
    cache = KVCache(model.config, 1, 12, torch.float32)
    parts = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_into_cache_equals_uncached():
    model = tiny()
    ids = torch.randint(0, 97, (1, 12))
    cache = KVCache(model.config, 1, 12, torch.float32)
    out = torch.cat([model(ids[:, :4], cache), model(ids[:, 4:9], cache), model(ids[:, 9:], cache)], 1)
    torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_single_rows():
    model = tiny()
    prompts = [torch.randint(0, 97, (n,)) for n in (3, 9, 6)]
    longest = 9
    ids = torch.zeros(3, longest, dtype=torch.long)
    mask = torch.zeros(3, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):], mask[i, longest - len(p):] = p, True
    cache = KVCache(model.config, 3, longest + 4, torch.float32)
    batch_logits = [model(ids, cache, token_mask=mask)[:, -1]]
    nxt = torch.randint(0, 97, (3, 4))
    for t in range(4):
        batch_logits.append(model(nxt[:, t:t + 1], cache)[:, -1])
    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, nxt[i]])[None])[0]
        expected = alone[len(p) - 1:]
        got = torch.stack([b[i] for b in batch_logits])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cache_overflow_and_context_limit_are_clear_errors():
    model = tiny(max_position_embeddings=8)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = KVCache(model.config, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


def test_moe_routes_tokens_to_experts_and_exposes_balancing_loss():
    model = tiny(num_local_experts=4, num_experts_per_tok=2).train()
    ids = torch.randint(0, 97, (4, 16))
    logits, router_logits = model(ids, return_router_logits=True)
    assert len(router_logits) == 2 and router_logits[0].shape == (64, 4)
    counts = torch.bincount(router_logits[0].topk(2).indices.flatten(), minlength=4)
    assert (counts > 0).sum() >= 2  # tokens spread over several experts
    aux = load_balancing_loss(router_logits, 4, 2)
    assert aux.item() >= 1.0 - 1e-5  # 1.0 is perfectly balanced; more is worse
    # the loss is differentiable back to the routers and experts receive gradient
    (logits.logsumexp(-1).mean() + 0.01 * aux).backward()
    assert model.model.layers[0].block_sparse_moe.gate.weight.grad.abs().sum() > 0
    used = [e.w1.weight.grad is not None and e.w1.weight.grad.abs().sum() > 0
            for e in model.model.layers[0].block_sparse_moe.experts]
    assert sum(used) >= 2


def test_balancing_loss_is_one_when_uniform_and_grows_when_collapsed():
    uniform = torch.zeros(8, 4)
    uniform[torch.arange(8), torch.arange(8) % 4] = 5.0
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 5.0
    assert load_balancing_loss([collapsed], 4, 1) > load_balancing_loss([uniform], 4, 1)


def test_config_validation_and_param_counts():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3, hidden_size=64)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"hidden_size": 64, "n_layer": 3})
    for moe in (0, 4):
        model = tiny(num_local_experts=moe, tie_word_embeddings=False)
        assert model.config.num_params() == sum(p.numel() for p in model.parameters())
    moe = tiny(num_local_experts=4, num_experts_per_tok=2).config
    assert moe.num_params(active=True) < moe.num_params()
