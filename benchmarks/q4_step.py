"""Where a quantized decode step's time goes, and the VNNI path's 16-row layout against the file's.

    .venv/bin/python benchmarks/q4_step.py                   # SmolLM2's Q4_1 file, appended to RESULTS.md
    .venv/bin/python benchmarks/q4_step.py --quick --no-write

SmolLM2-135M-Instruct's own GGUF, its 4-bit blocks kept (model/quant.py), through engine/fast.py's C
step on the best int8 path and on the AVX2 one (`kernels=avx2`), each twice: reading the weights
interleaved 16 rows at a time (quant.interleave16, the default on both) and reading the file's
layout row by row (what both did before). For each: a batch-1 decode step at `--context` tokens of context,
the same step with no layers (final norm and output layer alone: the Q8_0 output layer is 30 of
the 96 MB a step reads), a batch-8 step, and a `--prompt`-token prompt chunk (step_rows); and the
same for the weights dequantized to bf16 (on AMX tiles where the CPU has them). The
share of the step left to the layers is divided by their bytes for their read rate; the output
layer's likewise. Medians of `--repeats` timings of each, the two layouts alternating.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import os
import statistics
import time

import torch

from decode import bandwidth_gbs
from record import append_section, commit, cpu_name

from parley.engine.cache import CachedSequence, PagedKVCache
from parley.engine.fast import FastDecoder
from parley.model import quant, weights
from parley.model.weights import load_gguf
from parley.registry import smollm2_gguf


def decoder(model, rows16: bool, path: str = "auto") -> FastDecoder:
    """The C decoder on the best int8 path under `path`, reading the 16-row layout or (rows16 False)
    the file's."""
    if rows16:
        return FastDecoder.create(model, path=path)
    interleaved = FastDecoder._interleaved
    FastDecoder._interleaved = lambda self: {}
    try:
        return FastDecoder.create(model, path=path)
    finally:
        FastDecoder._interleaved = interleaved


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rotated_medians(cases: dict, rows: int, rounds: int, steps: int = 20) -> dict:
    """Median seconds of a `rows`-row decode step of each Case: `steps` steps a round after as many to warm
    up, the cases taking turns with each going first in turn (so neither the machine's drift nor the
    order favours one)."""
    times = {name: [] for name in cases}
    names = list(cases)
    with torch.inference_mode():
        for case in cases.values():
            for _ in range(steps):
                case.step(rows)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t = time.perf_counter()
                for _ in range(steps):
                    cases[name].step(rows)
                times[name].append((time.perf_counter() - t) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


class Case:
    """One decoder's timed calls over its own cache: `batch` sequences of `context` tokens."""

    def __init__(self, fast: FastDecoder, batch: int, context: int, prompt: int):
        cfg = fast.cfg
        self.fast = fast
        self.cache = PagedKVCache(cfg, 2**28, 16, fast.kv_dtype)
        ids = [[(7 * i + 13 * b) % 1000 + 5 for i in range(context)] for b in range(batch)]
        self.seqs = [CachedSequence(tokens=t, pages=self.cache.allocate(self.cache.pages_for(context + 1)))
                     for t in ids]
        with torch.inference_mode():
            for seq in self.seqs:  # the context through the C prompt path
                fast.step_rows(self.cache.batch([(seq, context - 1)]))
        self.steps = {}
        for n in (1, batch):  # each step's batch built once, replayed: the same slots rewritten each time
            for seq in self.seqs:
                seq.length = context - 1
            self.steps[n] = self.cache.batch([(seq, 1) for seq in self.seqs[:n]])
        chunk = CachedSequence(tokens=[(11 * i) % 1000 + 5 for i in range(prompt)],
                               pages=self.cache.allocate(self.cache.pages_for(prompt)))
        self.chunk = self.cache.batch([(chunk, prompt)])

    def step(self, rows: int) -> None:
        self.fast.step_paged(self.steps[rows])

    def head_only(self) -> None:
        """decode_step_paged with no layers: the final norm and the output layer of one row."""
        f, batch = self.fast, self.steps[1]
        table = batch.decode_table.contiguous()
        span = f._span(table.shape[1], self.cache.page_size)
        _, buffers = f._buffers("step", 1, span)
        shape = f._shape(1, span)
        shape.n_layers = 0
        positions = batch.positions[0].contiguous()
        f.lib.decode_step_paged(f.layers, f.norm.data_ptr(), f.head, ctypes.byref(buffers), ctypes.byref(shape),
                                positions.data_ptr(), f.cos.data_ptr(), f.sin.data_ptr(), table.data_ptr(),
                                table.shape[1], self.cache.page_size)

    def prompt(self) -> None:
        self.fast.step_rows(self.chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="5 repeats")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 5
    torch.set_flush_denormal(True)
    path = smollm2_gguf()
    model = weights.keep_gguf_blocks(load_gguf(path)[0], path).to(torch.bfloat16)
    head = quant.quantized_layers(model)["lm_head"].nbytes
    layers = quant.weight_bytes(model) - head
    cases = {name: Case(decoder(model, rows16, path), args.batch, args.context, args.prompt)
             for name, rows16, path in (("16-row layout", True, "auto"), ("file's layout", False, "auto"),
                                        ("16-row layout, kernels=avx2", True, "avx2"),
                                        ("file's layout, kernels=avx2", False, "avx2"))}
    dequantized = quant.dequantize_model(copy.deepcopy(model), torch.bfloat16)
    cases["bf16, dequantized"] = Case(FastDecoder.create(dequantized), args.batch, args.context, args.prompt)
    bw = bandwidth_gbs()
    results = {}
    with torch.inference_mode():
        for name, case in cases.items():
            results[name] = dict(step=median_seconds(lambda: case.step(1), args.repeats),
                                 head=median_seconds(case.head_only, args.repeats),
                                 batch=median_seconds(lambda: case.step(args.batch), args.repeats),
                                 prompt=median_seconds(case.prompt, max(3, args.repeats // 4)))
    path_name = cases["16-row layout"].fast.path
    rows = []
    for name, r in results.items():
        total, out = (quant.weight_bytes(model), head) if "layout" in name else \
            (quant.weight_bytes(dequantized), dequantized.lm_head.weight.nbytes)
        rest = r["step"] - r["head"]
        rows.append((f"{name} ({cases[name].fast.path})", 1 / r["step"], total / r["step"] / 1e9, r["head"] * 1e3,
                     out / r["head"] / 1e9, rest * 1e3, (total - out) / rest / 1e9, args.batch / r["batch"],
                     args.prompt / r["prompt"]))
    head_line = ("| weights | B1 tok/s | B1 GB/s | output layer ms | its GB/s | 30 layers ms | their GB/s | "
                 f"B{args.batch} tok/s | prompt {args.prompt} tok/s |")
    print(f"{cpu_name(flags=True)}; {torch.get_num_threads()} threads; path {path_name}; read bandwidth {bw:.1f} GB/s; "
          f"a step reads {quant.weight_bytes(model) / 1e6:.0f} MB ({head / 1e6:.0f} MB output layer)")
    table = [head_line, "|---|---|---|---|---|---|---|---|---|"]
    table += ["| " + " | ".join([name] + [f"{v:.1f}" for v in values]) + " |" for name, *values in rows]
    print("\n".join(table))
    if not args.no_write:
        append_section("\n".join([
            f"\n## Quantized decode step by part, SmolLM2 Q4_1 kept ({datetime.date.today()}, commit {commit()})\n",
            f"Machine: {cpu_name(flags=True)}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, path "
            f"{path_name}. Command: `OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python benchmarks/q4_step.py --context {args.context} --prompt "
            f"{args.prompt} --batch {args.batch} --repeats {args.repeats}`. Read bandwidth {bw:.1f} GB/s; a step "
            f"reads {quant.weight_bytes(model) / 1e6:.0f} MB, {head / 1e6:.0f} MB of it the output layer. Medians. "
            f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (above the thread count: "
            "a loaded machine, compare only rows of this table).\n",
            *table]))


if __name__ == "__main__":
    main()
