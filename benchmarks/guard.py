"""Benchmark the guard: its figures on its own held-out splits, on a held-out evaluation folder,
and its latency per message.

    python benchmarks/guard.py                      # own splits + latency (a few minutes on 2 cores)
    python benchmarks/guard.py --quick              # latency on 50 messages, own "unseen written" split only
    python benchmarks/guard.py --heldout benchmarks/data/guard_heldout   # the frozen evaluation sets
    python benchmarks/guard.py --head FILE          # another head than the shipped one

Latency is the guard's p50/p95 per message, single messages as the input stage sees them:
"full" includes the MiniLM embedding of the message, "marginal" reuses an embedding already
computed (the pipeline's NLU stage embeds the same message, and the embedder remembers it).
Figures depend on the machine's load: say so when you record them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parley.pipeline.embed import Embedder  # noqa: E402
from parley.pipeline.guard import Guard, shipped_path  # noqa: E402
from parley.train.guard import describe, report  # noqa: E402
from parley.train.guard_data import Example, load_templates, load_written, split  # noqa: E402


def own_splits(guard: Guard, quick: bool) -> dict:
    s = split(load_written() + load_templates())
    sets = {"calibration fold": s.val, **s.test}
    if quick:
        sets = {"unseen written": s.test["unseen written"]}
    return {name: report(guard.probabilities([e.text for e in ex]), ex, guard.thresholds) for name, ex in sets.items()}


def load_heldout(folder: Path) -> dict[str, list[Example]]:
    """The evaluation folder's files as Examples, per file (see the format notes in RESULTS.md)."""
    out: dict[str, list[Example]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out[path.stem] = [_example(row, path) for row in rows]
    if not out:
        raise SystemExit(f"{folder}: no .jsonl files")
    return out


def _example(row: dict, path: Path) -> Example:
    raise SystemExit(f"{path}: the row format is not known yet: {sorted(row)}")


def latency(guard: Guard, embedder: Embedder, n: int) -> dict:
    texts = [f"message {i}: how do I get from the station to the museum on day {i}?" for i in range(n)]
    guard.score(texts[0])  # warm up
    full, marginal = [], []
    for text in texts[1:]:
        t0 = time.perf_counter()
        guard.score(text)  # embeds the message (not seen before)
        t1 = time.perf_counter()
        guard.score(text)  # the embedding is remembered now, as after the NLU stage
        full.append((t1 - t0) * 1000)
        marginal.append((time.perf_counter() - t1) * 1000)
    return {"messages": len(full),
            "full_ms": {"p50": round(statistics.median(full), 2), "p95": round(sorted(full)[int(0.95 * len(full))], 2)},
            "marginal_ms": {"p50": round(statistics.median(marginal), 2),
                            "p95": round(sorted(marginal)[int(0.95 * len(marginal))], 2)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head", default=str(shipped_path()))
    ap.add_argument("--heldout", default="", help="a folder of held-out evaluation files")
    ap.add_argument("--quick", action="store_true", help="short run: 50 messages, one own split")
    args = ap.parse_args()
    embedder = Embedder.load()
    guard = Guard.load(args.head, embedder)
    if args.heldout:
        sets = load_heldout(Path(args.heldout))
        for name, examples in sets.items():
            fig = report(guard.probabilities([e.text for e in examples]), examples, guard.thresholds)
            print(describe(f"held-out {name}", fig))
            if "per_principle" in fig:
                print("  per principle: " + ", ".join(f"{p} {a}/{n}" for p, (a, n) in fig["per_principle"].items() if n))
        return 0
    for name, fig in own_splits(guard, args.quick).items():
        print(describe(f"own split, {name}", fig))
    print("latency:", latency(guard, embedder, 50 if args.quick else 300))
    return 0


if __name__ == "__main__":
    sys.exit(main())
