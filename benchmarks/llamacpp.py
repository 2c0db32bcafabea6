"""Batch-1 decode: Parley on SmolLM2's own 4-bit GGUF (kept quantized) against llama.cpp on the same
file, same prompt, same threads, in one run.

    LLAMA_CPP_LIB_PATH=/tmp/llpy/lib PYTHONPATH=.:/tmp/llpy/llama_cpp_python-0.3.36:/tmp/llpy/deps \\
        .venv/bin/python benchmarks/llamacpp.py                         # full run, appended to RESULTS.md
    ... benchmarks/llamacpp.py --quick --no-write                       # one short pass, print only

llama.cpp built for this CPU (on one without AMX; with AMX tiles, build with GGML_NATIVE=OFF and the
AMX switches off, as RESULTS.md's earlier runs say):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llpy   # then untar it there
    cd /tmp/llpy/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build --target llama          # then copy build/bin/*.so* to /tmp/llpy/lib
    pip install --target /tmp/llpy/deps diskcache typing-extensions

llama.cpp is the reference, not a dependency: llama-cpp-python's source on PYTHONPATH, its
libllama (built elsewhere: on a CPU with AMX it must be built with AMX off) found through
LLAMA_CPP_LIB_PATH; its CMakeCache's GGML_* flags are printed when `--cmake-cache` names it.
Both decode `--new` tokens greedily after the same `--prompt`-token prompt (end of sequence
ignored); each side also runs the prompt alone (one new token), so decode tok/s = (new - 1) /
(time with new tokens - time with one), prefill excluded. Parley runs its best int8 path (also with
keys and values in bf16, `engine.kv_dtype=bfloat16`) and the
AVX2 one (`kernels=avx2`, the instruction set of a llama.cpp built without AVX-512), and the
same weights dequantized to bf16; sides alternate within each repeat, medians reported. The
bound is the measured read bandwidth over the bytes of weights a step reads (model/quant.py's
weight_bytes: each projection and the output layer as stored, one embedding row). A CPU whose
last-level cache holds those bytes (this project's VMs have had 300 MB of L3) reads them faster than
the 512 MB probe does, so the table also gives the bound at the step's own size: the best read
bandwidth of a warm buffer of exactly those bytes. A rate above 100% of the first bound and below
the second means the weights were served from cache. A step also reads the keys and values of its
context (30 layers' of `--prompt` + `--new` / 2 positions on average; fp32 on Parley's int8 paths
unless kv_dtype=bfloat16, bf16 on its bf16 path, f16 in llama.cpp's default cache): the last column divides by weights plus
those, at the 512 MB bandwidth.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from decode import bandwidth_gbs, prompts
from record import append_section, commit, cpu_name

from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.model import quant, weights
from parley.model.tokenizer import Tokenizer
from parley.model.weights import load_gguf
from parley.registry import smollm2_gguf


def parley_seconds(engine: Engine, prompt: list[int], new: int) -> float:
    engine.cache.drop_cached()  # prefill every time, as llama.cpp does after reset
    t = time.perf_counter()
    [out] = engine.generate([prompt], SamplingParams(max_tokens=new))
    elapsed = time.perf_counter() - t
    assert len(out.tokens) == new
    return elapsed


def llama_seconds(llm, prompt: list[int], new: int) -> float:
    t = time.perf_counter()
    n = 0
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # greedy; end of sequence ignored
        n += 1
        if n == new:
            break
    return time.perf_counter() - t


def build_flags(cache: Path | None) -> str:
    if not cache or not cache.is_file():
        return "unknown (pass --cmake-cache)"
    flags = re.findall(r"^(GGML_(?:NATIVE|AVX\w*|AMX\w*|F16C|FMA|BMI2|OPENMP|LLAMAFILE)|CMAKE_BUILD_TYPE):\w+=(\S+)$",
                       cache.read_text(), re.M)
    text = ", ".join(f"{k}={v}" for k, v in flags)
    if ("GGML_NATIVE", "ON") in flags:
        text += " (GGML_NATIVE=ON compiles with -march=native: every instruction set of this CPU, whatever the GGML_AVX* switches say)"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cmake-cache", type=Path, default=Path("/tmp/tmpb1gs052f/build/CMakeCache.txt"))
    ap.add_argument("--quick", action="store_true", help="one repeat, 32 new tokens")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.new = 1, 32
    if args.new < 2:
        sys.exit("--new must be at least 2 (decode speed is measured past the first token)")
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not importable: put its source on PYTHONPATH and its libllama folder in "
                 "LLAMA_CPP_LIB_PATH (see this file's docstring)")
    torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    path = smollm2_gguf()
    tokenizer = Tokenizer.from_gguf(path)
    [prompt] = prompts(tokenizer, 1, args.prompt)
    float_model, _ = load_gguf(path)
    kept = weights.keep_gguf_blocks(copy.deepcopy(float_model), path).to(torch.bfloat16)
    float_model = float_model.to(torch.bfloat16)
    engines = {"Parley, file's 4-bit blocks, best int8 path": Engine(kept, max_batch=1),
               "Parley, file's 4-bit blocks, kv_dtype=bfloat16": Engine(kept, max_batch=1, kv_dtype="bfloat16"),
               "Parley, file's 4-bit blocks, kernels=avx2": Engine(kept, max_batch=1, kernels="avx2"),
               "Parley, dequantized to bf16": Engine(float_model, max_batch=1)}
    paths = {name: e.fast.path if e.fast else "torch" for name, e in engines.items()}
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=args.prompt + args.new + 16,
                n_batch=512, verbose=False)
    sides = {**{name: (lambda new, e=e: parley_seconds(e, prompt, new)) for name, e in engines.items()},
             "llama.cpp": lambda new: llama_seconds(llm, prompt, new)}
    bw = bandwidth_gbs()
    read = {"Parley, dequantized to bf16": quant.weight_bytes(float_model)}
    read.update({name: quant.weight_bytes(kept) for name in engines if "4-bit" in name})
    read["llama.cpp"] = read["Parley, file's 4-bit blocks, best int8 path"]  # the same tensors: Q4_1 + Q8_0
    cfg = float_model.config
    positions = args.prompt + args.new / 2  # a decode step's context, on average
    per_byte = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * positions
    kv = {name: int(per_byte * (e.fast.kv_dtype.itemsize if e.fast else 4)) for name, e in engines.items()}
    kv["llama.cpp"] = int(per_byte * 2)  # its default cache type: f16
    for run in sides.values():
        run(2)  # warm-up
    rates = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, run in sides.items():
            rates[name].append((args.new - 1) / (run(args.new) - run(1)))
    warm = {nbytes: bandwidth_gbs(nbytes, tries=20) for nbytes in set(read.values())}  # cached where it fits
    rows = [(name, statistics.median(r), bw * 1e9 / read[name], read[name]) for name, r in rates.items()]
    with_kv = {name: bw * 1e9 / (read[name] + kv[name]) for name in rates}
    llama_rate = statistics.median(rates["llama.cpp"])
    print(f"{cpu_name(flags=True)}; {threads} threads; read bandwidth {bw:.1f} GB/s")
    for name, rate, bound, nbytes in rows:
        print(f"{name:48} {rate:7.1f} tok/s  {rate / llama_rate:5.2f}x llama.cpp  {rate / bound:5.0%} of its bound "
              f"({bound:.0f} tok/s, {nbytes / 1e6:.0f} MB a step)  "
              f"{rate / (warm[nbytes] * 1e9 / nbytes):5.0%} of the warm {nbytes / 1e6:.0f} MB bound "
              f"({warm[nbytes] * 1e9 / nbytes:.0f} tok/s)  {rate / with_kv[name]:5.0%} of the bound with keys and "
              f"values ({(read[name] + kv[name]) / 1e6:.0f} MB)  {paths.get(name, '')}", flush=True)
    print(f"llama.cpp build: {build_flags(args.cmake_cache)}")
    if not args.no_write:
        lines = [
            f"\n## Batch-1 decode against llama.cpp, SmolLM2-135M-Instruct Q4_1 GGUF ({datetime.date.today()}, "
            f"commit {commit()})\n",
            f"Machine: {cpu_name(flags=True)}, {os.cpu_count()} cores, {threads} threads. Command: "
            f"`benchmarks/llamacpp.py --prompt {args.prompt} --new {args.new} --repeats {args.repeats}` (see its "
            f"docstring for the environment). Greedy, prefill excluded, median of {args.repeats}; read bandwidth "
            f"{bw:.1f} GB/s. llama.cpp build: {build_flags(args.cmake_cache)}.\n",
            "| engine | path | tok/s | vs llama.cpp | MB read a step | bound tok/s | % of bound | bound at the step's "
            "size (warm buffer) tok/s | % of it | MB a step with keys and values | % of that bound |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {name} | {paths.get(name, '')} | {rate:.1f} | {rate / llama_rate:.2f}x | {nbytes / 1e6:.0f} | "
                  f"{bound:.0f} | {rate / bound:.0%} | {warm[nbytes] * 1e9 / nbytes:.0f} | "
                  f"{rate / (warm[nbytes] * 1e9 / nbytes):.0%} | {(nbytes + kv[name]) / 1e6:.0f} | "
                  f"{rate / with_kv[name]:.0%} |" for name, rate, bound, nbytes in rows]
        append_section("\n".join(lines))


if __name__ == "__main__":
    main()
