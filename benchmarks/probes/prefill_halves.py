"""Probe: where a long prompt's time goes in the C layers off the tiles. SmolLM2 in bf16, one
1,200-token prompt in 512-token chunks through FastDecoder.step_rows (tiles=False; the path
float_isa picks, or `path` as the first argument: avx512-bf16, avx512-fma, avx2), timed by C call:
prompt_qkv (norm, q/k/v, rotation, keys and values stored), chunks_attend, prompt_mlp (o
projection, norm, gate/up, down).

    .venv/bin/python benchmarks/probes/prefill_halves.py [path]
"""
import sys
import time

import torch

from parley.engine.cache import CachedSequence, PagedKVCache
from parley.engine.fast import FastDecoder
from parley.model.weights import load_gguf
from parley.registry import smollm2_gguf

N, CHUNK = 1200, 512
model = load_gguf(smollm2_gguf())[0].to(torch.bfloat16).eval()
fast = FastDecoder.create(model, tiles=False, path=sys.argv[1] if len(sys.argv) > 1 else "auto")
times = {"prompt_qkv": 0.0, "chunks_attend": 0.0, "prompt_mlp": 0.0}
lib = fast.lib


class Timed:
    """The kernels library with the three calls timed."""

    def __getattr__(self, name):
        call = getattr(lib, name)
        if name not in times:
            return call

        def timed(*args):
            t = time.perf_counter()
            call(*args)
            times[name] += time.perf_counter() - t
        return timed


fast.lib = Timed()
cache = PagedKVCache(model.config, 2**28, 16, fast.kv_dtype)
seq = CachedSequence(tokens=[100 + i % 4000 for i in range(N)], pages=list(range(cache.pages_for(N))))
t = time.perf_counter()
with torch.inference_mode():
    for done in range(0, N, CHUNK):
        fast.step_rows(cache.batch([(seq, min(CHUNK, N - done))]))
        seq.length = min(done + CHUNK, N)
total = time.perf_counter() - t
print(f"path {fast.path}, {torch.get_num_threads()} threads: {N} tokens in {total:.2f} s; "
      + ", ".join(f"{name} {s:.2f} s ({s / total:.0%})" for name, s in times.items()))
