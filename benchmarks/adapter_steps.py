"""Where adapters cost time inside the C kernels (engine/fast.py): one prompt step of 4 x 128-token
chunks (4 adapters) and one 32-row decode step (8 adapters, interleaved), each without and with
adapters (rank 8 on all seven projections), on SmolLM2-135M in bf16; alternating, best of --repeats.

    .venv/bin/python benchmarks/adapter_steps.py               # 5 rounds
    .venv/bin/python benchmarks/adapter_steps.py --repeats 2   # a short run

The ratio (time without adapters / time with) of each kind of step says where benchmarks/adapters.py's
end-to-end ratio goes; best-of timings are less sensitive to a loaded machine than medians."""
import argparse
import pathlib
import random
import tempfile
import time

import torch

from adapters import make_adapters
from parley.engine.adapters import Adapters, row_pointers
from parley.engine.cache import CachedSequence, PagedKVCache
from parley.engine.fast import FastDecoder
from parley.model.weights import load_gguf
from parley.registry import smollm2_gguf
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--repeats", type=int, default=5)
args = ap.parse_args()
torch.set_flush_denormal(True)
model = load_gguf(smollm2_gguf())[0].to(torch.bfloat16).eval()
fast = FastDecoder.create(model)
print("path", fast.path, flush=True)
tmp = pathlib.Path(tempfile.mkdtemp())
names = make_adapters(model, tmp, 8, 8)
store = Adapters(model, tmp, base="smollm2")
ads = [store.acquire(n) for n in names]
cfg = model.config
cache = PagedKVCache(cfg, 512 * 2**20, 16, fast.kv_dtype)
rng = random.Random(0)


def seqs(n, length):
    return [CachedSequence(tokens=[rng.randrange(cfg.vocab_size) for _ in range(length)],
                           pages=cache.allocate(cache.pages_for(length + 8))) for _ in range(n)]


prompt = seqs(4, 128)
dec = seqs(32, 129)
with torch.inference_mode():
    fast.step_rows(cache.batch([(q, 128) for q in dec]))  # fill their caches (one big chunk)
    for q in dec:
        q.length = 128

    def prompt_step(lora):
        for q in prompt:
            q.length = 0
        fast.step_rows(cache.batch([(q, 128) for q in prompt]), lora)

    def decode_step(lora):
        for q in dec:
            q.length = 128
        fast.step_paged(cache.batch([(q, 1) for q in dec]), lora)
    plora = row_pointers([ads[i] for i in range(4) for _ in range(128)])
    dlora = row_pointers([ads[i % 8] for i in range(32)])
    best = {}
    for _ in range(args.repeats):
        for name, f, lora in (("prompt", prompt_step, None), ("prompt+lora", prompt_step, plora),
                              ("decode", decode_step, None), ("decode+lora", decode_step, dlora)):
            t = time.perf_counter()
            f(lora)
            best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
    for k, v in best.items():
        print(f"{k}: {1000 * v:.1f} ms")
    print(f"prompt ratio {best['prompt']/best['prompt+lora']:.2f}, decode ratio {best['decode']/best['decode+lora']:.2f}")
