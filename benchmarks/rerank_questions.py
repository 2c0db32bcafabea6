"""Questions SmolLM2 writes for sampled chunks of a store, for `parley train reranker --lm_questions`.

    python benchmarks/rerank_questions.py --db /tmp/python-docs.db --out lmq.jsonl             # 1,200 chunks
    python benchmarks/rerank_questions.py --db /tmp/python-docs.db --out lmq.jsonl --chunks 64 # a quick run

Samples `--chunks` chunk rows (seed 1) of 40+ words from the store, asks the chat model for one
question per chunk in batches of 16 (parley.train.rerank.lm_questions: greedy, the passage cut to
160 words) and appends {chunk_id, document_id, q} lines to `--out` as it goes, so a stopped run
keeps what it wrote. Never give it a measurement set: these are training questions.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import time
from pathlib import Path

import torch

from parley.engine.config import EngineConfig
from parley.engine.engine import Engine
from parley.registry import Registry
from parley.train.rerank import lm_questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, required=True, help="a SQLite store with the chunks")
    ap.add_argument("--out", type=Path, required=True, help="JSONL to append to")
    ap.add_argument("--chunks", type=int, default=1200, help="chunk rows sampled (those under 40 words are skipped)")
    ap.add_argument("--model", default="smollm2", help="registered chat model")
    args = ap.parse_args()
    if not args.db.is_file() or args.chunks < 1:
        raise SystemExit(f"error: need an existing --db (got {args.db}) and --chunks >= 1")
    torch.set_flush_denormal(True)
    rows = sqlite3.connect(args.db).execute("SELECT id, document_id, text FROM chunks ORDER BY id").fetchall()
    sample = [r for r in random.Random(1).sample(rows, min(args.chunks, len(rows))) if len(r[2].split()) >= 40]
    config = EngineConfig()
    model, tokenizer, _ = Registry().load(args.model, dtype=getattr(torch, config.dtype))
    engine = Engine.from_config(model, config)
    with args.out.open("a") as out:
        for start in range(0, len(sample), 16):
            part, began = sample[start : start + 16], time.perf_counter()
            asked = lm_questions(engine, tokenizer, [r[2] for r in part])
            for (chunk_id, doc, _), q in zip(part, asked):
                if q:
                    out.write(json.dumps({"chunk_id": chunk_id, "document_id": doc, "q": q}) + "\n")
            out.flush()
            print(f"{start + len(part)}/{len(sample)} chunks, {sum(q is not None for q in asked)} questions kept "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
