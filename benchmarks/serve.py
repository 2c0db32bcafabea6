"""Serving: N concurrent streaming clients against a real `parley serve` (continuous batching),
against the Engine at batch 1 and transformers' static batches, on SmolLM2-135M.

    .venv/bin/python benchmarks/serve.py            # print the table
    .venv/bin/python benchmarks/serve.py --write    # also append it to RESULTS.md

The server is a subprocess (`python -m parley serve --no-auth`, PARLEY_HOME a temporary folder
where smollm2 is imported), so the clients and the server do not share a GIL; they do share the
machine's cores. Each client streams one `/v1/chat/completions` request (model "smollm2", the raw
model; greedy; `--new` max tokens; its own ~`--prompt`-token user message, never used twice) over
httpx. Per request: time to first token (TTFT, from sending the request to the first content
chunk), inter-token latency (ITL, between content chunks: one chunk is one token unless the
text decoder holds back an incomplete character) and completion tokens (the usage chunk).
Aggregate tok/s = all completion tokens / wall time of the case. Answers may end before
`--new` at an end-of-turn token: every figure counts the tokens actually produced.

In each repeat, after the client counts, `--batch1` requests of the same kind (same chat
template, stop tokens and max tokens) go through an `Engine(max_batch=1)` in this process (batch 1,
the single-user speed) while the server idles; the ratios use the median of those runs. Last,
with the server stopped, transformers' `generate` serves them in static left-padded batches.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path

from record import append_section, commit, cpu_name, no_amx

no_amx()  # before torch is imported

import httpx
import torch

from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.registry import Registry, smollm2_gguf

SOURCES = sorted((Path(__file__).parent.parent / "parley").rglob("*.py"))  # fixed, varied text
ROOT = Path(__file__).parent.parent


class Messages:
    """Distinct user messages of about `length` tokens: slices of Parley's own sources."""

    def __init__(self, tokenizer, length: int):
        self.tokenizer, self.length, self.used = tokenizer, length, 0
        self.ids = tokenizer.encode("".join(path.read_text() for path in SOURCES))

    def take(self, n: int) -> list[str]:
        start, self.used = self.used, self.used + n
        if self.used * self.length > len(self.ids):
            raise SystemExit(f"not enough text for {self.used} messages of {self.length} tokens")
        return ["Explain what this code does:\n" + self.tokenizer.decode(self.ids[i * self.length:(i + 1) * self.length])
                for i in range(start, start + n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int, max_pending: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "parley", "serve", "--no-auth", "--port", str(port), "--model", "smollm2",
           "--max-pending", str(max_pending), f"engine.max_waiting={max_pending}", "requests_per_minute=0"]
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PARLEY_HOME": str(home)})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # poll until it answers (it loads the model first)
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit("the server did not answer within 180 s")


async def one_request(client: httpx.AsyncClient, url: str, message: str, new: int) -> dict:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": message}], "stream": True,
            "temperature": 0, "max_tokens": new, "stream_options": {"include_usage": True}}
    t0, times, tokens = time.perf_counter(), [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"error in the stream: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return {"ttft": times[0] - t0 if times else None, "itl": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens}


async def serve_case(url: str, messages: list[str], new: int) -> dict:
    limits = httpx.Limits(max_connections=len(messages) + 1, max_keepalive_connections=len(messages) + 1)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, m, new) for m in messages))
        wall = time.perf_counter() - t
    tokens = sum(r["tokens"] for r in results)
    return {"rate": tokens / wall, "tokens": tokens, "wall": wall,
            "ttft": [r["ttft"] for r in results if r["ttft"] is not None], "itl": [x for r in results for x in r["itl"]]}


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank), in milliseconds."""
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def time_engine(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> float:
    t, tokens = time.perf_counter(), 0
    for prompt in prompts:
        tokens += len(engine.generate([prompt], params)[0].tokens)
    return tokens / (time.perf_counter() - t)


def time_transformers(model, prompts: list[list[int]], new: int, batch: int, stop_ids: set[int]) -> float:
    pad = min(stop_ids)
    t, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        longest = max(map(len, group))
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                 eos_token_id=sorted(stop_ids), pad_token_id=pad)
        for row in out[:, longest:].tolist():  # tokens up to (not counting) the first stop token
            tokens += next((j for j, tok in enumerate(row) if tok in stop_ids), len(row))
    return tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=100, help="tokens of source text in each user message")
    ap.add_argument("--new", type=int, default=64, help="max_tokens of each request")
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each client count (the median is shown)")
    ap.add_argument("--batch1", type=int, default=8, help="requests the Engine serves one at a time")
    ap.add_argument("--hf-batch", type=int, default=8, help="transformers' static batch size")
    ap.add_argument("--hf-requests", type=int, default=32, help="requests transformers serves")
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--no-amx", action="store_true", help="run as on a CPU without AMX tiles: Parley on "
                    "kernels=avx512, oneDNN capped at AVX512_CORE_BF16 (set before torch is imported)")
    ap.add_argument("--quantize", default="auto", choices=("auto", "none", "keep"),
                    help="how smollm2 is imported for Parley (`parley models import --quantize`): keep = the "
                         "file's 4-bit blocks, none = bf16, auto = the import's default (floats for smollm2)")
    args = ap.parse_args()
    print(cpu_name(flags=True), flush=True)
    clients = [int(n) for n in args.clients.split(",")]
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="parley-serve-bench-") as home:
        registry = Registry(home)
        registry.import_model("smollm2", quantize=args.quantize)
        args.weights = "4-bit (the file's blocks kept)" if registry.get("smollm2").meta.get("quantized") else "bf16"
        model, tokenizer, _ = registry.load("smollm2", dtype=torch.bfloat16)
        source = Messages(tokenizer, args.prompt)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # the Engine's batch-1 baseline runs in this process while the server idles: its
        # threads sleep then, and the baseline alternates with the cases, so that drift in the
        # machine's speed (shared memory bandwidth moves by a third over minutes) hits both
        engine = Engine(model, max_batch=1)
        params = SamplingParams(max_tokens=args.new, temperature=0.0, stop_ids=frozenset(tokenizer.stop_ids))
        server = start_server(Path(home), port, max_pending=max(clients))
        try:
            asyncio.run(serve_case(url, source.take(2), 4))  # warm-up
            warm = [tokenizer.encode_chat([{"role": "user", "content": m}]) for m in source.take(1)]
            time_engine(engine, warm, SamplingParams(max_tokens=4))
            runs: dict[int, list[dict]] = {n: [] for n in clients}
            batch1_runs = []
            for _ in range(args.repeats):
                for n in clients:
                    runs[n].append(asyncio.run(serve_case(url, source.take(n), args.new)))
                    r = runs[n][-1]
                    print(f"{n:2} clients: {r['rate']:7.1f} tok/s ({r['tokens']} tokens in {r['wall']:.1f} s), "
                          f"TTFT p50 {pct(r['ttft'], 50):.0f} ms p99 {pct(r['ttft'], 99):.0f} ms, "
                          f"ITL p50 {pct(r['itl'], 50):.0f} ms p99 {pct(r['itl'], 99):.0f} ms", flush=True)
                chat = [tokenizer.encode_chat([{"role": "user", "content": m}]) for m in source.take(args.batch1)]
                batch1_runs.append(time_engine(engine, chat, params))
                print(f"Engine batch-1: {batch1_runs[-1]:.1f} tok/s ({args.batch1} requests)", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
        rows = [(n, sorted(runs[n], key=lambda r: r["rate"])[len(runs[n]) // 2]) for n in clients]  # median run
        batch1 = statistics.median(batch1_runs)
        del engine, model
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16).eval()
    chat = [tokenizer.encode_chat([{"role": "user", "content": m}]) for m in source.take(args.hf_requests)]
    time_transformers(hf, chat[:1], 4, 1, tokenizer.stop_ids)  # warm-up
    hf_rate = time_transformers(hf, chat, args.new, args.hf_batch, tokenizer.stop_ids)
    print(f"transformers static batch {args.hf_batch}: {hf_rate:.1f} tok/s ({args.hf_requests} requests)")
    print(f"total {time.perf_counter() - started:.0f} s")
    table = render(rows, batch1, hf_rate, args)
    print("\n".join(table))
    if args.write:
        write_results(table, args)


def render(rows, batch1: float, hf_rate: float, args) -> list[str]:
    lines = ["| clients | aggregate tok/s | vs Engine batch-1 | vs 1 client | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
             "|---|---|---|---|---|---|"]
    one = dict(rows).get(1)
    for n, r in rows:
        vs_one = f"{r['rate'] / one['rate']:.2f}x" if one else ""
        lines.append(f"| {n} | {r['rate']:.1f} | {r['rate'] / batch1:.2f}x | {vs_one} | {pct(r['ttft'], 50):.0f} / "
                     f"{pct(r['ttft'], 99):.0f} | {pct(r['itl'], 50):.0f} / {pct(r['itl'], 99):.0f} |")
    lines.append(f"| Engine batch-1, in process ({args.batch1} requests one at a time) | {batch1:.1f} | 1.00x | | | |")
    lines.append(f"| transformers static batch {args.hf_batch}, in process ({args.hf_requests} requests) | "
                 f"{hf_rate:.1f} | {hf_rate / batch1:.2f}x | | | |")
    return lines


def write_results(table: list[str], args) -> None:
    load = os.getloadavg()[0]
    command = (f".venv/bin/python benchmarks/serve.py --prompt {args.prompt} --new {args.new} --clients {args.clients} "
               f"--repeats {args.repeats} --batch1 {args.batch1} --hf-batch {args.hf_batch} "
               f"--hf-requests {args.hf_requests}{' --no-amx' * args.no_amx} --quantize {args.quantize} --write")
    lines = [
        f"\n## Serving concurrent streams, SmolLM2-135M-Instruct {args.weights} ({datetime.date.today()}, "
        f"commit {commit()})\n",
        f"Machine: {cpu_name(flags=True)}, {os.cpu_count()} cores, torch {torch.__version__}; 1-minute load average "
        f"{load:.2f} when the run ended. Command: `{command}`. `parley serve --no-auth` in a subprocess "
        f"(continuous-batching scheduler, max_pending and engine.max_waiting {args.clients.split(',')[-1]}, requests_per_minute=0) on 127.0.0.1; "
        f"N asyncio + httpx clients each stream one `/v1/chat/completions` request at once (model smollm2, "
        f"temperature 0, max_tokens {args.new}, a distinct ~{args.prompt}-token user message in the chat template), "
        f"client and server on the same cores. Tokens: the usage chunk (answers may end early at end of turn). "
        f"Aggregate tok/s = all completion tokens / wall time of the case, prefill included; the median of "
        f"{args.repeats} runs. TTFT: request sent to first content chunk; ITL: between content chunks. "
        "The Engine row ran in the benchmark process after the client counts of each repeat, with the "
        "server idle (median of the repeats), on the same kind of requests one at a time; the transformers "
        "row ran last with the server stopped: `generate` on left-padded static batches of the GGUF loaded "
        "by transformers. \"vs 1 client\": the aggregate over the server's own one-client rate.\n",
        *table,
    ]
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
