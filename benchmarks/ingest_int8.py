"""Would an int8 encoder pay for ingest? Its accuracy, simulated, and the speed of stock int8 products.

    python benchmarks/ingest_int8.py              # 96 chunks of 40 manual pages (seed 0)
    python benchmarks/ingest_int8.py --chunks 32  # a quicker look

Accuracy: the fp32 encoder with its linear layers' weights rounded to int8 per output channel
(symmetric, scale = max |w| / 127), alone and with each layer's input rounded to int8 per token
as well (what an int8 x int8 product computes; the products themselves stay fp32, so only the
rounding is measured), as cosines of each chunk's vector to fp32's. Speed: the best of 10
products of the encoder's widest shape (32 texts x 256 tokens by 384 -> 1536) through
`torch._int_mm` (int8 in, int32 out) and through bf16 `@`, alternated, on all threads.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval_manual import manual_pages  # noqa: E402

import parley.pipeline.embed as embed  # noqa: E402
from parley.pipeline.readers import read_chunks  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11/html")


def rounded(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`x` rounded to symmetric int8 with one scale per slice along `dim`, back in its dtype."""
    scale = x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-8) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def cosines(texts: list[str], activations: bool) -> np.ndarray:
    fp32 = embed.Embedder.load(precision="fp32")
    reference = fp32.encode(texts, remember=False)
    int8 = copy.deepcopy(fp32)
    for module in int8.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = rounded(module.weight.data, 1)
            if activations:
                module.register_forward_pre_hook(lambda _m, args: (rounded(args[0], -1),))
    fused, embed._FUSED = embed._FUSED, False  # the plain layer calls the modules, so the hooks run
    try:
        return (int8.encode(texts, remember=False) * reference).sum(1)
    finally:
        embed._FUSED = fused


def speed(repeats: int = 10) -> tuple[float, float]:
    """(int8 GOP/s, bf16 GFLOP/s), best of `repeats` each."""
    m, k, n = 32 * 256, 384, 1536
    a8, b8 = torch.randint(-127, 127, (m, k), dtype=torch.int8), torch.randint(-127, 127, (k, n), dtype=torch.int8)
    a16, b16 = torch.randn(m, k).bfloat16(), torch.randn(k, n).bfloat16()
    best = {"int8": float("inf"), "bf16": float("inf")}
    torch._int_mm(a8, b8), a16 @ b16
    for _ in range(repeats):
        for name, product in (("int8", lambda: torch._int_mm(a8, b8)), ("bf16", lambda: a16 @ b16)):
            start = time.perf_counter()
            product()
            best[name] = min(best[name], time.perf_counter() - start)
    return 2 * m * k * n / best["int8"] / 1e9, 2 * m * k * n / best["bf16"] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=Path, default=DOCS, help="the HTML docs folder (apt-get install python3.11-doc)")
    ap.add_argument("--chunks", type=int, default=96, help="chunks sampled from 40 pages")
    args = ap.parse_args()
    pages = manual_pages(args.docs)
    random.Random(0).shuffle(pages)
    texts = [c.text for p in pages[:40] for c in read_chunks(args.docs / p, 10**8, 200, 40)[2]]
    texts = random.Random(1).sample(texts, min(args.chunks, len(texts)))
    for name, activations in (("weights int8 per channel", False), ("and activations int8 per token", True)):
        cos = cosines(texts, activations)
        print(f"{name}: cosine to fp32 over {len(texts)} chunks: min {cos.min():.5f}, median {np.median(cos):.5f}")
    int8, bf16 = speed()
    print(f"products of 8192x384 by 384x1536, {torch.get_num_threads()} threads: torch._int_mm {int8:.0f} GOP/s, "
          f"bf16 @ {bf16:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
