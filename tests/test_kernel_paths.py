"""The projections of float weights off the AMX tiles (kernels.c's F_* paths: AVX512-BF16 dot
products, AVX-512 and AVX2 FMAs, portable C), each path this CPU runs: against a float64
product, a row's bits the same whatever it is batched with, and through the engine (prompt
chunks and decode rows in C) the tokens a request gets alone. tests/test_fast_families.py runs
every model family on these paths against the reference forward; the last test here builds the
kernels for an AVX2 CPU (no AVX-512 outside their own functions) and runs this file on it."""

import ctypes
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parley.engine.cache import CachedSequence, PagedKVCache
from parley.engine.engine import Engine
from parley.engine.fast import FLOAT_CEILING, FLOAT_ISAS, FastDecoder, kernels, pack_float
from parley.engine.sampling import SamplingParams
from parley.model.transformer import ModelConfig, Transformer
from test_tiles import assert_cuts_change_no_bit

PATHS = ("avx512-bf16", "avx512-fma", "avx2", "scalar")


def level(path: str) -> int:
    return FLOAT_CEILING[path] if path in FLOAT_CEILING else FLOAT_ISAS.index(path)


def runnable(path: str) -> bool:
    lib = kernels()
    return lib is not None and lib.float_isa(level(path)) == level(path)


EACH_PATH = [pytest.param(p, marks=pytest.mark.skipif(not runnable(p), reason=f"this CPU cannot run {p}"))
             for p in PATHS]
# each path with each layout of the weights it reads: the AVX-512 paths read the layers' packed
# copies (fast.py's pack_float) and the experts of a mixture as the model holds them
EACH_KERNEL = [pytest.param(p, packed, marks=pytest.mark.skipif(not runnable(p), reason=f"this CPU cannot run {p}"),
                            id=f"{p}-{'packed' if packed else 'as-held'}")
               for p in PATHS for packed in ((True, False) if p.startswith("avx512") else (False,))]


