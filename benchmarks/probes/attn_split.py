"""Probe: a batch-1 decode step with its attention shared by (row, kv head) against the same step with it
shared in three phases (kernels.c's attend_for, `split_attn`: spans of positions, query heads, spans of head
dims), on SmolLM2-135M-Instruct (3 kv heads: on 2 threads the first way leaves one thread idle a third of
attention's time) and Gemma 3 270M (1 kv head: one thread idle all of it). Three models: the Q4_1 GGUF's blocks kept (keys and values fp32, the int8 paths' default)
the weights in bf16 (the packed AVX-512 paths, keys and values bf16), and Gemma 3's Q4_K_M file's blocks kept; one row at 16, 256, 512 and 1,024 tokens of
context; 20 steps a round after 20 to warm up, each case going first in turn, medians of 30 rounds
(q4_step.rotated_medians), both ways on one decoder (split_attn 0 and 1; the default, -1, takes the phases
where rows x kv heads leave threads idle and a row sees at least 512 positions, which this probe's figures
decided: kernels.c's SPLIT_SEEN). The two ways give the same bits (tests/test_kernel_paths.py).

    .venv/bin/python benchmarks/probes/attn_split.py
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
from parley.registry import gemma3_gguf, smollm2_gguf  # noqa: E402

torch.set_flush_denormal(True)
path = smollm2_gguf()
dequantized = load_gguf(path)[0].to(torch.bfloat16)
models = {"q4 kept": weights.keep_gguf_blocks(load_gguf(path)[0], path).to(torch.bfloat16), "bf16": dequantized}
gemma = gemma3_gguf()  # Gemma 3 270M: 4 query heads on 1 kv head, so at batch 1 one thread has no attention to do
models["gemma3 kept"] = weights.keep_gguf_blocks(load_gguf(gemma)[0], gemma).to(torch.bfloat16)


class Way:
    """One Case's steps (its decoder, its cache) run with the decoder's split_attn set to `split`: both ways
    on the same decoder and the same pages, since each decoder holds copies of the weights (packed or
    interleaved) and each cache pages of its own, which could place their bytes differently."""

    def __init__(self, case: Case, split: int):
        self.case, self.split = case, split

    def step(self, rows: int) -> None:
        self.case.fast.split_attn = self.split
        self.case.step(rows)


cases, paths = {}, {}
for name, model in models.items():
    decoder = FastDecoder.create(model)
    paths[name] = f"{decoder.path}, keys and values {str(decoder.kv_dtype)[6:]}"
    for context in (16, 256, 512, 1024):
        case = Case(decoder, 1, context, 16)
        for split in (0, 1):
            cases[(name, context, split)] = Way(case, split)
medians = rotated_medians(cases, 1, 30)
print(f"{cpu_name(flags=True)}; {torch.get_num_threads()} threads")
for name in models:
    for context in (16, 256, 512, 1024):
        apart, phases = medians[(name, context, 0)], medians[(name, context, 1)]
        print(f"{name:11} ({paths[name]})  context {context:3}: by (row, kv head) {apart * 1e3:.3f} ms, "
              f"in phases {phases * 1e3:.3f} ms a step ({apart / phases:.3f}x)")
