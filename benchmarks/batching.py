"""Continuous batching: aggregate decode speed of N concurrent requests through the engine
on its own thread, against the same engine one request at a time, on SmolLM2-135M.

    .venv/bin/python benchmarks/batching.py                   # print the table
    .venv/bin/python benchmarks/batching.py --pytorch --write # also the PyTorch decode path; append to RESULTS.md

Each case sends N distinct `--prompt`-token prompts, greedy, `--new` tokens each, end of
sequence ignored; tokens/s = N * new / wall time from the first submit to the last token
(prefill included, as in decode.py). The engine runs on its C layers (with --pytorch, also
with kernels=torch: the model's own paged forward). The batch-1 column is an engine with
max_batch=1 serving other prompts of the same length one at a time (the single-user speed)."""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from record import append_section, commit

from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.model.tokenizer import Tokenizer
from parley.model.weights import load_gguf
from parley.registry import smollm2_gguf

SOURCES = sorted((Path(__file__).parent.parent / "parley").rglob("*.py"))  # fixed, varied text


class Prompts:
    """Distinct prompts, never the same twice: no case reuses another's cached prefix."""

    def __init__(self, tokenizer: Tokenizer, length: int):
        self.ids = tokenizer.encode("".join(path.read_text() for path in SOURCES))
        self.length, self.used = length, 0

    def take(self, n: int) -> list[list[int]]:
        start, self.used = self.used, self.used + n
        if self.used * self.length > len(self.ids):
            raise SystemExit(f"not enough text for {self.used} prompts of {self.length} tokens")
        return [self.ids[i * self.length:(i + 1) * self.length] for i in range(start, start + n)]


def time_engine(engine: Engine, batch: list[list[int]], new: int) -> float:
    params = SamplingParams(max_tokens=new)
    t = time.perf_counter()
    handles = [engine.submit(p, params) for p in batch]
    for h in handles:
        h.wait()
    elapsed = time.perf_counter() - t
    assert all(len(h.tokens) == new for h in handles)
    return len(batch) * new / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pytorch", action="store_true", help="also time the engine with kernels=torch")
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    # OpenMP work on two OS threads of one process halves both (RESULTS.md, "Serving"): as in
    # `parley serve`, the main thread runs single-threaded and each engine's own thread gets every core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = smollm2_gguf()
    tokenizer = Tokenizer.from_gguf(path)
    model, _ = load_gguf(path)
    model = model.to(getattr(torch, args.dtype)).eval()
    source = Prompts(tokenizer, args.prompt)
    kinds = ["auto", "torch"] if args.pytorch else ["auto"]

    def time_case(n: int, kernels: str = "auto", one_at_a_time: bool = False) -> float:
        with Engine(model, max_batch=1 if one_at_a_time else 64, kv_budget_bytes=512 * 2**20, kernels=kernels,
                    threads=threads) as engine:
            time_engine(engine, source.take(2), 4)  # warm-up
            batch = source.take(min(n, 4) if one_at_a_time else n)  # batch 1: a rate per token
            return time_engine(engine, batch, args.new)

    rows = []
    for n in map(int, args.concurrency.split(",")):
        runs = []
        for _ in range(args.repeats):  # the contenders alternate, so machine noise hits them all
            runs.append([time_case(n, kernels) for kernels in kinds] + [time_case(n, one_at_a_time=True)])
        rates = [statistics.median(column) for column in zip(*runs)]
        rows.append((n, *rates))
        cells = (f"{name} {rate:7.1f} tok/s" for name, rate in zip(columns(args), rates))
        print(f"{n:2} concurrent: " + "   ".join(cells), flush=True)
    if args.write:
        write_results(rows, args)


def columns(args) -> list[str]:
    return ["Engine"] + (["Engine, kernels=torch"] if args.pytorch else []) + ["Engine max_batch=1"]


def write_results(rows, args) -> None:
    lines = [
        f"\n## Continuous batching, SmolLM2-135M-Instruct ({datetime.date.today()}, commit {commit()})\n",
        f"Machine: {os.uname().machine}, {os.cpu_count()} cores, {os.cpu_count()} threads, "
        f"torch {torch.__version__}. Command: `.venv/bin/python benchmarks/batching.py --prompt {args.prompt} "
        f"--new {args.new} --dtype {args.dtype} --repeats {args.repeats}{' --pytorch' * args.pytorch} --write`. "
        f"N distinct {args.prompt}-token prompts, {args.new} new tokens each, greedy, median of {args.repeats}; "
        "tokens/s = N * new / wall time, prefill included. Each engine runs on its own thread with every core "
        "(the main thread single-threaded): decode rows on the C step and, with AMX, prompt chunks on the C "
        "layers with decode rows riding along (kernels=torch: the model's paged forward for every row); "
        "max_batch=1 serves min(N, 4) requests one at a time.\n",
        "| concurrent requests | " + " | ".join(f"{name} tok/s" for name in columns(args)) + " |",
        "|---" * (len(columns(args)) + 1) + "|",
    ]
    lines += [f"| {n} | " + " | ".join(f"{rate:.1f}" for rate in rates) + " |" for n, *rates in rows]
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
