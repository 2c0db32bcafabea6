"""Probe: what the adapters' term costs on the C kernels, apart from scheduling. SmolLM2 in bf16,
8 random rank-8 adapters (benchmarks/adapters.py's), 32 sequences: prefill 64 tokens each
(4 calls of 8 sequences through step_rows) and 32-row decode steps (step_paged), each with no
adapter and with every row on one of the 8 adapters (4 rows each).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probes/adapter_term.py
"""
import time, torch, tempfile, pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
torch.set_flush_denormal(True); torch.set_num_threads(1)
from adapters import make_adapters
from parley.engine.adapters import Adapters, row_pointers
from parley.engine.engine import Engine
from parley.model.weights import load_gguf
from parley.registry import smollm2_gguf
model, _ = load_gguf(smollm2_gguf()); model = model.to(torch.bfloat16).eval()
tmp = pathlib.Path(tempfile.mkdtemp())
names = make_adapters(model, tmp, 8, 8)
store = Adapters(model, tmp, base="smollm2")
ads = [store.acquire(n) for n in names]
eng = Engine(model, kv_budget_bytes=256 * 2**20, adapters=store)
fast = eng.fast
print("path", eng.kernels_path, flush=True)
from parley.engine.cache import CachedSequence
seqs = [CachedSequence(tokens=list(range(100 + i, 164 + i))) for i in range(32)]
for s in seqs:
    s.pages += eng.cache.allocate(eng.cache.pages_for(200))
lora = row_pointers([ads[i % 8] for i in range(32)])
# prefill 64 tokens each via step_rows (alternate)
def prefill(l):
    for s in seqs: s.length = 0
    t = time.perf_counter()
    for i in range(0, 32, 8):
        b = eng.cache.batch([(s, 64) for s in seqs[i:i+8]])
        fast.step_rows(b, None if l is None else row_pointers([ads[j % 8] for j in range(i, i+8) for _ in range(64)]))
    return time.perf_counter() - t
def decode(l, steps=5):
    t = time.perf_counter()
    for k in range(steps):
        for s in seqs: s.tokens.append(7)
        fast.step_paged(eng.cache.batch([(s, 1) for s in seqs]), l)
    return (time.perf_counter() - t) / steps
for rep in range(2):
    print("prefill 32x64 base %.3f s, lora %.3f s" % (prefill(None), prefill(lora)), flush=True)
    print("decode step x32 base %.4f s, lora %.4f s" % (decode(None), decode(lora)), flush=True)
