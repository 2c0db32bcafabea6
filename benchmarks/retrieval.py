"""Knowledge retrieval on the Python 3.11 documentation: recall@5 of BM25, dense and hybrid search.

    .venv/bin/python benchmarks/retrieval.py            # ingest, ask, print the table
    .venv/bin/python benchmarks/retrieval.py --write    # and append it to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/retrieval.py --manual python --db /tmp/python-docs.db   # the whole manual
    .venv/bin/python benchmarks/retrieval.py --manual python --db /tmp/python-docs.db --quick  # tuning set

`--manual python` ingests every page of the manual (benchmarks/retrieval_manual.py) and asks the
held-out questions of benchmarks/data/python_docs_questions.yml (`--quick`: the tuning set, which
is also what to look at while tuning), one table per method with recall@1, recall@5 and MRR for
paraphrased and keyword questions apart; a hit is a passage from a page that answers it. Every
figure on the held-out set counts as an evaluation round: note it in
benchmarks/data/python_docs_questions.md.

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

from retrieval_manual import ingest_manual, manual_pages

from parley.pipeline.embed import Embedder
from parley.pipeline.knowledge import MODES, KnowledgeConfig, VectorCache, ingest, search
from parley.pipeline.query_map import QueryMap
from parley.pipeline.rerank import Reranker
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


# What each method of the manual table changes: the chunk-level baseline is the fusion as it was
# before issue 17 (equal weights, no exact-name bonus, chunks ranked alone).
BASE = dict(identifier_weight=1.0, exact_bonus=0.0, per_page=0)
METHODS = {
    "BM25": ("bm25", BASE),
    "dense": ("dense", BASE),
    "hybrid (RRF)": ("hybrid", BASE),
    "+ identifier-aware fusion": ("hybrid", dict(BASE, identifier_weight=2.0, exact_bonus=1.0)),
    "+ page ranking (default)": ("hybrid", {}),
}


def rank_of(found, answers: set[str]) -> int | None:
    """1-based rank of the first passage from an answering page, None if none is in the list."""
    return next((r for r, c in enumerate(found, 1) if c.chunk.document_name in answers), None)


def evaluate_manual(store: Store, embedder, user: int, questions: list[dict], k: int, candidates: int,
                    reranker: Reranker | None = None, query_map: QueryMap | None = None,
                    rewrite: dict[str, str] | None = None, rerank_top: int = KnowledgeConfig().rerank_top) -> dict:
    """Per method and question kind: recall@1, recall@k, MRR@k and the questions missed at k.
    With a reranker, a query map or rewritten questions (question -> what is searched instead),
    one more method each: the default search with it."""
    cache = VectorCache()
    search(store, embedder, user, "warm up", k, cache=cache)
    vectors = {q["q"]: embedder([q["q"]]) for q in questions}  # embedded once, asked of every method
    table = {}
    same = {q["q"]: q["q"] for q in questions}
    methods = {name: (mode, overrides, {}, same) for name, (mode, overrides) in METHODS.items()}
    if reranker is not None:
        methods["+ cross-encoder reranker"] = ("hybrid", {"rerank_top": rerank_top}, {"reranker": reranker}, same)
    if query_map is not None:
        methods["+ reranker (trained query map)"] = ("hybrid", {}, {"query_map": query_map}, same)
    if rewrite is not None:
        vectors |= {text: embedder([text]) for text in rewrite.values() if text not in vectors}
        methods["+ query rewriting by the model"] = ("hybrid", {}, {}, rewrite)
    for name, (mode, overrides, extra, searched) in methods.items():
        config = KnowledgeConfig(**{"candidates": candidates, **overrides})
        rows, times = {}, []
        for kind in ("paraphrased", "keyword"):
            asked = [q for q in questions if q["kind"] == kind]
            ranks = []
            for q in asked:
                began = time.perf_counter()
                found = search(store, lambda texts, s=searched[q["q"]]: vectors[s], user, searched[q["q"]], k,
                               mode=mode, cache=cache, config=config, **extra)
                times.append(time.perf_counter() - began)
                ranks.append(rank_of(found, set(q["pages"])))
            rows[kind] = {"n": len(asked), "r1": sum(r == 1 for r in ranks) / len(asked),
                          "rk": sum(r is not None for r in ranks) / len(asked),
                          "mrr": sum(1 / r for r in ranks if r) / len(asked),
                          "missed": [q["q"] for q, r in zip(asked, ranks) if r is None]}
        rows["ms"] = 1000 * statistics.median(times)  # per query, the question already embedded
        table[name] = rows
        print(manual_table({name: rows}, k)[2], flush=True)  # each method's row as soon as it is done
    return table


def rewritten(questions: list[dict], model: str) -> dict[str, str]:
    """question -> the question and the passage `model` wrote for it (parley/pipeline/rewrite.py)."""
    from parley.engine.config import EngineConfig
    from parley.engine.engine import Engine
    from parley.pipeline.rewrite import QueryRewriter
    from parley.registry import Registry

    torch.set_flush_denormal(True)
    config = EngineConfig()
    lm, tokenizer, _ = Registry().load(model, dtype=getattr(torch, config.dtype))
    asked = [q["q"] for q in questions]
    out = dict(zip(asked, QueryRewriter(Engine.from_config(lm, config), tokenizer)(asked)))
    for q in asked[:3]:
        print(f"rewritten: {out[q]!r}", flush=True)
    return out


def manual_main(args) -> None:
    if args.manual != "python":
        sys.exit(f"error: the only manual is 'python', not {args.manual!r}")
    questions_path = args.questions or HERE / "data" / ("python_docs_tuning.yml" if args.quick else
                                                       "python_docs_questions.yml")
    questions = yaml.safe_load(questions_path.read_text())["questions"]
    pages = set(manual_pages(args.docs))
    unknown = {p for q in questions for p in q["pages"]} - pages
    if unknown:
        sys.exit(f"error: questions are labelled with pages the manual does not have: {sorted(unknown)[:3]}")
    have: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "manual.db"
        if args.as_is:  # a partial ingestion: ask only what its pages can answer
            if not args.db or not args.db.exists():
                sys.exit("error: --as-is needs --db with an ingested manual")
            seconds = 0.0
        else:
            seconds, chunks = ingest_manual(db, args.docs, log=print if args.verbose else lambda r: None)
        with Store(db) as store:
            user = store.get_user_by_name("bench").id
            have = {d.name for d in store.list_documents(user)}
            chunks = store.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
            asked = [q for q in questions if set(q["pages"]) & have]
            print(f"{len(have)} of {len(pages)} pages, {chunks} chunks: " + (
                f"ingested in {seconds:.0f} s ({chunks / seconds:.1f} chunks/s)" if seconds else f"reused {db}")
                + f"; {len(asked)} of {len(questions)} questions have an answering page in it")
            questions = asked
            embedder = Embedder.load()
            reranker = Reranker.load(embedder, args.reranker) if args.reranker else None
            query_map = QueryMap.load(args.query_map) if args.query_map else None
            rewrite = rewritten(questions, args.rewrite) if args.rewrite else None
            table = evaluate_manual(store, embedder, user, questions, args.k, args.candidates, reranker, query_map,
                                    rewrite, args.rerank_top)
    print(f"questions: {questions_path.name}")
    lines = manual_table(table, args.k)
    print("\n".join(lines))
    if args.verbose:
        for name, rows in table.items():
            for kind in ("paraphrased", "keyword"):
                for q in rows[kind]["missed"]:
                    print(f"  {name} missed ({kind}): {q}")
    if args.write:
        head = (f"\n## Retrieval on the whole Python 3.11 manual ({datetime.date.today()}, commit {commit()})\n\n"
                f"Machine: {cpu_name()}, {os.cpu_count()} cores. Command: `.venv/bin/python benchmarks/retrieval.py "
                f"--manual python{' --quick' if args.quick else ''} --write`. {len(have)} of {len(pages)} pages, "
                f"{chunks} chunks, {len(questions)} questions"
                + (f", ingested in {seconds:.0f} s" if seconds else "") + f"; questions: {questions_path.name}.\n")
        append_section(head + "\n".join(lines))


def manual_table(table: dict, k: int) -> list[str]:
    lines = [f"| method | paraphrased R@1 | R@{k} | MRR | keyword R@1 | R@{k} | MRR | median ms/query |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in table.items():
        cells = [f"{rows[kind][m]:.3f}" for kind in ("paraphrased", "keyword") for m in ("r1", "rk", "mrr")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rows['ms']:.0f} |")
    n = {kind: next(iter(table.values()))[kind]["n"] for kind in ("paraphrased", "keyword")}
    lines.append(f"\n({n['paraphrased']} paraphrased, {n['keyword']} keyword questions; R@n: share with a passage "
                 "from an answering page in the top n; MRR: mean 1/rank of the first, 0 past n.)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=Path, default=DOCS, help=f"the HTML docs folder (default {DOCS})")
    ap.add_argument("--questions", type=Path, help="questions file (default: the mode's own)")
    ap.add_argument("--manual", help="'python': ingest the whole manual and ask python_docs_questions.yml")
    ap.add_argument("--quick", action="store_true", help="with --manual: the tuning questions instead")
    ap.add_argument("--as-is", action="store_true", help="with --manual --db: ingest nothing more, ask only "
                    "the questions whose pages are in the database")
    ap.add_argument("--reranker", type=Path, help="with --manual: also measure this reranker head "
                    "(`parley train reranker`)")
    ap.add_argument("--rerank-top", type=int, default=KnowledgeConfig().rerank_top,
                    help="with --reranker: how many of the best fused chunks it reorders")
    ap.add_argument("--query-map", type=Path, help="with --manual: also measure this trained query map "
                    "(`parley train reranker --kind map`)")
    ap.add_argument("--rewrite", help="with --manual: also measure the questions rewritten by this model "
                    "(benchmarks/rewrite.py; e.g. smollm2)")
    ap.add_argument("--candidates", type=int, default=KnowledgeConfig().candidates,
                    help="with --manual: chunks taken from each ranking")
    ap.add_argument("--k", type=int, default=5, help="passages per question")
    ap.add_argument("--db", type=Path, help="keep the database here (reused if it exists)")
    ap.add_argument("--verbose", action="store_true", help="list the questions each ranking missed")
    ap.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.manual:
        return manual_main(args)
    pages, questions = load_questions(args.questions or HERE / "data" / "retrieval_questions.yml", args.docs)
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
