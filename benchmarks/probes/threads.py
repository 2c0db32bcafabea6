"""Two OS threads that both run torch's OpenMP work in one process: how much a decode slows down.

    .venv/bin/python benchmarks/probes/threads.py               # 8 requests of 100 + 64 tokens, batch 1
    .venv/bin/python benchmarks/probes/threads.py --requests 2 --new 16

The probe behind "Why the server was at 2.7x" in RESULTS.md (2026-11-28, commit 98b5404). The
engine decodes requests one at a time, stepped on the main thread (SmolLM2 bf16, greedy, prefill
included) in three cases, in this order: alone; while a second, started engine idles on its own
thread after serving one short request (its thread has then built its own OpenMP team, as
`parley serve`'s engine thread does); and after that engine's `close()`. Each case prints tok/s.
On a 2-core machine, two teams that each spin while waiting for work halve the speed; that is
why a server runs every thread but the engine's single-threaded (Engine `threads=`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # batching.py's prompts
from batching import Prompts  # noqa: E402

from parley.engine.engine import Engine  # noqa: E402
from parley.engine.sampling import SamplingParams  # noqa: E402
from parley.model.tokenizer import Tokenizer  # noqa: E402
from parley.model.weights import load_gguf  # noqa: E402
from parley.registry import smollm2_gguf  # noqa: E402


def rate(engine: Engine, prompts: list[list[int]], new: int) -> float:
    params = SamplingParams(max_tokens=new)
    start = time.perf_counter()
    for prompt in prompts:
        [done] = engine.generate([prompt], params)
        assert len(done.tokens) == new
    return len(prompts) * new / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=8, help="requests per case, one at a time")
    ap.add_argument("--prompt", type=int, default=100, help="prompt tokens of each request")
    ap.add_argument("--new", type=int, default=64, help="new tokens of each request")
    args = ap.parse_args()
    for name in ("requests", "prompt", "new"):
        if getattr(args, name) < 1:
            sys.exit(f"--{name} must be a positive count (got {getattr(args, name)})")
    torch.set_flush_denormal(True)
    path = smollm2_gguf()
    model, _ = load_gguf(path)
    model = model.to(torch.bfloat16).eval()
    engine = Engine(model, max_batch=1)
    prompts = Prompts(Tokenizer.from_gguf(path), args.prompt)
    rate(engine, prompts.take(1), 4)  # warm-up: kernels built, pages touched
    print(f"{torch.get_num_threads()} torch threads; Engine batch 1, {args.requests} requests of "
          f"{args.prompt} + {args.new} tokens per case")
    print(f"alone:                          {rate(engine, prompts.take(args.requests), args.new):6.1f} tok/s")
    other = Engine(model, max_batch=8, kv_budget_bytes=64 * 2**20).start()
    try:
        handle = other.submit(prompts.take(1)[0], SamplingParams(max_tokens=4))
        handle.wait()  # the other engine's thread has run OpenMP work; now it idles
        print(f"beside an idle engine thread:   {rate(engine, prompts.take(args.requests), args.new):6.1f} tok/s")
    finally:
        other.close()
    print(f"after the other's close():      {rate(engine, prompts.take(args.requests), args.new):6.1f} tok/s")


if __name__ == "__main__":
    main()
