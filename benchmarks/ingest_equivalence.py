"""Does the fast encoder change retrieval? The 65-page retrieval set ingested twice, by the fp32
and by the bf16 encoder, and searched with the same fp32 query encoder (what `parley chat` uses).

    python benchmarks/ingest_equivalence.py            # both ingests, the vectors compared, recall per ranking
    python benchmarks/ingest_equivalence.py --limit 10 # the first 10 pages and the questions they answer

Prints the cosine between each chunk's fp32 and bf16 vectors (minimum, 1st percentile, median)
and, per ranking (BM25, dense, hybrid), recall@5 and MRR for both stores, using
benchmarks/retrieval.py's questions and scoring. Then the int8 path that was left out: torch's
dynamic quantization of the encoder's linear layers, its cosine to fp32 on the first 64 chunks.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import DOCS, HERE, evaluate, load_questions  # noqa: E402

from parley.pipeline.embed import Embedder  # noqa: E402
from parley.pipeline.knowledge import KnowledgeConfig, ingest  # noqa: E402
from parley.store import Store  # noqa: E402


def vectors(db: Path) -> dict[tuple[str, int], np.ndarray]:
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT d.name, k.ord, k.embedding FROM chunks k JOIN documents d ON d.id = k.document_id")
        return {(name, ord): np.frombuffer(blob, np.float32) for name, ord, blob in rows}


def int8_cosines(encoder: Embedder, texts: list[str]) -> np.ndarray:
    """Cosine of each text's vector from the dynamically quantized (int8) encoder to fp32's."""
    import copy
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated: one reason it is not used
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8)
    return (encoder.encode(texts, remember=False) * int8.encode(texts, remember=False)).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0, help="only the first N pages (0: all 65)")
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    pages, questions = load_questions(HERE / "data" / "retrieval_questions.yml", DOCS)
    if args.limit:
        pages = pages[: args.limit]
        names = {p.name for p in pages}
        questions = [q for q in questions if {Path(p).name for p in q["pages"]} <= names]
    query = Embedder.load(precision="fp32")
    config = KnowledgeConfig()
    results, stored = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            db = Path(tmp) / f"{precision}.db"
            with Store(db) as store:
                user = store.add_user("bench").id
                encoder = query if precision == "fp32" else Embedder.load(precision="bf16")
                start = time.perf_counter()
                done = ingest(store, encoder, user, pages, config=config)
                seconds = time.perf_counter() - start
                chunks = sum(r.chunks for r in done)
                print(f"{precision}: {len(pages)} pages, {chunks} chunks in {seconds:.1f} s "
                      f"({chunks / seconds:.1f} chunks/s)", flush=True)
                results[precision] = evaluate(store, query, user, questions, args.k, config)
            stored[precision] = vectors(db)
            if precision == "fp32":
                with sqlite3.connect(db) as c:
                    sample = [t for (t,) in c.execute("SELECT text FROM chunks ORDER BY id LIMIT 64")]
    assert stored["fp32"].keys() == stored["bf16"].keys()
    cos = np.array([float(stored["fp32"][key] @ stored["bf16"][key]) for key in stored["fp32"]])
    print(f"chunk vectors, fp32 vs bf16 encoder: {len(cos)} chunks, cosine min {cos.min():.6f}, "
          f"1st percentile {np.percentile(cos, 1):.6f}, median {np.median(cos):.6f}")
    print(f"{len(questions)} questions; queries embedded in fp32")
    print(f"| ranking | recall@{args.k} fp32 | recall@{args.k} bf16 | MRR fp32 | MRR bf16 |")
    print("|---|---|---|---|---|")
    for mode in results["fp32"]:
        a, b = results["fp32"][mode], results["bf16"][mode]
        print(f"| {mode} | {a['recall']:.3f} | {b['recall']:.3f} | {a['mrr']:.3f} | {b['mrr']:.3f} |")
    cos = int8_cosines(query, sample)
    print(f"int8 (torch dynamic quantization), {len(cos)} chunks: cosine to fp32 min {cos.min():.4f}, "
          f"median {np.median(cos):.4f} (tolerance 0.999: left out)")


if __name__ == "__main__":
    main()
