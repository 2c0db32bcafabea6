"""The token engine: sampling rules, generation equals the plain (uncached) forward pass,
batched generation equals one prompt at a time, stopping, bad prompts, the C step against
the paged reference forward, and the engine's settings (CPU path, device)."""

import pytest
import torch

from parley.config import ConfigError
from parley.engine.config import EngineConfig
from parley.engine.engine import Engine, EngineError, PromptError
from parley.engine.sampling import SamplingParams, Sampler, apply_repetition_penalty, filter_top_k_top_p
from parley.model.transformer import ModelConfig, Transformer


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48)
    model = Transformer(cfg)
    model.init_weights(std=0.2)  # large weights: peaked, prompt-dependent distributions
    return Engine(model)


def greedy_uncached(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_equals_uncached_argmax(engine):
    prompt = [5, 17, 3, 99, 42]
    [out] = engine.generate([prompt], SamplingParams(max_tokens=12))
    assert out.tokens == greedy_uncached(engine.model, prompt, 12)
    assert out.finish_reason == "length"


def test_batched_equals_single_greedy_and_seeded(engine):
    prompts = [[1, 2, 3], [7] * 11, [50, 60, 70, 80, 90, 100], [4]]
    for params in (SamplingParams(max_tokens=10),
                   SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=7)):
        alone = [engine.generate([p], params)[0].tokens for p in prompts]
        together = [c.tokens for c in engine.generate(prompts, params)]
        assert together == alone


def test_rows_with_different_lengths_and_stops_leave_the_batch(engine):
    prompts = [[1, 2, 3], [9, 8, 7, 6]]
    free = engine.generate(prompts, SamplingParams(max_tokens=8))
    stop = free[0].tokens[2]  # make row 0 stop at its third token
    params = [SamplingParams(max_tokens=8, stop_ids={stop}), SamplingParams(max_tokens=5)]
    out = engine.generate(prompts, params)
    assert out[0].tokens == free[0].tokens[:free[0].tokens.index(stop)]
    assert out[0].finish_reason == "stop"
    assert out[1].tokens == free[1].tokens[:5] and out[1].finish_reason == "length"


def test_streaming_yields_tokens_in_order_and_stops_early(engine):
    prompt = [3, 1, 4, 1, 5]
    events = list(engine.stream([prompt], SamplingParams(max_tokens=6)))
    assert [e.token for e in events] == engine.generate([prompt], SamplingParams(max_tokens=6))[0].tokens
    stream = engine.stream([prompt], SamplingParams(max_tokens=6))
    first = next(stream)
    stream.close()  # a consumer may abandon a stream
    assert first.token == events[0].token


def test_generation_stops_at_the_context_length(engine):
    prompt = list(range(1, 45))  # 44 of 48 positions
    [out] = engine.generate([prompt], SamplingParams(max_tokens=100))
    assert len(out.tokens) == 4 and out.finish_reason == "length"


