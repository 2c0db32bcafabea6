"""Where a burst of requests spends its time, step by step, in the engine driven in process.

    .venv/bin/python benchmarks/probes/steps.py                            # 32 x 130 prompt tokens, 64 new
    .venv/bin/python benchmarks/probes/steps.py --requests 1 --prompt 130  # one row: a batch-1 decode step
    .venv/bin/python benchmarks/probes/steps.py --prefill-budget 1024      # another step budget

The probe behind the in-process figures of RESULTS.md ("what changed" accounts of 2026-11-29):
N distinct prompts of --prompt tokens are submitted at once to an `Engine` on SmolLM2 bf16
(C step; prompt chunks on the C layers where the CPU has AMX tiles), and `step()` is called in
this thread until every request has --new tokens (greedy, end of turn ignored). Each step is
timed alone and counted as a prefill step (it fed prompt tokens, decode rows riding along) or a
decode step. Printed: in-process tok/s (N * new / wall, prefill included), the prefill steps and
their total, the decode steps, their total and median, and the median decode step at the
contexts of the first and last decode steps. No HTTP, no threads: what `serve.py` adds on top
is measured there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # batching.py's prompts
from batching import Prompts  # noqa: E402

from parley.engine.sampling import SamplingParams  # noqa: E402
from parley.engine.engine import Engine  # noqa: E402
from parley.model.tokenizer import Tokenizer  # noqa: E402
from parley.model.weights import load_gguf  # noqa: E402
from parley.registry import smollm2_gguf  # noqa: E402


def run(engine: Engine, prompts: list[list[int]], new: int) -> dict:
    params = SamplingParams(max_tokens=new)  # no stop ids: end of turn does not stop
    handles = [engine.submit(p, params) for p in prompts]
    prefill, decode = [], []
    start = time.perf_counter()
    while not all(h.done for h in handles):
        before = engine.stats()["prefill_tokens"]
        t = time.perf_counter()
        engine.step()
        (prefill if engine.stats()["prefill_tokens"] > before else decode).append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    if any(len(h.tokens) != new for h in handles):
        raise SystemExit("a request ended early: the probe needs every request to reach --new tokens")
    return dict(wall=wall, prefill=prefill, decode=decode, tokens=len(prompts) * new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=130, help="prompt tokens of each request")
    ap.add_argument("--new", type=int, default=64, help="new tokens of each request")
    ap.add_argument("--prefill-budget", type=int, default=512, help="the most prompt tokens a step feeds")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    for name in ("requests", "prompt", "new"):
        if getattr(args, name) < 1:
            sys.exit(f"--{name} must be a positive count (got {getattr(args, name)})")
    if args.prefill_budget < 256:
        sys.exit(f"--prefill-budget must be >= 256, the engine's prompt chunk (got {args.prefill_budget})")
    torch.set_flush_denormal(True)
    path = smollm2_gguf()
    model, _ = load_gguf(path)
    model = model.to(getattr(torch, args.dtype)).eval()
    prompts = Prompts(Tokenizer.from_gguf(path), args.prompt)
    # not `with` (that starts the engine's own thread): this thread calls step()
    engine = Engine(model, max_batch=max(64, args.requests), kv_budget_bytes=512 * 2**20,
                    prefill_budget=args.prefill_budget)
    try:
        run(engine, prompts.take(2), 4)  # warm-up: builds, first touches
        r = run(engine, prompts.take(args.requests), args.new)
    finally:
        engine.close()
    decode_ms = sorted(s * 1000 for s in r["decode"])
    head, tail = r["decode"][:8], r["decode"][-8:]
    print(f"{args.requests} requests x {args.prompt} prompt tokens, {args.new} new, prefill budget "
          f"{args.prefill_budget}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"in process: {r['tokens'] / r['wall']:.1f} tok/s, wall {r['wall']:.2f} s")
    print(f"prefill steps: {len(r['prefill'])}, {sum(r['prefill']):.2f} s, median "
          f"{statistics.median(r['prefill']) * 1000:.1f} ms")
    if decode_ms:
        print(f"decode steps: {len(decode_ms)}, {sum(decode_ms) / 1000:.2f} s, median {statistics.median(decode_ms):.1f} ms; "
              f"median of the first 8 {statistics.median(head) * 1000:.1f} ms (context ~{args.prompt + 1}), "
              f"of the last 8 {statistics.median(tail) * 1000:.1f} ms (context ~{args.prompt + args.new})")


if __name__ == "__main__":
    main()
