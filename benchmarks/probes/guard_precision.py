"""Does the guard's mE5 head decide the same in bf16 as in the fp32 it was calibrated in? Scores the own
splits' texts that the language gate sends to the mE5 head (the unseen fold, the unglossed languages,
Dutch, the calibration fold) with mE5 in fp32 and in the precision the guard now runs it in ("auto":
bf16 on kernels.c's AVX512-BF16 path or AMX tiles where the CPU has them), and counts the texts whose
decision changes (any label crossing its threshold) and the largest change of a probability.

    OMP_NUM_THREADS=2 python benchmarks/probes/guard_precision.py [--head FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import cpu_name  # noqa: E402

from parley.pipeline.e5 import shared_e5  # noqa: E402
from parley.pipeline.embed import Embedder  # noqa: E402
from parley.pipeline.guard import GatedGuard, Guard, shipped_path  # noqa: E402
from parley.train.guard_data import load_all, split  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head", default=str(shipped_path()))
    args = ap.parse_args()
    guard = Guard.load(args.head, Embedder.load())
    if not isinstance(guard, GatedGuard):
        raise SystemExit(f"{args.head} is not a gated guard: it has no mE5 head")
    s = split(load_all())
    texts = sorted({e.text for rows in (s.val, *s.test.values()) for e in rows})
    other = [t for t, english in zip(texts, GatedGuard.routes(texts)) if not english]
    head = guard.other
    auto = head.embedder
    print(f"{cpu_name(flags=True)}; {torch.get_num_threads()} threads; {len(other)} of {len(texts)} own-split "
          f"texts go to the mE5 head; mE5 'auto' = {auto.precision} on {auto.linear_path}")
    fast = head.probabilities(other)
    head.embedder = shared_e5("fp32")
    exact = head.probabilities(other)
    head.embedder = auto
    flips = ((fast >= head.thresholds) != (exact >= head.thresholds)).any(1)
    print(f"decisions changed: {int(flips.sum())} of {len(other)} texts; largest probability change "
          f"{float(np.abs(fast - exact).max()):.5f}; mean {float(np.abs(fast - exact).mean()):.6f}")


if __name__ == "__main__":
    torch.set_flush_denormal(True)
    main()