def test_bad_prompts_are_clear_errors(engine):
    with pytest.raises(PromptError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(PromptError, match="context is 48 tokens"):
        engine.generate([list(range(48))], SamplingParams())
    with pytest.raises(PromptError, match="outside the vocabulary"):
        engine.generate([[1, 500]], SamplingParams())


def test_sampling_params_are_validated():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda out: torch.isfinite(out).nonzero().flatten().tolist()
    assert kept(filter_top_k_top_p(logits, 2, 1.0)) == [0, 1]
    assert kept(filter_top_k_top_p(logits, 0, 0.5)) == [0]
    assert kept(filter_top_k_top_p(logits, 0, 0.79)) == [0, 1]
    assert kept(filter_top_k_top_p(logits, 0, 0.81)) == [0, 1, 2]
    assert kept(filter_top_k_top_p(logits, 3, 0.99)) == [0, 1, 2]


def test_repetition_penalty_and_seeded_sampling():
    logits = torch.tensor([2.0, -1.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 1.0]
    params = SamplingParams(temperature=1.0, seed=3)
    a = Sampler(params)
    b = Sampler(params)
    seq_a = [a(torch.zeros(50), torch.zeros(0, dtype=torch.long)) for _ in range(20)]
    seq_b = [b(torch.zeros(50), torch.zeros(0, dtype=torch.long)) for _ in range(20)]
    assert seq_a == seq_b and len(set(seq_a)) > 5  # same seed, same draws; and they vary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_decode_step_equals_reference_forward(dtype):
    """The C decode step on an fp32 path (avx512-fma for fp32 weights; avx2 for bf16 ones, since
    the AVX-512 paths keep bf16 weights' keys and values in bf16, tests/test_fast_families.py)
    computes in fp32 over the model's weights: it must equal the paged reference forward of the
    same (bf16-rounded) weights in fp32, rows of different lengths."""
    from parley.engine.cache import CachedSequence, PagedKVCache
    from parley.engine.fast import FastDecoder

    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=301, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = Transformer(cfg)
    model.init_weights(std=0.1)
    model = model.to(dtype).eval()
    reference = Transformer(cfg).eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    fast = FastDecoder.create(model, path="avx512-fma" if dtype == torch.float32 else "avx2")
    assert fast is not None, "the C kernels failed to build: is a C compiler installed?"
    assert fast.kv_dtype == torch.float32  # these shapes are not whole tiles
    page_bytes = PagedKVCache(cfg, 10**9, 4).page_bytes
    caches = [PagedKVCache(cfg, page_bytes * 40, 4) for _ in range(2)]
    lengths = [9, 5, 2, 9, 7]  # five rows: more than one 4-row block, and a partial one
    prompts = [torch.randint(0, 301, (n,)).tolist() for n in lengths]
    seqs = [[CachedSequence(tokens=list(p), pages=c.allocate(4)) for p in prompts] for c in caches]
    with torch.inference_mode():
        for cache, mine in zip(caches, seqs):
            batch = cache.batch([(q, len(q.tokens)) for q in mine])
            reference(torch.tensor([batch.ids]), batch)
        for step in range(3):
            for a, b in zip(*seqs):
                token = int(torch.randint(0, 301, ()))
                a.tokens.append(token)
                b.tokens.append(token)
            got = fast.step_paged(caches[0].batch([(q, 1) for q in seqs[0]])).clone()
            batch = caches[1].batch([(q, 1) for q in seqs[1]])
            expected = reference(torch.tensor([batch.ids]), batch)[0]
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_fast_argmax_picks_what_torch_argmax_picks(engine):
    """The C argmax the scheduler's greedy rows use: first maximum on ties, NaN as the
    largest, any row subset in any order, vocabularies not a multiple of 16 wide."""
    fast = engine.fast
    torch.manual_seed(3)
    for vocab in (1, 15, 16, 301, 49152):
        logits = torch.randn(9, vocab)
        logits[2] = 0.0                                   # all tied: index 0
        logits[4, vocab // 2:] = logits[4].max() + 1       # a tie: the first of the block
        logits[5, vocab - 1] = float("inf")
        logits[6, vocab // 3] = float("nan")               # torch takes the NaN
        logits[7] = float("-inf")
        rows = [8, 0, 2, 4, 5, 6, 7, 3, 1, 4]
        assert fast.argmax(logits, rows) == logits[rows].argmax(-1).tolist()


def test_engine_fast_and_reference_paths_agree(engine):
    reference = Engine(engine.model, kernels="torch")
    assert engine.fast is not None and reference.fast is None
    prompts = [[1, 2, 3], [7] * 11, [50, 60, 70, 80, 90, 100]]
    params = SamplingParams(max_tokens=10)
    assert [c.tokens for c in engine.generate(prompts, params)] == \
        [c.tokens for c in reference.generate(prompts, params)]


def test_moe_model_generates_on_the_c_path():
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                      num_local_experts=4, num_experts_per_tok=2)
    model = Transformer(cfg)
    model.init_weights(std=0.2)
    moe = Engine(model)
    assert moe.fast is not None  # the C step runs mixtures of experts too (tests/test_fast_families.py)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4]]
    params = SamplingParams(max_tokens=8)
    together = [c.tokens for c in moe.generate(prompts, params)]
    assert together == [moe.generate([p], params)[0].tokens for p in prompts]
    assert together[0] == greedy_uncached(model, prompts[0], 8)


def test_top_p_too_small_to_represent_keeps_the_best_token():
    from parley.engine.sampling import filter_top_k_top_p

    logits = torch.tensor([[1.0, 3.0, 2.0]])
    kept = filter_top_k_top_p(logits, 0, 5e-324)  # rounds to 0 in float32: nothing "reaches" it
    assert torch.isfinite(kept).tolist() == [[False, True, False]]


def test_the_cpu_path_is_a_setting_with_an_environment_override(engine, monkeypatch):
    monkeypatch.delenv("PARLEY_KERNELS", raising=False)
    monkeypatch.delenv("PARLEY_AMX", raising=False)
    assert EngineConfig().resolved_kernels() == "auto"
    assert EngineConfig(kernels="torch").resolved_kernels() == "torch"
    monkeypatch.setenv("PARLEY_AMX", "0")  # the older spelling
    assert EngineConfig().resolved_kernels() == "avx512"
    monkeypatch.setenv("PARLEY_KERNELS", "torch")
    assert EngineConfig(kernels="amx").resolved_kernels() == "torch"
    monkeypatch.setenv("PARLEY_KERNELS", "fast")
    with pytest.raises(ConfigError, match="PARLEY_KERNELS='fast'"):
        EngineConfig().resolved_kernels()
    with pytest.raises(ValueError, match="kernels must be one of"):
        EngineConfig(kernels="sse")
    monkeypatch.setenv("PARLEY_KERNELS", "torch")  # the override reaches an engine built directly too
    assert Engine(engine.model).fast is None
    monkeypatch.delenv("PARLEY_KERNELS")
    monkeypatch.delenv("PARLEY_AMX")
    plain = Engine(engine.model, kernels="avx512")
    assert plain.fast is not None and not plain.fast.amx
    with pytest.raises(EngineError, match="kernels=amx"):
        Engine(engine.model, kernels="amx")  # fp32 weights: never on tiles
    with pytest.raises(EngineError, match="max_batch must be >= 1"):
        Engine(engine.model, max_batch=0)


def test_the_device_is_a_setting(engine, monkeypatch):
    """auto is the GPU when PyTorch sees one, else the CPU; asking for a GPU that is not there
    is a clear error. (The GPU path itself needs a machine with one: see README.)"""
    monkeypatch.delenv("PARLEY_KERNELS", raising=False)  # this test sets the CPU path itself
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert EngineConfig().resolved_device() == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="engine.device=cuda but PyTorch sees no GPU"):
            EngineConfig(device="cuda").resolved_device()
    cfg = EngineConfig(device="cpu", dtype="float32", kernels="torch", max_batch=2, kv_budget_mb=1)
    built = Engine.from_config(engine.model, cfg)
    assert built.device.type == "cpu" and built.fast is None and built.max_batch == 2
    assert built.cache.num_pages * built.cache.page_bytes <= 2**20
    prompt = [5, 17, 3, 99, 42]
    params = SamplingParams(max_tokens=6)
    assert built.generate([prompt], params)[0].tokens == engine.generate([prompt], params)[0].tokens
