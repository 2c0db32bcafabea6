"""Where ingest time goes besides the encoder's matmuls: each phase of `parley ingest` run alone, in series.

    python benchmarks/ingest_phases.py                      # 40 pages of the Python docs (seed 0)
    python benchmarks/ingest_phases.py --pages 0            # every page
    python benchmarks/ingest_phases.py --encoder-ops        # also: the encoder's time by operation (profiler)

For a sample of pages of the manual (benchmarks/ingest.py's list, shuffled by seed 0), times
reading and chunking (HTML by readers.py, `_read_one`), tokenizing the chunks, embedding
them (the encoder, its own tokenizing included), and storing them (SQLite rows, the FTS5 index
and the vectors, one transaction per page), each phase alone so none hides behind another; and
the padding the length-sorted batches waste (batches of `--batch-size` inside flushes of 512
chunks, as `ingest` embeds). `parley ingest` overlaps reading with the encoder on a thread, so
on two cores the reading costs CPU the encoder could use: the shares printed are of the serial
sum. Run with OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest import DOCS, GENERATED, encoder_flops  # noqa: E402

from parley.pipeline.embed import Embedder, to_blob  # noqa: E402
from parley.pipeline.knowledge import KnowledgeConfig, _read_one  # noqa: E402
from parley.store import Store  # noqa: E402


def manual(docs: Path) -> list[Path]:
    pages = sorted(docs.rglob("*.html"))
    return [p for p in pages if not any(part.startswith((".", "_")) for part in p.relative_to(docs).parts)
            and not p.name.startswith(GENERATED)]


def padding_waste(lengths: np.ndarray, batch_size: int, flush: int = 512) -> float:
    """Share of the tokens the encoder computes that are padding, batching as `ingest` does."""
    pad = real = 0
    for start in range(0, len(lengths), flush):
        ordered = np.sort(lengths[start : start + flush])
        for b in range(0, len(ordered), batch_size):
            batch = ordered[b : b + batch_size]
            pad += int(batch.max()) * len(batch) - int(batch.sum())
            real += int(batch.sum())
    return pad / max(pad + real, 1)


def phases(pages: list[Path], batch_size: int) -> None:
    seconds = {}
    began = time.perf_counter()
    reads = [_read_one(p, p.name, KnowledgeConfig(), {}, "bench") for p in pages]
    seconds["read and chunk"] = time.perf_counter() - began
    reads = [r for r in reads if hasattr(r, "chunks")]
    texts = [c.text for r in reads for c in r.chunks]
    embedder = Embedder.load(precision="auto")
    began = time.perf_counter()
    lengths = np.array([len(e.ids) for e in embedder.tokenizer.encode_batch(texts)])
    tokenize = time.perf_counter() - began  # inside the encoder's phase too: printed apart, not summed
    began = time.perf_counter()
    vectors = embedder.encode(texts, batch_size=batch_size, remember=False)
    seconds["encode (tokenizing included)"] = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "phases.db") as store:
        user = store.add_user("bench").id
        began, at = time.perf_counter(), 0
        for r in reads:
            mine = vectors[at : at + len(r.chunks)]
            at += len(r.chunks)
            store.add_document(user, r.name, r.mime, [c.text for c in r.chunks], sha256=r.digest,
                               pages=[c.page for c in r.chunks], embeddings=[to_blob(v) for v in mine])
        seconds["store (SQLite, FTS5, vectors)"] = time.perf_counter() - began
    total = sum(seconds.values())
    flops = sum(encoder_flops(embedder, int(n)) for n in lengths)
    print(f"{len(pages)} pages, {len(texts)} chunks, {lengths.mean():.0f} tokens a chunk on average "
          f"({np.mean(lengths >= embedder.max_tokens):.0%} cut at {embedder.max_tokens}); encoder {embedder.precision}, "
          f"{torch.get_num_threads()} threads")
    print("| phase | seconds | ms per chunk | share of the serial sum |\n|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.1f} | {1000 * s / len(texts):.2f} | {s / total:.0%} |")
    print(f"| (of the encoding: tokenizing) | {tokenize:.1f} | {1000 * tokenize / len(texts):.2f} | {tokenize / total:.0%} |")
    print(f"encoder {flops / 1e9 / seconds['encode (tokenizing included)']:.0f} GFLOP/s; padding in batches of "
          f"{batch_size}: {padding_waste(lengths, batch_size):.1%} of the tokens computed")


def encoder_ops(batch_size: int, tokens: int = 256, repeats: int = 3) -> None:
    """Where the encoder's own time goes: torch's profiler over `repeats` batches of full-length texts."""
    from torch.profiler import ProfilerActivity, profile

    embedder = Embedder.load(precision="auto")
    batch = [[101] + [1996] * (tokens - 2) + [102]] * batch_size  # "[CLS] the the ... [SEP]": no padding
    with torch.inference_mode():
        embedder._forward(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                embedder._forward(batch)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    print(f"encoder ({embedder.precision}), {repeats} batches of {batch_size} x {tokens} tokens: "
          f"{total / 1e6 / repeats:.2f} s a batch; share of its time by operation:")
    for e in rows[:8]:
        print(f"  {e.key:55} {e.self_cpu_time_total / total:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=Path, default=DOCS, help="folder of the manual (apt-get install python3.11-doc)")
    ap.add_argument("--pages", type=int, default=40, help="pages sampled (seed 0); 0: all")
    ap.add_argument("--batch-size", type=int, default=32, help="texts per encoder batch, as benchmarks/ingest.py")
    ap.add_argument("--encoder-ops", action="store_true", help="also profile the encoder's operations")
    args = ap.parse_args()
    if not args.docs.is_dir():
        sys.exit(f"no manual at {args.docs}: apt-get install python3.11-doc, or give --docs FOLDER")
    if args.pages < 0 or args.batch_size < 1:
        sys.exit("--pages must be 0 or more and --batch-size at least 1")
    torch.set_flush_denormal(True)
    pages = manual(args.docs)
    random.Random(0).shuffle(pages)
    phases(pages[: args.pages] if args.pages else pages, args.batch_size)
    if args.encoder_ops:
        encoder_ops(args.batch_size)


if __name__ == "__main__":
    main()
