"""Many LoRA adapters in one batch: 32 streams over 8 adapters against 32 streams of the base
model, on SmolLM2-135M through the engine (engine/adapters.py), and each adapter row against
the same request served alone with its adapter.

    .venv/bin/python benchmarks/adapters.py                # the full case: print the table
    .venv/bin/python benchmarks/adapters.py --quick        # a short run (shorter prompts and answers)
    .venv/bin/python benchmarks/adapters.py --write        # also append the table to RESULTS.md

The adapters are random (rank --rank on all seven projections of every layer, B drawn small
so that answers change), written as `parley learn user=NAME` writes one. Each case sends
--streams distinct --prompt-token prompts, greedy, --new tokens each; tokens/s = streams * new
/ wall time from the first submit to the last token (prefill included). The two cases run on
one engine, alternating, --repeats times (median). Then every adapter stream is served alone
(max_batch=1) and its tokens must equal those it got in the batch."""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from batching import Prompts
from record import append_section, commit, cpu_name

from parley.engine.adapters import Adapters
from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.model.lora import apply_lora, save_adapter
from parley.model.tokenizer import Tokenizer
from parley.model.weights import load_gguf
from parley.registry import smollm2_gguf


def make_adapters(model, folder: Path, count: int, rank: int) -> list[str]:
    names, m = [], copy.deepcopy(model)  # one copy: each adapter draws new A and B into its layers
    apply_lora(m, r=rank, alpha=2 * rank)
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(("lora_A", "lora_B")):
                    p.copy_(torch.randn(p.shape, generator=g) * (0.02 if name.endswith("lora_B") else 0.05))
        names.append(f"bench{i}")
        save_adapter(folder / names[-1], m, base="smollm2")
    return names


def run(engine: Engine, prompts: list[list[int]], adapters: list[str], new: int) -> tuple[float, list[list[int]]]:
    t = time.perf_counter()
    handles = [engine.submit(p, SamplingParams(max_tokens=new, adapter=a)) for p, a in zip(prompts, adapters)]
    for h in handles:
        h.wait()
    elapsed = time.perf_counter() - t
    assert all(len(h.tokens) == new for h in handles), "a stream stopped early (stop ids are not set: a bug)"
    return len(prompts) * new / elapsed, [h.tokens for h in handles]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="--prompt 32 --new 16 --repeats 1")
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.prompt, args.new, args.repeats = 32, 16, 1
    torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `parley serve`: the engine's own thread gets every core
    path = smollm2_gguf()
    tokenizer = Tokenizer.from_gguf(path)
    model, _ = load_gguf(path)
    model = model.to(torch.bfloat16).eval()
    source = Prompts(tokenizer, args.prompt)
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(model, Path(tmp), args.adapters, args.rank)
        print(f"{len(names)} adapters written; timing", flush=True)
        per_stream = [names[i % len(names)] for i in range(args.streams)]
        store = Adapters(model, tmp, base="smollm2")
        with Engine(model, kv_budget_bytes=512 * 2**20, threads=threads, adapters=store) as engine:
            path_name = engine.kernels_path
            run(engine, source.take(len(names)), names, 4)  # warm-up: kernels, every adapter loaded
            base, mixed = [], []
            for _ in range(args.repeats):  # alternating, so machine noise hits both
                base.append(run(engine, source.take(args.streams), [""] * args.streams, args.new)[0])
                prompts = source.take(args.streams)
                rate, together = run(engine, prompts, per_stream, args.new)
                mixed.append(rate)
                print(f"  no adapters {base[-1]:.1f} tok/s, over {args.adapters} adapters {rate:.1f} tok/s", flush=True)
        with Engine(model, max_batch=1, kv_budget_bytes=512 * 2**20, threads=threads, adapters=store) as alone:
            equal = sum(run(alone, [p], [a], args.new)[1][0] == t for p, a, t in zip(prompts, per_stream, together))
    b, m = statistics.median(base), statistics.median(mixed)
    load = os.getloadavg()[0]
    print(f"path {path_name}: {args.streams} streams, no adapters {b:.1f} tok/s; over {args.adapters} adapters "
          f"{m:.1f} tok/s (ratio {m / b:.2f}); rows equal to alone: {equal}/{args.streams}")
    if args.write:
        command = (f"benchmarks/adapters.py --streams {args.streams} --adapters {args.adapters} --rank {args.rank} "
                   f"--prompt {args.prompt} --new {args.new} --repeats {args.repeats} --write")
        append_section("\n".join([
            f"\n## Many LoRA adapters in one batch, SmolLM2-135M-Instruct ({datetime.date.today()}, commit {commit()})\n",
            f"Machine: {cpu_name(flags=True)}, kernels path {path_name}. Command: `.venv/bin/python {command}`. "
            f"{args.streams} distinct {args.prompt}-token prompts, {args.new} new tokens each, greedy, median of "
            f"{args.repeats}; random rank-{args.rank} adapters on all seven projections. Load average while it ran: "
            f"{load:.1f} on {os.cpu_count()} cores" + (" (a loaded machine: rerun on a quiet one)" if load > 1.5 else "")
            + f"; {threads} engine thread(s).\n",
            f"| case | tokens/s |", "|---|---|",
            f"| {args.streams} streams, no adapter | {b:.1f} |",
            f"| {args.streams} streams over {args.adapters} adapters | {m:.1f} |",
            f"| ratio | {m / b:.2f} |",
            f"| adapter streams equal to alone | {equal}/{args.streams} |",
        ]))


if __name__ == "__main__":
    main()
