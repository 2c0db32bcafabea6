"""How long an assistant turn waits while a big /v1/embeddings request runs (issue 15, finding 6):
the embedder taken for the whole request (embedding_batch past the request's size: the old way)
against the embedder taken per batch of `embedding_batch` (4) under the fair lock (the default).

    .venv/bin/python benchmarks/embed_stall.py              # 256 inputs, as the report's attacker
    .venv/bin/python benchmarks/embed_stall.py --inputs 48  # quick
    .venv/bin/python benchmarks/embed_stall.py --write      # also append the table to RESULTS.md

A real server in this process (uvicorn on a loopback port, SmolLM2 from PARLEY_HOME, the real
MiniLM, a temporary SQLite file, no auth), stages state + respond: the user has one memory fact,
so each turn embeds its message once (the recall) and answers in at most 8 tokens, greedy.
Per case: the turn's latency alone (median of 3), the embeddings request alone, then the same
request with one turn sent once the request is embedding; the turn's latency and whether the
request was still running when the turn answered.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from record import append_section, commit, cpu_name

from parley.serve.app import create_app
from parley.serve.server import EMBEDDING_MODEL
from parley.serve.settings import Settings

SOURCE = (Path(__file__).parent.parent / "parley" / "pipeline" / "respond.py").read_text().split()


def texts(n: int, tag: str, words: int = 60) -> list[str]:
    """n distinct texts (the embedder remembers texts it has seen: a repeat would cost nothing)."""
    return [" ".join(SOURCE[(i * words) % (len(SOURCE) - words):][:words]) + f" ({tag} {i})" for i in range(n)]


def turn(http: httpx.Client) -> float:
    start = time.perf_counter()
    reply = http.post("/v1/chat/completions", json={"model": "parley", "temperature": 0, "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": "what is my boat called?"}]})
    reply.raise_for_status()
    return time.perf_counter() - start


def case(batch: int, inputs: int, db: str) -> dict:
    settings = Settings(db=db, model="smollm2", no_auth=True, stages=["state", "respond"], max_tokens=8,
                        requests_per_minute=0, embedding_batch=batch, max_embedding_inputs=max(inputs, 256),
                        max_embedding_chars=10_000_000)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    first, second = ({"model": EMBEDDING_MODEL, "input": texts(inputs, tag)} for tag in ("alone", "during"))
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            http.post("/api/memory", json={"text": "my boat is called Tern"}).raise_for_status()
            turn(http)  # warm: the first turn builds the assistant
            alone = statistics.median(turn(http) for _ in range(3))
            start = time.perf_counter()
            http.post("/v1/embeddings", json=first).raise_for_status()
            embed_alone = time.perf_counter() - start
            done = threading.Event()

            def big():
                with httpx.Client(base_url=url, timeout=600) as other:
                    other.post("/v1/embeddings", json=second).raise_for_status()
                done.set()

            runner = threading.Thread(target=big)
            runner.start()
            time.sleep(min(1.0, embed_alone / 4))  # the request is embedding by now
            during = turn(http)
            still_running = not done.is_set()
            runner.join()
    finally:
        server.should_exit = True
        thread.join(30)
    return {"batch": batch, "alone": alone, "during": during, "embed": embed_alone, "overlap": still_running}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=256, help="texts in the embeddings request (~60 words each)")
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        rows = [case(batch, args.inputs, str(Path(folder) / f"b{batch}.db")) for batch in (100_000, Settings.embedding_batch)]
    table = ["| embedder taken | turn alone (s) | turn during the request (s) | request alone (s) | request still running when the turn answered |",
             "|---|---|---|---|---|"]
    for r in rows:
        how = "for the whole request" if r["batch"] > args.inputs else f"per batch of {r['batch']} (fair lock)"
        table.append(f"| {how} | {r['alone']:.2f} | {r['during']:.2f} | {r['embed']:.1f} | {'yes' if r['overlap'] else 'no'} |")
    print("\n".join(table))
    if args.write:
        head = (f"\n## A turn during a big /v1/embeddings request ({datetime.date.today()}, commit {commit()})\n\n"
                f"Machine: {cpu_name()}, shared with other jobs (figures are loaded-machine figures). Command: "
                f"`.venv/bin/python benchmarks/embed_stall.py --inputs {args.inputs}`. SmolLM2 answers in at most 8 "
                f"tokens; the request has {args.inputs} texts of ~60 words.\n")
        append_section(head + "\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
