"""The C layers on AMX tiles (engine/fast.py, kernels.c): bf16 weights, activations rounded
to bf16 at each projection, bf16 keys and values. They must stay within bf16 precision of
the fp32 reference forward, give every row the same bits whatever it is batched with, and
so give each request of the engine the tokens it gets alone. The
layer-by-layer prompt path (step_rows) is also checked on fp32 weights, where it runs the
plain C projections and must equal the reference forward."""

import random

import pytest
import torch

from parley.engine.cache import CachedSequence, PagedKVCache
from parley.engine.engine import Engine
from parley.engine.fast import FastDecoder
from parley.engine.sampling import SamplingParams
from parley.model.transformer import ModelConfig, Transformer

# every size a whole number of tiles: inputs multiples of 32, outputs of 16, head_dim 32
CFG = ModelConfig(vocab_size=304, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)


def tile_model(dtype=torch.bfloat16) -> Transformer:
    torch.manual_seed(3)
    model = Transformer(CFG)
    model.init_weights(std=0.08)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def tiles():
    fast = FastDecoder.create(tile_model())
    assert fast is not None, "the C kernels failed to build: is a C compiler installed?"
    if not fast.amx:
        pytest.skip("this CPU (or kernel) offers no AMX tiles: the tile path is not used here")
    return fast


def test_tile_decode_step_stays_within_bf16_precision_of_fp32(tiles):
    """Against the fp32 reference forward (fp32 weights of the same values, fp32 cache):
    the roundings to bf16 (projection inputs, keys, values, queries in q.k) move logits
    by about 1% of their scale and do not change which token is best."""
    ref = Transformer(CFG).eval()
    ref.load_state_dict({k: v.float() for k, v in tiles.model.state_dict().items()})
    assert tiles.kv_dtype == torch.bfloat16
    lengths = [40, 31, 5, 40, 10]  # rows of different lengths, pages scattered through the pools
    cache, ref_cache = PagedKVCache(CFG, 2**24, 8, torch.bfloat16), PagedKVCache(CFG, 2**25, 8, torch.float32)
    seqs, ref_seqs = paged_rows(cache, lengths, seed=0), paged_rows(ref_cache, lengths, seed=0)
    with torch.inference_mode():
        for pool, rows in ((cache, seqs), (ref_cache, ref_seqs)):
            batch = pool.batch([(q, len(q.tokens)) for q in rows])
            ref(torch.tensor([batch.ids]), batch)
        for step in range(4):
            tokens = torch.randint(0, CFG.vocab_size, (len(lengths),), generator=torch.Generator().manual_seed(step))
            for q, r, t in zip(seqs, ref_seqs, tokens.tolist()):
                q.tokens.append(t)
                r.tokens.append(t)
            got = tiles.step_paged(cache.batch([(q, 1) for q in seqs])).clone()
            batch = ref_cache.batch([(q, 1) for q in ref_seqs])
            expected = ref(torch.tensor([batch.ids]), batch)[0]
            scale = expected.abs().max()
            assert (got - expected).abs().max() < 0.015 * scale
            assert (got - expected).abs().mean() < 0.002 * scale
            assert torch.equal(got.argmax(-1), expected.argmax(-1))


def paged_rows(cache: PagedKVCache, lengths: list[int], seed: int) -> list[CachedSequence]:
    """Sequences of the given lengths with their pages scattered through the pool."""
    rng = random.Random(seed)
    free = rng.sample(range(cache.num_pages), cache.num_pages)
    seqs = []
    for n in lengths:
        pages = [free.pop() for _ in range(cache.pages_for(n + 8))]
        seqs.append(CachedSequence(tokens=[rng.randrange(CFG.vocab_size) for _ in range(n)], pages=pages))
    return seqs


