"""Continuous batching over a paged KV cache. Every request, however it shares steps with
others (joining mid-stream, chunked prefill, pages reused from an earlier turn, a tight
memory budget), gets exactly the tokens it gets alone (an engine with max_batch=1)."""

import asyncio
import random
import threading

import pytest
import torch

from parley.engine.cache import CachedSequence, CacheError, PagedKVCache
from parley.engine.engine import Engine, EngineClosed, EngineError, PromptError, QueueFull, StepFailed
from parley.engine.sampling import SamplingParams
from parley.model.transformer import ModelConfig, Transformer

CONTEXT = 160


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT)
    model = Transformer(cfg)
    model.init_weights(std=0.2)  # large weights: peaked, prompt-dependent distributions
    return model.eval()


@pytest.fixture(scope="module")
def engine(model):
    """The reference: one request at a time."""
    return Engine(model, max_batch=1)


_alone: dict = {}


def alone(engine, prompt, params):
    """(tokens, finish_reason) of the prompt generated alone (memoized)."""
    key = (id(engine.model), tuple(prompt), repr(params))
    if key not in _alone:
        [c] = engine.generate([prompt], params)
        _alone[key] = c.tokens, c.finish_reason
    return _alone[key]


def prompts(n, seed=0, longest=70):
    rng = random.Random(seed)
    return [[rng.randrange(101) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def run_staggered(batched, requests, lag=4):
    """One client thread per request. The first `lag` requests are queued before the
    batched starts (so they surely share steps); request i >= lag is submitted from its
    thread once request i - lag has its first token, joining a batch already decoding."""
    first = [threading.Event() for _ in requests]
    results = [None] * len(requests)
    early = [batched.submit(p, sp) for p, sp in requests[:lag]]
    batched.start()

    def client(i, prompt, params):
        try:
            if i >= lag:
                first[i - lag].wait()
            handle = early[i] if i < lag else batched.submit(prompt, params)
            tokens = []
            for event in handle:
                first[i].set()
                if event.token is not None:
                    tokens.append(event.token)
            results[i] = (tokens, handle.finish_reason)
        finally:  # a failing client must not leave the next one waiting forever
            first[i].set()

    threads = [threading.Thread(target=client, args=(i, p, sp)) for i, (p, sp) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("fast", [True, False], ids=["C-decode", "pytorch-decode"])
def test_32_concurrent_greedy_requests_each_equal_their_answer_alone(model, engine, fast):
    requests = [(p, SamplingParams(max_tokens=8 + i % 13)) for i, p in enumerate(prompts(32))]
    with Engine(model, max_batch=64, prefill_chunk=24, page_size=8, kernels="auto" if fast else "torch") as batched:
        assert (batched.fast is not None) == fast
        results = run_staggered(batched, requests, lag=6)
        stats = batched.stats()
    assert results == [alone(engine, p, sp) for p, sp in requests]
    assert stats["finished"] == 32 and stats["pages_used"] == 0 and stats["peak_running"] >= 6
    assert stats["decode_tokens"] == sum(len(tokens) for tokens, _ in results)


def test_seeded_sampling_and_stop_tokens_equal_alone(model, engine):
    requests = []
    for i, p in enumerate(prompts(12, seed=1)):
        params = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95, top_k=40, seed=i,
                                repetition_penalty=1.0 if i % 2 else 1.3)
        requests.append((p, params))
    free = [alone(engine, p, sp)[0] for p, sp in requests]
    # two requests stop early at a token they would otherwise emit
    for i in (3, 8):
        p, sp = requests[i]
        requests[i] = (p, SamplingParams(**{**sp.__dict__, "stop_ids": {free[i][4]}}))
    with Engine(model, prefill_chunk=16) as batched:
        results = run_staggered(batched, requests, lag=3)
    assert results == [alone(engine, p, sp) for p, sp in requests]
    assert results[3][1] == results[8][1] == "stop"


def test_chunked_prefill_of_a_long_prompt_while_others_decode(model, engine):
    rng = random.Random(2)
    long_prompt = [rng.randrange(101) for _ in range(150)]
    requests = [(p, SamplingParams(max_tokens=30)) for p in prompts(4, seed=3, longest=10)]
    requests.insert(2, (long_prompt, SamplingParams(max_tokens=9)))
    with Engine(model, prefill_chunk=8, page_size=4) as batched:
        results = run_staggered(batched, requests, lag=2)
        assert batched.stats()["prefill_tokens"] >= 150
    assert results == [alone(engine, p, sp) for p, sp in requests]


def test_a_long_prefill_delays_running_streams_by_at_most_one_chunk_per_step(model, engine):
    batched = Engine(model, prefill_chunk=8, prefill_budget=8, page_size=4)
    short = batched.submit([4, 5, 6], SamplingParams(max_tokens=40))
    batched.step()
    long = batched.submit([7 * i % 101 for i in range(100)], SamplingParams(max_tokens=5))
    late = batched.submit([9, 9], SamplingParams(max_tokens=40))
    steps = -(-100 // 8)
    for step in range(1, steps + 1):
        batched.step()
        # the running stream gains a token every step; prompts wait their turn in FIFO order
        assert len(short.tokens) == step + 1
        assert batched.stats()["prefill_tokens"] == 3 + min(8 * step, 100) + 2 * (step == steps)
        assert len(long.tokens) == len(late.tokens) == (step == steps)
    batched.start()
    for handle in (short, long, late):
        assert (handle.wait() and handle.tokens, handle.finish_reason) == \
            alone(engine, handle.prompt, handle.params)
    batched.close()


def test_a_burst_of_short_prompts_is_prefilled_several_to_a_step_within_the_budget(model, engine):
    batched = Engine(model, prefill_chunk=8, prefill_budget=20, page_size=4)
    burst = [batched.submit([7 * i + j for j in range(6)], SamplingParams(max_tokens=6)) for i in range(4)]
    long = batched.submit(list(range(30)), SamplingParams(max_tokens=6))
    batched.step()  # three 6-token prompts fit in 20 tokens; the fourth waits for whole room
    assert batched.stats()["prefill_tokens"] == 18
    assert [len(h.tokens) for h in burst] == [1, 1, 1, 0] and not long.tokens
    batched.step()  # the fourth prompt, then the first 8-token chunk of the long one: 6 + 8 <= 20
    assert batched.stats()["prefill_tokens"] == 18 + 6 + 8
    batched.start()
    for handle in (*burst, long):
        assert (handle.wait() and handle.tokens, handle.finish_reason) == alone(engine, handle.prompt, handle.params)
    batched.close()
    with pytest.raises(EngineError, match="prefill_budget must be >= prefill_chunk"):
        Engine(model, prefill_chunk=64, prefill_budget=32)


def test_cancelling_mid_stream_frees_pages_and_leaves_others_unaffected(model, engine):
    others = [(p, SamplingParams(max_tokens=20)) for p in prompts(5, seed=4)]
    victim_prompt = [5, 6, 7, 8, 9] * 6
    expected = [alone(engine, p, sp) for p, sp in others]
    batched = Engine(model, page_size=8)  # stepped by hand: the cancel lands at a known step
    pages_at_start = batched.stats()["pages_free"]
    victim = batched.submit(victim_prompt, SamplingParams(max_tokens=100))
    handles = [batched.submit(p, sp) for p, sp in others]
    abandoned = batched.submit([2, 3], SamplingParams(max_tokens=100))
    reading = iter(abandoned)
    for _ in range(3):
        batched.step()
    used = batched.stats()["pages_used"]
    victim.cancel()
    next(reading)
    reading.close()  # a client that stops reading: its request is cancelled too
    batched.step()
    assert victim.finish_reason == abandoned.finish_reason == "cancelled"
    assert victim.tokens == alone(engine, victim_prompt, SamplingParams(max_tokens=3))[0]
    assert [e.finish_reason for e in victim][-1] == "cancelled"
    freed = used - batched.stats()["pages_used"]
    assert freed == batched.cache.pages_for(30 + 100) + batched.cache.pages_for(2 + 100)
    with batched:
        assert [(h.wait() and h.tokens, h.finish_reason) for h in handles] == expected
        stats = batched.stats()
    assert stats["pages_used"] == 0 and stats["pages_free"] == pages_at_start
    assert stats["cancelled"] == 2 and stats["running"] == 0


def test_async_consumers_and_a_client_that_disconnects(model, engine):
    requests = [(p, SamplingParams(max_tokens=12)) for p in prompts(6, seed=5)]
    expected = [alone(engine, p, sp) for p, sp in requests]
    batched = Engine(model)  # stepped from a worker thread by the event loop's driver below

    async def consume(handle):
        return [event async for event in handle.events()]

    async def main():
        handles = [batched.submit(p, sp) for p, sp in requests]
        readers = [asyncio.create_task(consume(h)) for h in handles]
        quitter = batched.submit([1] * 40, SamplingParams(max_tokens=100))
        disconnected = asyncio.create_task(consume(quitter))
        while not all(h.done for h in handles + [quitter]):
            if len(quitter.tokens) >= 2 and not disconnected.done():
                disconnected.cancel()  # the client went away, as a server sees it
            await asyncio.to_thread(batched.step)
        return handles, [await r for r in readers], quitter

    handles, events, quitter = asyncio.run(main())
    assert [([e.token for e in ev if e.token is not None], ev[-1].finish_reason) for ev in events] == expected
    assert quitter.finish_reason == "cancelled" and 2 <= len(quitter.tokens) < 100
    assert batched.stats()["pages_used"] == 0


def test_a_small_kv_budget_makes_requests_wait_not_fail(model, engine):
    requests = [(p, SamplingParams(max_tokens=25)) for p in prompts(10, seed=6, longest=40)]
    page_bytes = PagedKVCache(model.config, 10**9, 8).page_bytes
    with Engine(model, page_size=8, kv_budget_bytes=page_bytes * 24) as batched:
        needed = sum(batched.cache.pages_for(len(p) + sp.max_tokens) for p, sp in requests)
        assert batched.stats()["pages_total"] == 24 < needed
        results = run_staggered(batched, requests, lag=10)  # all at once
    assert results == [alone(engine, p, sp) for p, sp in requests]


def test_queue_full_prompt_errors_and_impossible_requests(model):
    batched = Engine(model, max_waiting=3, kv_budget_bytes=PagedKVCache(model.config, 10**9, 16).page_bytes * 4)
    waiting = [batched.submit([1, 2, 3], SamplingParams(max_tokens=4)) for _ in range(3)]
    with pytest.raises(QueueFull) as full:
        batched.submit([1, 2, 3], SamplingParams(max_tokens=4))
    assert full.value.retry_after >= 1
    with pytest.raises(PromptError, match=f"context is {CONTEXT} tokens"):
        batched.submit(list(range(1, 101)) * 2, SamplingParams())
    with pytest.raises(PromptError, match="empty"):
        batched.submit([], SamplingParams())
    with pytest.raises(PromptError, match="outside the vocabulary"):
        batched.submit([1, 500], SamplingParams())
    with pytest.raises(PromptError, match="the engine holds 64"):
        batched.submit([1] * 60, SamplingParams(max_tokens=10))
    batched.close()  # never started: the waiting requests end cancelled
    assert [h.finish_reason for h in waiting] == ["cancelled"] * 3
    assert [e.finish_reason for e in waiting[0]] == ["cancelled"]
    with pytest.raises(EngineClosed, match="shut down"):
        batched.submit([1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(EngineError, match="max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(CacheError, match="holds no page"):
        Engine(model, kv_budget_bytes=100)


def test_the_next_turn_reuses_the_cached_history(model, engine):
    first = prompts(1, seed=7, longest=40)[0] + [3] * 20  # 21..60 tokens
    params = SamplingParams(max_tokens=12)
    with Engine(model, page_size=8) as batched:
        answer = batched.submit(first, params)
        list(answer)
        assert (answer.tokens, answer.finish_reason) == alone(engine, first, params)
        assert batched.stats()["reused_tokens"] == 0
        second = first + answer.tokens + [11, 12, 13, 14, 15]
        reply = batched.submit(second, params)
        list(reply)
        stats = batched.stats()
    cached = len(first) + len(answer.tokens) - 1  # the last answer token was never fed
    assert stats["reused_tokens"] == cached // 8 * 8 > 0
    assert stats["prefill_tokens"] == len(first) + len(second) - stats["reused_tokens"]
    assert (reply.tokens, reply.finish_reason) == alone(engine, second, params)


def test_cached_prompt_pages_are_shared_only_within_one_cache_salt(model, engine):
    """A server salts each user's requests: another user's identical prompt prefills anew
    (nothing to time), the same user's reuses the pages, and every answer is as alone."""
    prompt = prompts(1, seed=5, longest=40)[0] + [7] * 24
    with Engine(model, page_size=8) as batched:
        def reused(salt: str) -> int:
            before = batched.stats()["reused_tokens"]
            request = batched.submit(prompt, SamplingParams(max_tokens=4, cache_salt=salt))
            list(request)
            assert request.tokens == alone(engine, prompt, SamplingParams(max_tokens=4))[0]
            return batched.stats()["reused_tokens"] - before

        assert reused("user-1") == 0
        assert reused("user-2") == 0  # the same tokens under another salt: no page in common
        assert reused("user-1") == (len(prompt) - 1) // 8 * 8 > 0
        assert reused("") == 0 and reused("") > 0  # unsalted requests share among themselves


def test_page_cache_counts_refs_and_evicts_least_recently_used(model):
    cache = PagedKVCache(model.config, PagedKVCache(model.config, 10**9, 4).page_bytes * 4, page_size=4)
    a = CachedSequence(tokens=list(range(12)), pages=cache.allocate(3), length=12)
    cache.publish(a)
    cache.release(a)
    assert cache.pages_used == 0 and cache.pages_cached == 3
    b = CachedSequence(tokens=list(range(10)) + [99])
    assert cache.match(b, len(b.tokens) - 1) == 8 and cache.pages_used == 2
    with pytest.raises(CacheError, match="3 pages wanted but only 2"):
        cache.allocate(3)
    c = cache.allocate(2)  # the never-used page, then the cached page b does not hold
    assert cache.pages_cached == 0 and len(set(c) | set(b.pages)) == 4
    cache.release(b)
    assert cache.match(CachedSequence(tokens=list(range(12))), 11) == 8  # b's pages are still named


def test_paged_c_decode_step_equals_the_paged_reference_forward(model):
    """Rows of different lengths, pages scattered through the pool: the C step and the
    model's forward over the same pages give the same logits and store the same keys."""
    from parley.engine.fast import FastDecoder

    fast = FastDecoder.create(model)
    assert fast is not None, "the C kernels failed to build: is a C compiler installed?"
    page_bytes = PagedKVCache(model.config, 10**9, 4).page_bytes
    caches = [PagedKVCache(model.config, page_bytes * 64, page_size=4) for _ in range(2)]
    rows = prompts(5, seed=9, longest=30)
    rng = random.Random(0)
    pages = rng.sample(range(64), 64)
    seqs = [[], []]
    for cache, mine in zip(caches, seqs):
        taken = iter(pages)
        for p in rows:
            seq = CachedSequence(tokens=list(p), pages=[next(taken) for _ in range(cache.pages_for(len(p) + 3))])
            with torch.inference_mode():
                batch = cache.batch([(seq, len(p))])
                model(torch.tensor([batch.ids]), batch)
            mine.append(seq)
    with torch.inference_mode():
        for _ in range(3):
            for a, b in zip(*seqs):
                token = rng.randrange(101)
                a.tokens.append(token)
                b.tokens.append(token)
            got = fast.step_paged(caches[0].batch([(q, 1) for q in seqs[0]])).clone()
            batch = caches[1].batch([(q, 1) for q in seqs[1]])
            expected = model(torch.tensor([batch.ids]), batch)[0]
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    for k0, k1 in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(k0, k1, atol=1e-5, rtol=1e-5)


def test_a_moe_model_is_served_on_the_c_path():
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                      num_local_experts=4, num_experts_per_tok=2)
    moe = Transformer(cfg)
    moe.init_weights(std=0.2)
    requests = [([1, 2, 3], SamplingParams(max_tokens=8)), ([5] * 20, SamplingParams(max_tokens=8))]
    with Engine(moe, prefill_chunk=8, page_size=4) as batched:
        assert batched.fast is not None  # the C step runs mixtures of experts too
        results = run_staggered(batched, requests, lag=2)
    assert results == [alone(Engine(moe, max_batch=1), p, sp) for p, sp in requests]


def test_stepping_in_the_callers_thread_reuses_the_conversation_and_frees_on_abandon(model, engine):
    """With no thread of its own (the terminal), the engine steps in the thread that reads: the
    same tokens; the next turn of a conversation prefills only what is new; leaving the
    iteration early frees the request's pages at once."""
    local = Engine(model, page_size=4, max_batch=8)
    batch = prompts(3, seed=8, longest=30)
    params = SamplingParams(max_tokens=12)
    got = local.generate(batch, params)
    assert [(c.tokens, c.finish_reason) for c in got] == [alone(engine, p, params) for p in batch]
    turn1 = batch[0] + got[0].tokens
    turn2 = turn1 + [5, 6, 7]
    before = local.stats()["prefill_tokens"]
    request = local.submit(turn2, params)
    assert ([e.token for e in request if e.token is not None], request.finish_reason) == alone(engine, turn2, params)
    assert local.stats()["reused_tokens"] >= len(turn1) // 4 * 4 - 4  # whole pages of turn 1
    assert local.stats()["prefill_tokens"] - before <= len(turn2) - len(turn1) + 4
    for event in local.stream([batch[1]], SamplingParams(max_tokens=40)):
        break  # the caller stops listening after one token
    assert local.stats()["running"] == 0 and local.stats()["pages_used"] == 0
    with pytest.raises(PromptError):
        next(local.stream([batch[0], []], params))
    assert local.stats()["waiting"] == 0  # a bad prompt among several starts none of them


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(model, engine):
    local = Engine(model, page_size=4)
    doomed = local.submit([1, 2, 3], SamplingParams(max_tokens=5))
    real = local._compute
    local._compute = lambda: (_ for _ in ()).throw(RuntimeError("out of memory"))  # every step breaks now
    with pytest.raises(StepFailed, match="out of memory"):
        list(doomed)
    local._compute = real
    assert doomed.finish_reason == "error" and local.stats()["pages_used"] == 0
    params = SamplingParams(max_tokens=5)
    [after] = local.generate([[1, 2, 3]], params)
    assert (after.tokens, after.finish_reason) == alone(engine, [1, 2, 3], params)


def test_a_channel_defers_wake_ups_to_the_end_of_a_step_and_reports_a_closed_loop():
    from parley.engine.channel import Channel

    plain = Channel()
    plain.put(1)
    plain.put(2)
    assert (plain.get(), plain.get(), plain.empty()) == (1, 2, True)
    gone = []
    channel = Channel(gone=lambda: gone.append(True))
    loop = asyncio.new_event_loop()
    reader = loop.create_task(channel.aget())
    loop.run_until_complete(asyncio.sleep(0))  # the reader now waits on its loop
    wakes: dict = {}
    channel.put("a", wakes)
    loop.run_until_complete(asyncio.sleep(0))
    assert not reader.done() and list(wakes) == [loop]  # noted, not woken yet
    Channel.wake(wakes)
    assert loop.run_until_complete(reader) == "a"
    loop.close()
    channel.put("b")  # nobody can read any more: the channel says so
    assert gone == [True]
