"""Time to first token of long prompts, SmolLM2-135M bf16: Parley's engine (what `parley chat`
and `parley serve` use) on its C layers and on its PyTorch path, against transformers.

    .venv/bin/python benchmarks/prefill.py            # print the table
    .venv/bin/python benchmarks/prefill.py --write    # also append it to RESULTS.md

Each case feeds a distinct prompt of `--lengths` tokens (slices of Parley's own sources) and
times until the first new token is chosen (greedy), one request at a time on every core:
the engine stepped in the caller's thread (paged cache, prompt layers in C: engine/fast.py),
the same engine with `kernels=torch` (the model's paged PyTorch forward, the path without the
C kernels, and on a GPU) and transformers (one forward of the same GGUF weights with its KV
cache, then the argmax). The "next turn" row is a conversation's following turn: the previous
prompt and its answer plus `--turn` new tokens; the first engine reuses the pages it cached
and prefills only what is new, the others prefill it all. The contenders alternate within each repeat; the median of `--repeats` is shown.
"""

from __future__ import annotations

import argparse
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
from parley.model.tokenizer import Tokenizer
from parley.model.weights import load_gguf
from parley.registry import smollm2_gguf

SOURCES = sorted((Path(__file__).parent.parent / "parley").rglob("*.py"))  # fixed, varied text
FIRST = SamplingParams(max_tokens=1, temperature=0.0)


def first_token_ms(generate, prompt: list[int]) -> float:
    t = time.perf_counter()
    generate(prompt)
    return 1000 * (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="300,1200,2400", help="prompt lengths in tokens")
    ap.add_argument("--turn", type=int, default=60, help="new tokens of the next turn")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--no-amx", action="store_true", help="run as on a CPU without AMX tiles: Parley on "
                    "kernels=avx512, oneDNN capped at AVX512_CORE_BF16 (set before torch is imported)")
    args = ap.parse_args()
    print(cpu_name(flags=True), flush=True)
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        ap.error(f"--lengths takes comma-separated token counts such as 300,1200, not {args.lengths!r}")
    if min(lengths) < 1 or args.turn < 1 or args.repeats < 1:
        ap.error("--lengths, --turn and --repeats must be positive")
    torch.set_flush_denormal(True)
    path = smollm2_gguf()
    tokenizer = Tokenizer.from_gguf(path)
    model, _ = load_gguf(path)
    model = model.to(torch.bfloat16).eval()
    text = tokenizer.encode("".join(p.read_text() for p in SOURCES))
    taken = 0

    def fresh(n: int) -> list[int]:  # never the same text twice: no contender reuses another's prompt
        nonlocal taken
        if taken + n > len(text):
            raise SystemExit("not enough source text for these lengths and repeats")
        taken += n
        return text[taken - n:taken]

    stepped, engine = Engine(model, max_batch=8), Engine(model, max_batch=8, kernels="torch")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16).eval()

    @torch.inference_mode()
    def hf_first(prompt: list[int]) -> int:
        return int(hf(torch.tensor([prompt]), use_cache=True).logits[0, -1].argmax())

    contenders = {"Parley Engine": lambda p: stepped.generate([p], FIRST),
                  "Parley Engine, kernels=torch": lambda p: engine.generate([p], FIRST),
                  "transformers": hf_first}
    for generate in contenders.values():  # warm-up: buffers, pages, kernels
        first_token_ms(generate, fresh(64))
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeats):
        for n in lengths:
            for name, generate in contenders.items():
                runs.setdefault(f"{n}-token prompt", {}).setdefault(name, []).append(first_token_ms(generate, fresh(n)))
        n = lengths[-1]  # the next turn of a conversation whose last prompt was the longest
        for name, generate in contenders.items():
            earlier = fresh(n)
            [answer] = stepped.generate([earlier], SamplingParams(max_tokens=32, temperature=0.0)) \
                if name == "Parley Engine" else [None]
            history = earlier + (answer.tokens if answer else fresh(32))
            runs.setdefault(f"next turn: {n} + 32 + {args.turn} new tokens", {}).setdefault(name, []).append(
                first_token_ms(generate, history + fresh(args.turn)))
    names = list(contenders)
    table = ["| case | " + " | ".join(f"{n} ms" for n in names) + " | transformers / Parley Engine |",
             "|---|" + "---|" * (len(names) + 1)]
    for case, by_name in runs.items():
        ms = [statistics.median(by_name[n]) for n in names]
        table.append(f"| {case} | " + " | ".join(f"{x:.0f}" for x in ms) + f" | {ms[2] / ms[0]:.2f}x |")
    print("\n".join(table))
    if args.write:
        append_section("\n".join([
            f"\n## Time to first token of long prompts, SmolLM2-135M-Instruct bf16 ({datetime.date.today()}, "
            f"commit {commit()})\n",
            f"Machine: {cpu_name(flags=True)}, {os.cpu_count()} cores, torch {torch.__version__}. Command: "
            f"`.venv/bin/python benchmarks/prefill.py --lengths {args.lengths} --turn {args.turn} "
            f"--repeats {args.repeats}{' --no-amx' * args.no_amx} --write`. One request at a time, greedy, "
            "until the first new token; "
            f"distinct source-code prompts; median of {args.repeats}, the contenders alternating. Next turn: "
            "the longest prompt, its answer and new tokens (the first engine reuses its cached pages; the others "
            "prefill everything).\n",
            *table]))


if __name__ == "__main__":
    main()
