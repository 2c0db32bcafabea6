"""The MiniLM encoder's three forms on one batch of 32 x 256 tokens, alternated in one process:
the plain modules (what runs with gradients), the fused linear layers (oneDNN: bias, GELU and
residual inside the product), and those plus kernels.c's attention on AMX tiles.

    python benchmarks/probes/encoder_layers.py             # 4 rounds, process CPU seconds per batch
    OMP_NUM_THREADS=1 python benchmarks/probes/encoder_layers.py --rounds 3   # one thread (a loaded machine)

Prints each form's cosine to the fp32 encoder (the tolerance tests/test_embed.py holds is 0.999)
and the process CPU time of each round, which a busy neighbour distorts less than wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import parley.pipeline.embed as embed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    bf16, fp32 = embed.Embedder.load(precision="bf16"), embed.Embedder.load(precision="fp32")
    tokens = torch.randint(1000, 20000, (32, 256), generator=torch.Generator().manual_seed(0))
    keep = torch.ones(32, 256, dtype=torch.bool)
    keep[::3, 200:] = False  # a third of the rows padded
    tile_attention = embed._tile_attention

    def run(model: embed.Embedder, fused: bool, tiles: bool) -> torch.Tensor:
        embed._FUSED = fused
        embed._tile_attention = tile_attention if tiles else (lambda *a: None)
        try:
            with torch.inference_mode():
                x = model.embed_tokens(tokens)
                for layer in model.layers:
                    x = layer(x, keep[:, None, None, :])
                return model.mean_pool(x, keep)
        finally:
            embed._FUSED, embed._tile_attention = True, tile_attention

    forms = {"plain": (False, False), "fused linear": (True, False), "fused + tile attention": (True, True)}
    reference = run(fp32, False, False)
    for name, (fused, tiles) in forms.items():
        print(f"{name}: min cosine to fp32 {F.cosine_similarity(run(bf16, fused, tiles), reference).min():.6f}")
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, (fused, tiles) in forms.items():
            start = time.process_time()
            run(bf16, fused, tiles)
            times[name].append(time.process_time() - start)
    for name, ts in times.items():
        print(f"{name}: {' '.join(f'{t * 1e3:.0f}' for t in ts)} ms CPU a batch (median {sorted(ts)[len(ts) // 2] * 1e3:.0f})")
    print(f"torch threads {torch.get_num_threads()}; tile attention offered: {embed._attention_kernel() is not None}")


if __name__ == "__main__":
    main()