def test_a_rows_logits_do_not_depend_on_its_batch(tiles):
    """Bit for bit: a row decoded alone, among 20 others, or riding along a prompt chunk."""
    cache = PagedKVCache(CFG, 2**26, 8, torch.bfloat16)
    seqs = paged_rows(cache, [random.Random(i).randint(3, 90) for i in range(21)], seed=1)
    with torch.inference_mode():
        for seq in seqs:  # prefill all but each row's last token
            tiles.step_rows(cache.batch([(seq, len(seq.tokens) - 1)]))

        def decode(rows, extra_prompt=None):
            for seq in rows:
                seq.length = len(seq.tokens) - 1
            feeds = [(seq, 1) for seq in rows]
            if extra_prompt is not None:
                extra_prompt.length = 0
                batch = cache.batch(feeds + [(extra_prompt, len(extra_prompt.tokens))])
                return tiles.step_rows(batch)[:len(rows)].clone()
            return tiles.step_paged(cache.batch(feeds)).clone()

        together = decode(seqs)
        alone = torch.cat([decode([seq]) for seq in seqs])
        assert torch.equal(together, alone)
        [prompt] = paged_rows(cache, [50], seed=2)
        riding = decode(seqs[:7], extra_prompt=prompt)
        assert torch.equal(riding, alone[:7])


def test_prompt_layers_equal_the_reference_forward_in_fp32():
    """step_rows with fp32 weights (the plain C projections, fp32 pages): prompt chunks
    continued over two steps, with one-token rows riding along, equal the model's forward."""
    model = tile_model(torch.float32)
    fast = FastDecoder.create(model)
    assert fast is not None and not fast.amx and fast.kv_dtype == torch.float32
    caches = [PagedKVCache(CFG, 2**26, 8, torch.float32) for _ in range(2)]
    rows = [paged_rows(cache, [30, 45, 12], seed=4) for cache in caches]
    with torch.inference_mode():
        for step, cut in enumerate(([10, 20, 11], [20, 25, 1])):  # the third row decodes in step 2
            feeds = [[(seq, n) for seq, n in zip(mine, cut)] for mine in rows]
            if step == 1:  # one-token feeds first, as the engine orders them
                feeds = [[f[2], f[0], f[1]] for f in feeds]
            got = fast.step_rows(caches[0].batch(feeds[0])).clone()
            batch = caches[1].batch(feeds[1])
            expected = model(torch.tensor([batch.ids]), batch)[0]
            torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)
    for k0, k1 in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(k0, k1, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [4, 6], ids=["2-heads-a-kv-head", "3-heads-a-kv-head"])