def linear(path: str, w: torch.Tensor, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """x @ w.T by kernels.c's float_linear on `path`, from w packed (pack_float) or as it is."""
    B, I = x.shape
    y, xb = torch.empty(B, w.shape[0]), torch.empty(B * I, dtype=torch.int16)
    W = pack_float(w) if packed else w
    kernels().float_linear(W.data_ptr(), int(w.dtype == torch.bfloat16), level(path), int(packed), x.data_ptr(),
                           xb.data_ptr(), y.data_ptr(), B, I, w.shape[0], 0)
    return y


# (outputs, inputs, rows): outputs not a multiple of 4 or 16, an odd number of 16-output panels, a
# whole one; inputs odd, not a multiple of 32, 16 or 8, and a wide layer's; rows past a block of 8
SIZES = [(23, 101, 9), (37, 64, 17), (48, 97, 8), (16, 3, 1), (40, 576, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path, packed", EACH_KERNEL)
def test_each_path_computes_the_product(path, packed, dtype):
    """Sizes off every block: within fp32 rounding of a float64 product, of the inputs rounded to
    bf16 where the path rounds them (bf16 weights on AVX512-BF16)."""
    torch.manual_seed(0)
    rounds = path == "avx512-bf16" and dtype == torch.bfloat16
    for O, I, B in SIZES:
        w, x = torch.randn(O, I).to(dtype), torch.randn(B, I)
        exact = (x.bfloat16() if rounds else x).double() @ w.double().t()
        got = linear(path, w, x, packed)
        assert (got.double() - exact).abs().max() < 1e-5 * exact.abs().max(), (O, I, B)
        if rounds and I > 3:  # and the rounding is what moves it from the fp32 inputs' product
            assert (got.double() - x.double() @ w.double().t()).abs().max() > 1e-4 * exact.abs().max()


@pytest.mark.parametrize("path, packed", EACH_KERNEL)
def test_a_rows_bits_do_not_depend_on_its_batch(path, packed):
    torch.manual_seed(1)
    for dtype, (O, I, B) in ((torch.bfloat16, (36, 96, 11)), (torch.bfloat16, (50, 77, 19)), (torch.float32, (50, 77, 19))):
        w, x = torch.randn(O, I).to(dtype), torch.randn(B, I)
        together = linear(path, w, x, packed)
        for b in range(B):
            assert torch.equal(linear(path, w, x[b:b + 1].clone(), packed)[0], together[b]), (dtype, b)
        assert torch.equal(linear(path, w, x[3:12].clone(), packed), together[3:12])  # a block of 8 from row 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_lie_as_the_kernels_read_them(dtype):
    """pack_float: panel p, input pair k (fp32: input k), output j of the panel, and for bf16 the
    pair's input t at [p, k, j, t]; outputs past O and the input past an odd I are zero."""
    w = torch.arange(1, 1 + 19 * 5, dtype=torch.float32).view(19, 5).to(dtype)
    packed = pack_float(w)
    pairs = 2 if dtype == torch.bfloat16 else 1
    assert packed.shape == (2, -(-5 // pairs), 16, pairs)
    for p in range(2):
        for j in range(16):
            for i in range(packed.shape[1] * pairs):
                o, want = 16 * p + j, 0.0
                if o < 19 and i < 5:
                    want = w[o, i].item()
                assert packed[p, i // pairs, j, i % pairs].item() == want, (p, j, i)


CFG = ModelConfig(vocab_size=304, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)


def bf16_model() -> Transformer:
    torch.manual_seed(3)
    model = Transformer(CFG)
    model.init_weights(std=0.08)
    return model.to(torch.bfloat16).eval()


@pytest.mark.parametrize("path", EACH_PATH)
def test_where_a_prompt_is_cut_changes_no_bit(path):
    """The engine cuts prompts of bf16 weights wherever a step's budget ends on every C path: the
    last token's logits are the same bits however the prompt is fed (test_tiles.py's check)."""
    fast = FastDecoder.create(bf16_model(), tiles=False, path=path)
    assert fast.path == path.removesuffix("-fma") and fast.all_rows
    assert fast.packed == path.startswith("avx512")
    # the packed paths keep keys and values in bf16, as the tiles do (their 16-key scoring widens them)
    assert fast.kv_dtype == (torch.bfloat16 if fast.packed else torch.float32)
    assert_cuts_change_no_bit(fast, 8)


@pytest.mark.parametrize("path", EACH_PATH)
def test_attention_shared_in_phases_changes_no_bit(path):
    """Decode rows' attention shared among the threads in three phases (kernels.c's attend_for with
    split_attn: spans of positions, query heads, spans of head dims) gives the bits of the one loop by
    (row, kv head): for rows of several lengths at once, and against a prompt fed in chunks."""
    fast = FastDecoder.create(bf16_model(), tiles=False, path=path)
    rng = random.Random(11)
    prompts = [[rng.randrange(CFG.vocab_size) for _ in range(n)] for n in (150, 37, 3)]

    def step(split):
        fast.split_attn = split
        cache = PagedKVCache(fast.cfg, 2**24, 8, fast.kv_dtype)
        seqs, at = [], 0
        for tokens in prompts:
            n = cache.pages_for(len(tokens))
            seqs.append(CachedSequence(tokens=tokens, pages=list(range(at, at + n))))
            at += n
        with torch.inference_mode():
            fast.step_rows(cache.batch([(s, len(s.tokens) - 1) for s in seqs]))
            return fast.step_paged(cache.batch([(s, 1) for s in seqs])).clone()

    apart = step(0)
    assert torch.equal(step(1), apart) and torch.equal(step(-1), apart)
    fast.split_attn = 1
    assert_cuts_change_no_bit(fast, 8)


def test_attention_takes_the_phases_where_threads_would_idle_on_long_rows():
    """split_attn -1 (the default): phases where the (row, kv head) pairs leave threads idle and a row
    sees 512 positions or more; 1 always but on the tiles; 0 never."""
    decide = kernels().attend_splits  # (split, tiles, pairs, threads, most positions a row sees)
    decide.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_int, ctypes.c_long]
    assert decide(-1, 0, 3, 2, 512) and decide(-1, 0, 1, 2, 4000) and decide(-1, 0, 3, 16, 600)
    assert not decide(-1, 0, 3, 2, 511)  # short rows: the two extra barriers a layer cost more
    assert not decide(-1, 0, 4, 2, 4000) and not decide(-1, 0, 9, 2, 4000)  # every thread busy, or nearly
    assert not decide(-1, 0, 3, 1, 4000) and not decide(-1, 1, 3, 2, 4000)  # one thread; the tiles
    assert decide(1, 0, 24, 2, 1) and not decide(1, 1, 3, 2, 1) and not decide(0, 0, 3, 2, 4000)


# the engine's settings and the path each runs on this CPU at most
ENGINE_PATHS = [pytest.param(setting, marks=pytest.mark.skipif(not runnable(path), reason=f"no {path} here"))
                for setting, path in (("avx512", "avx512-fma"), ("avx2", "avx2"), ("scalar", "scalar"))]


@pytest.mark.parametrize("path", ENGINE_PATHS)
def test_scheduled_requests_get_the_tokens_they_get_alone(path, monkeypatch):
    """kernels=<path> (the setting the engine, the startup line and /health name): 16 greedy
    requests at once, prompts cut across steps beside decode rows, each get the tokens they get
    alone."""
    monkeypatch.delenv("PARLEY_KERNELS", raising=False)
    model, rng = bf16_model(), random.Random(5)
    requests = [[rng.randrange(CFG.vocab_size) for _ in range(rng.randint(1, 60))] for _ in range(16)]
    params = SamplingParams(max_tokens=8)
    tokens = lambda handle: [e.token for e in handle if e.token is not None]
    with Engine(model, max_batch=32, prefill_budget=48, prefill_chunk=48, page_size=8, kernels=path) as engine:
        assert engine.kernels_path in (path, "avx512-bf16" if path == "avx512" else path)
        alone = [tokens(engine.submit(p, params)) for p in requests]
    with Engine(model, max_batch=32, prefill_budget=48, prefill_chunk=48, page_size=8, kernels=path) as engine:
        handles = [engine.submit(p, params) for p in requests]
        together = [tokens(h) for h in handles]
        assert engine.stats()["peak_running"] > 4
    assert together == alone
    assert len({tuple(t) for t in alone}) > 8  # the answers differ: the check has teeth


@pytest.mark.slow
@pytest.mark.skipif(not runnable("avx2"), reason="this CPU cannot run an AVX2 build")
def test_an_avx2_build_runs_every_path_it_can(tmp_path):
    """The kernels compiled for an AVX2 CPU (-march=haswell: a laptop's build; AVX-512 only in the
    functions with their own target attributes), into a cache of their own: this file's tests."""
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\nexec cc "$@" -march=haswell\n')  # the last -march wins over -march=native
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    script = "from parley.engine.fast import kernels; print(kernels().float_isa(9))"
    best = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert best.stdout.strip() == "1", "an AVX2 build's best float path is AVX2"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "not avx2_build"], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "skipped" in done.stdout  # the AVX-512 paths do not exist in that build
