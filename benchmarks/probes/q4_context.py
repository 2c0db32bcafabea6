"""Probe: what the context costs a batch-1 decode step on the int8 path. SmolLM2-135M-Instruct's own Q4_1
GGUF kept (16-row layout), one row at 16, 128, 256 and 512 tokens of context, on two decoders: keys and
values in fp32 (the int8 paths' default) and in bf16 (engine.kv_dtype=bfloat16); 20 steps a round after
20 to warm up, each case going first in turn; medians of 30 rounds (q4_step.rotated_medians). The weights
a step reads are the same at every context: what grows is attention (keys and values of 30 layers, 3 kv
heads of 64 dims).

    .venv/bin/python benchmarks/probes/q4_context.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from q4_step import Case, rotated_medians  # noqa: E402
from record import cpu_name  # noqa: E402

from parley.engine.fast import FastDecoder  # noqa: E402
from parley.model import weights  # noqa: E402
from parley.model.weights import load_gguf  # noqa: E402
from parley.registry import smollm2_gguf  # noqa: E402

torch.set_flush_denormal(True)
path = smollm2_gguf()
model = weights.keep_gguf_blocks(load_gguf(path)[0], path).to(torch.bfloat16)
decoders = {kv: FastDecoder.create(model, kv=kv) for kv in ("auto", "bfloat16")}
cases = {(decoder.kv_dtype, context): Case(decoder, 1, context, 16)
         for decoder in decoders.values() for context in (16, 128, 256, 512)}
medians = rotated_medians(cases, 1, 30)
print(f"{cpu_name(flags=True)}; {torch.get_num_threads()} threads; path {decoders['auto'].path}")
for (kv, context), m in medians.items():
    print(f"keys and values {str(kv)[6:]:8}  context {context:4}: {m * 1e3:.3f} ms a step")