def test_tile_prompt_chunks_stay_within_bf16_precision_of_fp32(tiles, heads):
    """step_rows on tiles (chunk attention in C: keys . queries 16 x 16 a tile, causal per
    row) against the fp32 reference forward: prompts in chunks over two steps (the second
    chunk attends to the first), rows not a whole block, one-token rows riding along."""
    cfg = ModelConfig(**{**CFG.__dict__, "num_attention_heads": heads, "hidden_size": 32 * heads})
    torch.manual_seed(4)
    model = Transformer(cfg)
    model.init_weights(std=0.08)
    model = model.to(torch.bfloat16).eval()
    ref = Transformer(cfg).eval()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    fast = FastDecoder.create(model)
    assert fast.amx and fast.kv_dtype == torch.bfloat16
    # as many pages in each (the same scattered pages and tokens from paged_rows)
    caches = [PagedKVCache(cfg, 2**26 // (4 // dtype.itemsize), 16, dtype) for dtype in (torch.bfloat16, torch.float32)]
    rows = [paged_rows(cache, [70, 45, 23, 6], seed=6) for cache in caches]
    with torch.inference_mode():
        for step, cut in enumerate(([37, 19, 22, 5], [33, 26, 1, 1])):  # rows 3 and 4 decode in step 2
            feeds = [[(seq, n) for seq, n in zip(mine, cut)] for mine in rows]
            if step == 1:  # one-token feeds first, as the engine orders them
                feeds = [[f[2], f[3], f[0], f[1]] for f in feeds]
            got = fast.step_rows(caches[0].batch(feeds[0])).clone()
            batch = caches[1].batch(feeds[1])
            expected = ref(torch.tensor([batch.ids]), batch)[0]
            scale = expected.abs().max()
            assert (got - expected).abs().max() < 0.015 * scale
            assert (got - expected).abs().mean() < 0.002 * scale
            assert torch.equal(got.argmax(-1), expected.argmax(-1))


def assert_cuts_change_no_bit(fast: FastDecoder, page_size: int) -> None:
    """The last token's logits of a 150-token prompt are the same bits however it is fed (in
    one go, in chunks of any size, a token at a time, its last token as a decode row)."""
    tokens = [random.Random(9).randrange(fast.cfg.vocab_size) for _ in range(150)]

    def last_logits(cuts):
        cache = PagedKVCache(fast.cfg, 2**24, page_size, fast.kv_dtype)
        seq = CachedSequence(tokens=tokens, pages=list(range(cache.pages_for(len(tokens)))))
        with torch.inference_mode():
            for n in cuts:
                batch = cache.batch([(seq, n)])
                logits = (fast.step_rows(batch) if n > 1 else fast.step_paged(batch))[-1].clone()
        return logits

    whole = last_logits([150])
    for cuts in ([149, 1], [48, 48, 48, 6], [1, 1, 1, 100, 47], [37, 90, 22, 1], [7] * 21 + [3]):
        assert torch.equal(last_logits(cuts), whole), cuts


@pytest.mark.parametrize("page_size", [16, 8], ids=["key-tiles", "one-key-at-a-time"])
def test_where_a_prompt_is_cut_changes_no_bit(tiles, page_size):
    """The engine cuts prompts wherever a step's budget ends on this path: the last
    token's logits must be the same bits however the prompt was fed."""
    assert_cuts_change_no_bit(tiles, page_size)


def test_scheduled_requests_get_the_tokens_they_get_alone_on_tiles(tiles):
    """24 greedy requests at once, with prompt chunks split across steps and decode rows
    riding along them, each get exactly the tokens the same engine gives them alone."""
    rng = random.Random(5)
    requests = [[rng.randrange(CFG.vocab_size) for _ in range(rng.randint(1, 70))] for _ in range(24)]
    params = SamplingParams(max_tokens=12)
    tokens = lambda handle: [e.token for e in handle if e.token is not None]
    # two engines: the second must not reuse the first one's cached prompts
    with Engine(tiles.model, max_batch=64, prefill_chunk=48, page_size=8) as engine:
        alone = [tokens(engine.submit(p, params)) for p in requests]
    with Engine(tiles.model, max_batch=64, prefill_chunk=48, page_size=8) as engine:
        handles = [engine.submit(p, params) for p in requests]
        together = [tokens(h) for h in handles]
        assert engine.stats()["peak_running"] > 8
    assert together == alone
    assert len({tuple(t) for t in alone}) > 12  # the answers differ: the check has teeth


def test_weights_and_pages_move_to_huge_pages_unchanged():
    from parley.engine.hugepages import HUGE, huge_zeros, move_to_huge_pages

    model = Transformer(ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    model.init_weights(std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        expected = model(ids)
    moved = move_to_huge_pages(model)
    assert moved >= sum(p.numel() * 4 for p in model.parameters() if p.dim() >= 2)
    assert move_to_huge_pages(model) == 0  # once
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    first = min(p.data_ptr() for p in model.parameters() if p.dim() >= 2)
    assert first % HUGE == 0
    with torch.inference_mode():
        assert torch.equal(model(ids), expected)
    model.to(torch.bfloat16)  # new tensors, in ordinary pages: they move again
    assert move_to_huge_pages(model) == pytest.approx(moved / 2, rel=0.01)
    pool = huge_zeros((3, 5, 7), torch.bfloat16)
    assert pool.shape == (3, 5, 7) and pool.dtype == torch.bfloat16 and not pool.any()
    assert pool.data_ptr() % HUGE == 0
    pool[1, 2, 3] = 2.5  # writable
    assert pool.sum().item() == 2.5
