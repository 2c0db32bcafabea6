"""Ingest speed on a whole manual: the Python 3.11 docs (Debian python3.11-doc), as `parley ingest` does it.

    python benchmarks/ingest.py                       # all 498 pages (not the generated indexes), precision auto
    python benchmarks/ingest.py --limit 40            # the first 40 pages: a quick run
    python benchmarks/ingest.py --precision fp32      # force the fp32 encoder (compare with bf16)
    python benchmarks/ingest.py --db docs.db          # keep the store (benchmarks/grounded.py reuses it)

Prints the CPU (model, the flags that matter), the encoder's path (fp32/bf16), chunks, seconds,
chunks per second, and the encoder's own share: its seconds, the GFLOP/s it sustained (the
multiply-adds of its linear layers and attention, counted per chunk from its token count), apart
for the batches it ran a thread short while the reader process worked, and
that as a fraction of this machine's matmul peak, measured by the script itself for fp32 and
bf16 (the best of a few 2048x2048 products on all threads). On a shared machine every figure
moves with the neighbours' load: compare runs made side by side.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parley.pipeline.embed import Embedder, cpu_flags  # noqa: E402
from parley.pipeline.knowledge import ingest  # noqa: E402
from parley.store import Store  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11/html")
GENERATED = ("genindex", "py-modindex", "search.html")  # Sphinx's generated index pages: no prose
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` n x n products in `dtype`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def encoder_flops(embedder: Embedder, tokens: int) -> float:
    """Multiply-add FLOPs of one sequence of `tokens` word pieces through the encoder."""
    layer = embedder.layers[0]
    d, hidden = layer.qkv.in_features, layer.up.out_features
    per_layer = 2 * tokens * (3 * d * d + d * d + 2 * d * hidden) + 4 * tokens * tokens * d
    return per_layer * len(embedder.layers)


class Timed:
    """The embedder, counting the seconds and FLOPs spent in it, in all and by the number of
    threads it ran on (ingest gives it one fewer while its reader process works)."""

    def __init__(self, embedder: Embedder, batch_size: int):
        self.embedder, self.batch_size = embedder, batch_size
        self.seconds = self.flops = 0.0
        self.texts = 0
        self.by_threads: dict[int, list[float]] = {}  # threads -> [texts, seconds, flops]

    def __call__(self, texts: list[str]):
        start = time.perf_counter()
        vectors = self.embedder.encode(texts, batch_size=self.batch_size, remember=False)
        seconds = time.perf_counter() - start
        # the encoder's own token counts: tokenizing a second time here would add to the wall time
        flops = sum(encoder_flops(self.embedder, n) for n in self.embedder.last_lengths)
        self.seconds, self.flops, self.texts = self.seconds + seconds, self.flops + flops, self.texts + len(texts)
        row = self.by_threads.setdefault(torch.get_num_threads(), [0, 0.0, 0.0])
        row[0], row[1], row[2] = row[0] + len(texts), row[1] + seconds, row[2] + flops
        return vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=Path, default=DOCS, help="folder of the manual (apt-get install python3.11-doc)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N pages (0: all)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=32, help="texts per encoder batch")
    ap.add_argument("--batch-chunks", type=int, default=512, help="chunks embedded together across files")
    ap.add_argument("--db", type=Path, help="SQLite file to fill (default: a temporary one, deleted after)")
    args = ap.parse_args()
    if not args.docs.is_dir():
        sys.exit(f"no manual at {args.docs}: apt-get install python3.11-doc, or give --docs FOLDER")
    pages = sorted(args.docs.rglob("*.html"))
    pages = [p for p in pages if not any(part.startswith((".", "_")) for part in p.relative_to(args.docs).parts)
             and not p.name.startswith(GENERATED)]
    if args.limit:
        pages = pages[: args.limit]

    torch.set_flush_denormal(True)
    flags = cpu_flags()
    print(f"cpu: {cpu_model()}; {torch.get_num_threads()} threads; flags: "
          f"{' '.join(f for f in FLAGS if f in flags) or 'none of ' + ' '.join(FLAGS)}")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (2048^3, best of 5): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    embedder = Timed(Embedder.load(precision=args.precision), args.batch_size)
    path = embedder.embedder.precision
    print(f"encoder path: {path} (asked: {args.precision}); {len(pages)} pages from {args.docs}")

    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "docs.db"
        with Store(db) as store:
            user = (store.get_user_by_name("bench") or store.add_user("bench")).id
            start = time.perf_counter()
            results = ingest(store, embedder, user, pages, "python-docs", batch_chunks=args.batch_chunks)
            seconds = time.perf_counter() - start
    stored = [r for r in results if r.status == "stored"]
    chunks = sum(r.chunks for r in stored)
    errors = [r for r in results if r.status == "error"]
    gflops = embedder.flops / max(embedder.seconds, 1e-9) / 1e9
    print(f"{len(results)} pages: {len(stored)} stored, {len(results) - len(stored) - len(errors)} unchanged, "
          f"{len(errors)} unreadable; {chunks} chunks in {seconds:.1f} s = {chunks / seconds:.1f} chunks/s")
    print(f"encoder: {embedder.texts} texts in {embedder.seconds:.1f} s ({embedder.seconds / seconds:.0%} of the "
          f"wall time), {embedder.flops / 1e12:.2f} TFLOP, {gflops:.0f} GFLOP/s = {gflops / peaks[path]:.0%} of the "
          f"{path} matmul peak")
    for threads, (texts, secs, flops) in sorted(embedder.by_threads.items()):
        print(f"  on {threads} thread{'s' * (threads != 1)}: {texts} texts in {secs:.1f} s, "
              f"{flops / max(secs, 1e-9) / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
