"""Seconds per fine-tuning step of the cross-encoder reranker (parley/train/rerank.py::fine_tune).

    OMP_NUM_THREADS=1 python benchmarks/rerank_step.py --db /tmp/python-docs.db     # a store with chunks
    python benchmarks/rerank_step.py --db ... --layers 2,6 --tokens 160,256 --steps 3

Times `fine_tune` on 16 groups of 1 question and 4 real chunks of the store (4 questions a step,
so 16 pairs), for each number of trained top layers and each pair length, all in one process so
the figures can be compared on a shared machine. The question is ten words of the answer chunk:
this measures speed, not what the reranker learns.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parley.pipeline.embed import Embedder, fast_bf16  # noqa: E402
from parley.train.rerank import RerankTrainConfig, fine_tune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, required=True, help="a SQLite store with at least 2,000 chunks")
    ap.add_argument("--layers", default="2,6", help="trained top layers to compare, comma-separated")
    ap.add_argument("--tokens", default="160,256", help="pair lengths to compare, comma-separated")
    ap.add_argument("--steps", type=int, default=3, help="steps timed for each setting")
    args = ap.parse_args()
    if not args.db.is_file() or args.steps < 1:
        sys.exit(f"need an existing --db (got {args.db}) and --steps >= 1")
    texts = [t for (t,) in sqlite3.connect(args.db).execute("SELECT text FROM chunks ORDER BY id LIMIT 2000")]
    if len(texts) < 2000:
        sys.exit(f"{args.db} holds {len(texts)} chunks; need 2,000")
    rng = random.Random(0)
    groups = [(" ".join(texts[i * 50].split()[5:15]), [texts[i * 50], *rng.sample(texts, 3)], "template")
              for i in range(16)]
    embedder = Embedder.load()
    print(f"{torch.get_num_threads()} thread(s); bf16 in hardware: {fast_bf16()}")
    for layers in map(int, args.layers.split(",")):
        for tokens in map(int, args.tokens.split(",")):
            cfg = RerankTrainConfig(steps=args.steps, batch=4, train_layers=layers, max_tokens=tokens)
            began = time.perf_counter()
            fine_tune(embedder, groups, cfg, log=lambda line: None)
            print(f"top {layers} layers trained, pairs of up to {tokens} tokens: "
                  f"{(time.perf_counter() - began) / args.steps:.1f} s a step (4 questions x 4 passages)", flush=True)


if __name__ == "__main__":
    main()
