"""How fast could `benchmarks/serve.py`'s 32-client case be on this CPU at all? A bound from arithmetic.

    .venv/bin/python benchmarks/probes/serve_bound.py --no-amx            # as on a CPU without AMX tiles
    .venv/bin/python benchmarks/probes/serve_bound.py --one-client 39.0   # one client's measured tok/s

Issue 11 asks, on a CPU without AMX, for `parley serve` with 32 streaming clients at >= 8x one client's
throughput and a time to first token p50 <= 2 s. This counts the work that case holds (serve.py's own
messages in SmolLM2's chat template: every prompt token through the 30 layers, the output layer once a
prompt, every new token through the layers and the output layer, attention at its context) and divides it by
the best rate this CPU's PyTorch reaches on products (oneDNN/MKL, all threads): the model's own projection
shapes at 32 and 512 rows, and a 2048 x 2048 x 2048 product (the most any product reaches here). Nothing is
served: the figures are what no scheduler and no kernel could beat at those rates, so they say whether the
goal is within this machine's reach, not how close Parley is (serve.py says that).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from record import cpu_name, no_amx  # noqa: E402

no_amx()  # before torch is imported
from serve import Messages  # noqa: E402  (serve.py calls no_amx() too, before its own torch import)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ingest import matmul_peak  # noqa: E402

from parley.registry import Registry  # noqa: E402


def linear_rate(rows: int, inputs: int, outputs: int, dtype: torch.dtype, repeats: int = 7) -> float:
    """GFLOP/s of the best of `repeats` products x [rows, inputs] W^T in `dtype`."""
    x, w = torch.randn(rows, inputs, dtype=dtype), torch.randn(outputs, inputs, dtype=dtype)
    with torch.inference_mode():
        F.linear(x, w)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - start)
    return 2 * rows * inputs * outputs / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=100, help="tokens of source text in each message (serve.py's)")
    ap.add_argument("--new", type=int, default=64, help="new tokens a request (serve.py's max_tokens)")
    ap.add_argument("--one-client", type=float, default=39.0,
                    help="one client's tok/s through the server (RESULTS.md, the no-AMX serve table: 39.0)")
    ap.add_argument("--no-amx", action="store_true", help="oneDNN capped at AVX512_CORE_BF16, set before torch")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    print(cpu_name(flags=True), f"{torch.get_num_threads()} threads", flush=True)

    registry = Registry()
    model, tokenizer, _ = registry.load("smollm2", dtype=torch.bfloat16)
    c = model.config
    d, inter, layers, kv = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads * c.head_dim
    per_token = 2 * layers * (d * d + 2 * d * kv + d * d + 3 * d * inter)  # q, k, v, o and the gated MLP
    head = 2 * d * c.vocab_size                                            # the output layer, one row
    attend = 4 * layers * c.num_attention_heads * c.head_dim               # scores and values, per key

    prompts = [len(tokenizer.encode_chat([{"role": "user", "content": m}]))
               for m in Messages(tokenizer, args.prompt).take(args.clients)]
    prefill = [n * per_token + attend * n * (n + 1) / 2 + head for n in prompts]
    decode = sum(args.new * (per_token + head) + attend * sum(n + k for k in range(args.new)) for n in prompts)
    total = sum(prefill) + decode
    print(f"{args.clients} prompts of {min(prompts)}-{max(prompts)} tokens ({sum(prompts)} in all), "
          f"{args.new} new tokens each: {sum(prefill) / 1e12:.2f} TFLOP of prefill, {decode / 1e12:.2f} of decode")

    rates = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        rates[f"{name}, gate/up at 32 rows"] = linear_rate(32, d, 2 * inter, dtype)
        rates[f"{name}, gate/up at 512 rows"] = linear_rate(512, d, 2 * inter, dtype)
        rates[f"{name}, down at 512 rows"] = linear_rate(512, inter, d, dtype)
        rates[f"{name}, 2048 x 2048 x 2048"] = matmul_peak(dtype)
    goal_rate = 8 * args.one_client
    first_half = sorted(prefill)[: (args.clients + 1) // 2]  # TTFT p50: the shortest half prefilled first
    print(f"goal: {goal_rate:.0f} tok/s aggregate (8 x {args.one_client}), TTFT p50 <= 2 s\n")
    print("| rate assumed for all the work | GFLOP/s | least wall time | most aggregate tok/s | x one client "
          "| least TTFT p50 |")
    print("|---|---|---|---|---|---|")
    for name, gflops in rates.items():
        wall = total / (gflops * 1e9)
        ttft = sum(first_half) / (gflops * 1e9)
        tokens = args.clients * args.new / wall
        print(f"| {name} | {gflops:.0f} | {wall:.1f} s | {tokens:.0f} | {tokens / args.one_client:.1f}x | {ttft:.2f} s |")
    need = total / (args.clients * args.new / goal_rate) / 1e9
    need_ttft = sum(first_half) / 2.0 / 1e9
    print(f"\nthe goal needs a sustained {need:.0f} GFLOP/s over the whole case, and {need_ttft:.0f} GFLOP/s "
          f"for the first half of the prompts' prefill within 2 s")


if __name__ == "__main__":
    main()
