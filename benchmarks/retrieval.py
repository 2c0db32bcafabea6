"""Knowledge retrieval on the Python 3.11 documentation: recall@5 of BM25, dense and hybrid search.

    .venv/bin/python benchmarks/retrieval.py            # ingest, ask, print the table
    .venv/bin/python benchmarks/retrieval.py --write    # and append it to benchmarks/RESULTS.md

The pages listed in benchmarks/data/retrieval_questions.yml (48 library modules and the
tutorial, from Debian's python3.11-doc: `apt-get install python3.11-doc`) are ingested into a
fresh database by `parley.pipeline.knowledge.ingest`, timed end to end (reading, chunking,
embedding, storing). Each question is then asked of each ranking: BM25 alone (SQLite FTS5),
dense alone (MiniLM cosine) and both fused by reciprocal rank fusion, as `KnowledgeStage` does.
A question is answered when one of the top k passages comes from a page labelled as answering
it; recall@k is the share of questions answered, MRR the mean of 1/rank of the first such
passage (0 when none). `--db PATH` keeps the database, so a second run skips ingestion.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from record import append_section, commit, cpu_name

from parley.pipeline.embed import Embedder
from parley.pipeline.knowledge import MODES, KnowledgeConfig, VectorCache, ingest, search
from parley.store import Store

HERE = Path(__file__).parent
DOCS = Path("/usr/share/doc/python3.11/html")


def load_questions(path: Path, docs: Path) -> tuple[list[Path], list[dict]]:
    data = yaml.safe_load(path.read_text())
    pages = [docs / p for p in data["pages"]]
    missing = [p for p in pages if not p.is_file()]
    if missing:
        sys.exit(f"error: {missing[0]} is missing: install the docs with `apt-get install -y python3.11-doc`")
    names = [p.name for p in pages]
    if len(set(names)) != len(names):
        sys.exit("error: two pages share a file name, so passages could not be told apart")
    for q in data["questions"]:
        unknown = set(q["pages"]) - set(data["pages"])
        if unknown:
            sys.exit(f"error: question {q['q']!r} is labelled with pages that are not ingested: {unknown}")
    return pages, data["questions"]


def evaluate(store: Store, embedder, user: int, questions: list[dict], k: int, config: KnowledgeConfig) -> dict:
    """Per mode: recall@k, MRR@k, median ms per query, and the questions missed."""
    cache = VectorCache()
    search(store, embedder, user, "warm up", k, cache=cache, config=config)  # loads the vectors once
    results = {}
    for mode in MODES:
        ranks, times, missed = [], [], []
        for q in questions:
            start = time.perf_counter()
            found = search(store, embedder, user, q["q"], k, mode=mode, cache=cache, config=config)
            times.append((time.perf_counter() - start) * 1000)
            answers = {Path(p).name for p in q["pages"]}
            rank = next((r for r, c in enumerate(found, 1) if c.chunk.document_name in answers), None)
            ranks.append(rank)
            if rank is None:
                missed.append((q["q"], [c.chunk.document_name for c in found[:3]]))
        results[mode] = {
            "recall": sum(r is not None for r in ranks) / len(ranks),
            "mrr": sum(1 / r for r in ranks if r) / len(ranks),
            "ms": statistics.median(times),
            "missed": missed,
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=Path, default=DOCS, help=f"the HTML docs folder (default {DOCS})")
    ap.add_argument("--questions", type=Path, default=HERE / "data" / "retrieval_questions.yml")
    ap.add_argument("--k", type=int, default=5, help="passages per question")
    ap.add_argument("--db", type=Path, help="keep the database here (reused if it exists)")
    ap.add_argument("--verbose", action="store_true", help="list the questions each ranking missed")
    ap.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args()
    pages, questions = load_questions(args.questions, args.docs)
    config = KnowledgeConfig()
    with tempfile.TemporaryDirectory() as tmp, Store(args.db or Path(tmp) / "retrieval.db") as store:
        user = (store.get_user_by_name("bench") or store.add_user("bench")).id
        embedder = Embedder.load()
        start = time.perf_counter()
        ingested = ingest(store, embedder, user, pages, config=config)
        seconds = time.perf_counter() - start
        errors = [r for r in ingested if r.status == "error"]
        if errors:
            sys.exit(f"error: {errors[0]}")
        chunks = sum(r.chunks for r in ingested)
        total = store.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        words = sum(len(t.split()) for (t,) in store.db.execute("SELECT text FROM chunks"))
        if chunks:
            print(f"ingested {len(pages)} pages: {chunks} chunks in {seconds:.1f} s ({chunks / seconds:.1f} chunks/s)")
        else:
            print(f"reused {args.db}: {total} chunks")
        results = evaluate(store, embedder, user, questions, args.k, config)
    for mode, r in results.items():
        print(f"{mode:7} recall@{args.k} {r['recall']:.3f}  MRR {r['mrr']:.3f}  {r['ms']:.1f} ms/query")
        if args.verbose:
            for question, top in r["missed"]:
                print(f"    missed: {question}  (top: {', '.join(top)})")
    if args.write:
        if not chunks:
            sys.exit("error: --write needs a fresh ingestion (drop --db or give a new path) for the timing")
        write_results(args, len(pages), len(questions), chunks, words / total, seconds, results)


def write_results(args, pages: int, questions: int, chunks: int, words: float, seconds: float, results: dict) -> None:
    c = KnowledgeConfig()
    lines = [
        f"\n## Knowledge retrieval on the Python 3.11 docs ({datetime.date.today()}, commit {commit()})\n",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Command: `.venv/bin/python benchmarks/retrieval.py --write`. {pages} pages of Debian's python3.11-doc "
        f"(benchmarks/data/retrieval_questions.yml) ingested in {seconds:.0f} s: {chunks} chunks of at most "
        f"{c.chunk_words} words ({words:.0f} on average, {c.overlap_words} overlapping), {chunks / seconds:.1f} "
        f"chunks/s including reading, embedding (all-MiniLM-L6-v2) and storing. {questions} questions, each "
        f"labelled with the pages that answer it; a hit is a top-{args.k} passage from one of them.\n",
        f"| ranking | recall@{args.k} | MRR@{args.k} | median ms/query |",
        "|---|---|---|---|",
    ]
    names = {"bm25": "BM25 (FTS5)", "dense": "dense (MiniLM cosine)", "hybrid": f"hybrid (RRF, k={c.rrf_k})"}
    lines += [f"| {names[m]} | {r['recall']:.3f} | {r['mrr']:.3f} | {r['ms']:.1f} |" for m, r in results.items()]
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
