"""Probe: what the context costs a batch-1 decode step on the int8 path. SmolLM2-135M-Instruct's own Q4_1
GGUF kept (16-row layout), one decoder, one row at 16, 128, 256 and 512 tokens of context (keys and
values in the decoder's kv_dtype: fp32 on the int8 paths), 20 steps a round, each context going first
in turn; medians of 30 rounds. The weights a step reads are the same at every context: what grows is
attention (keys and values of 30 layers, 3 kv heads of 64 dims).

    .venv/bin/python benchmarks/probes/q4_context.py
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from q4_step import Case  # noqa: E402
from record import cpu_name  # noqa: E402

from parley.engine.fast import FastDecoder  # noqa: E402
from parley.model import weights  # noqa: E402
from parley.model.weights import load_gguf  # noqa: E402
from parley.registry import smollm2_gguf  # noqa: E402

torch.set_flush_denormal(True)
path = smollm2_gguf()
model = weights.keep_gguf_blocks(load_gguf(path)[0], path).to(torch.bfloat16)
decoder = FastDecoder.create(model)
cases = {context: Case(decoder, 1, context, 16) for context in (16, 128, 256, 512)}
times = {context: [] for context in cases}
order = list(cases)
with torch.inference_mode():
    for r in range(30):
        for context in order[r % len(order):] + order[:r % len(order)]:
            t = time.perf_counter()
            for _ in range(20):
                cases[context].step(1)
            times[context].append((time.perf_counter() - t) / 20)
print(f"{cpu_name(flags=True)}; {torch.get_num_threads()} threads; path {decoder.path}; keys and values {decoder.kv_dtype}")
for context, t in times.items():
    print(f"context {context:4}: {statistics.median(t) * 1e3:.3f} ms a step")
