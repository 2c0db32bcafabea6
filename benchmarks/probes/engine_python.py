"""Probe: the engine's Python around a batch-1 decode step. SmolLM2-135M-Instruct's own Q4_1 GGUF kept,
an Engine at max_batch 1, `generate` of 1,001 tokens after a 128-token prompt minus that of 1 token,
per step, with the decoder's C call replaced by a stub that returns a fixed logits row (so only the
engine's scheduling, sampling and delivery remain), and then step_paged itself with only its C call
made a no-op (its own Python back: batch table, buffers, embedding, cache pointers, shape).

    .venv/bin/python benchmarks/probes/engine_python.py
"""
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from decode import prompts  # noqa: E402

from parley.engine.engine import Engine  # noqa: E402
from parley.engine.sampling import SamplingParams  # noqa: E402
from parley.model import weights  # noqa: E402
from parley.model.tokenizer import Tokenizer  # noqa: E402
from parley.model.weights import load_gguf  # noqa: E402
from parley.registry import smollm2_gguf  # noqa: E402

path = smollm2_gguf()
[prompt] = prompts(Tokenizer.from_gguf(path), 1, 128)
model = weights.keep_gguf_blocks(copy.deepcopy(load_gguf(path)[0]), path).to(torch.bfloat16)
engine = Engine(model, max_batch=1)
fast = engine.fast
logits = torch.zeros(1, model.config.vocab_size)
logits[0, 5] = 1  # never a stop token: every request runs to its length


def seconds(new: int) -> float:
    engine.cache.drop_cached()
    t = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=new))
    return time.perf_counter() - t


class NoDecodeCall:
    """The decoder's library with its decode call made a no-op: step_paged's own Python still runs."""

    def __init__(self, lib):
        self.lib = lib

    def __getattr__(self, name):
        return (lambda *args: None) if name == "decode_step_paged" else getattr(self.lib, name)


real_step, real_lib = fast.step_paged, fast.lib
for name, stub, lib in (("the engine's Python a step", lambda batch, lora=None: logits, real_lib),
                        ("... with step_paged's own Python", real_step, NoDecodeCall(real_lib))):
    fast.step_paged, fast.lib = stub, lib
    seconds(8)
    runs = sorted((seconds(1001) - seconds(1)) / 1000 for _ in range(3))
    print(f"{name}: {runs[1] * 1e6:.1f} us (median of 3)")
