"""The model on its own: the paged forward (inference) equals the uncached one (training,
reference), chunk by chunk and with several sequences packed in one row; MoE routing and its
auxiliary loss. (Equality with `transformers` is in test_weights.py,
which goes through real checkpoint files.)"""

import pytest
import torch

from parley.engine.cache import CachedSequence, CacheError, PagedKVCache
from parley.model.transformer import ModelConfig, Transformer, load_balancing_loss


def tiny(**overrides) -> Transformer:
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**cfg, **overrides}))
    model.init_weights(std=0.1)
    return model.eval()


def paged(model, page_size=4, pages=32) -> PagedKVCache:
    probe = PagedKVCache(model.config, 10**9, page_size)
    return PagedKVCache(model.config, probe.page_bytes * pages, page_size)


def feed(model, cache, feeds):
    """One paged forward over [(sequence, tokens to feed)]: the logits of each feed's last token."""
    batch = cache.batch(feeds)
    return model(torch.tensor([batch.ids]), batch)[0]


@pytest.mark.parametrize("moe", [False, True])
def test_paged_decoding_equals_uncached(moe):
    model = tiny(num_local_experts=4 if moe else 0)
    ids = torch.randint(0, 97, (1, 12))
    full = model(ids)[0]
    cache = paged(model)
    seq = CachedSequence(tokens=ids[0].tolist(), pages=cache.allocate(3))
    got = [feed(model, cache, [(seq, 5)])] + [feed(model, cache, [(seq, 1)]) for _ in range(5, 12)]
    torch.testing.assert_close(torch.cat(got), full[4:], atol=1e-5, rtol=1e-5)


def test_chunked_prefill_into_pages_equals_uncached():
    model = tiny()
    ids = torch.randint(0, 97, (1, 12))
    cache = paged(model)
    seq = CachedSequence(tokens=ids[0].tolist(), pages=cache.allocate(3))
    got = torch.cat([feed(model, cache, [(seq, n)]) for n in (4, 5, 3)])
    torch.testing.assert_close(got, model(ids)[0, [3, 8, 11]], atol=1e-5, rtol=1e-5)


def test_sequences_packed_in_one_row_equal_single_rows():
    """Prompts of different lengths prefilled together, then decoded together: each row's logits
    are those of its own uncached forward."""
    model = tiny()
    prompts = [torch.randint(0, 97, (n,)) for n in (3, 9, 6)]
    nxt = torch.randint(0, 97, (3, 4))
    cache = paged(model)
    seqs = [CachedSequence(tokens=(p.tolist() + nxt[i].tolist()), pages=cache.allocate(4)) for i, p in enumerate(prompts)]
    steps = [feed(model, cache, [(s, len(p)) for s, p in zip(seqs, prompts)])]
    steps += [feed(model, cache, [(s, 1) for s in seqs]) for _ in range(3)]
    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, nxt[i]])[None])[0]
        got = torch.stack([logits[i] for logits in steps])
        torch.testing.assert_close(got, alone[len(p) - 1:len(p) + 3], atol=1e-5, rtol=1e-5)


def test_context_limit_and_overfeeding_a_sequence_are_clear_errors():
    model = tiny(max_position_embeddings=8)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = paged(model)
    seq = CachedSequence(tokens=[1] * 6, pages=cache.allocate(1))
    with pytest.raises(CacheError, match="cannot feed 5 tokens"):
        cache.batch([(seq, 5)])  # 5 tokens but one page of 4


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
