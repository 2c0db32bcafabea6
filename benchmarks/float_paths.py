"""One projection of SmolLM2-135M's shapes on each float path of the C kernels (kernels.c's
float_linear: AVX512-BF16 dot products, AVX-512 FMAs, AVX2 FMAs; the AVX-512 paths also on weights
packed as the engine reads them, fast.py's pack_float) against PyTorch's matmul, in GFLOP/s, one
thread: which path is fastest on this CPU for a decode batch and a prompt chunk.

    .venv/bin/python benchmarks/float_paths.py --no-amx            # print the table
    .venv/bin/python benchmarks/float_paths.py --no-amx --quick    # 10 tries instead of 40

The contenders alternate, and each case reports the best of `--tries` (the least disturbed by
other work on the machine). With --no-amx PyTorch's oneDNN is capped at AVX512_CORE_BF16, as on
a CPU without AMX (record.no_amx).
"""

from __future__ import annotations

import argparse
import time

from record import cpu_name, no_amx

no_amx()  # before torch is imported

import torch

from parley.engine.fast import FLOAT_CEILING, kernels, pack_float

SHAPES = [(1, 576, 1536), (8, 576, 1536), (512, 576, 1536), (512, 1536, 576)]  # rows of x, inputs, outputs
PATHS = ("avx512-bf16", "avx512-fma", "avx2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tries", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="10 tries")
    ap.add_argument("--no-amx", action="store_true", help="cap oneDNN at AVX512_CORE_BF16 (set before torch "
                                                          "is imported)")
    args = ap.parse_args()
    tries = 10 if args.quick else args.tries
    if tries < 1:
        ap.error("--tries must be positive")
    lib = kernels()
    if lib is None:
        raise SystemExit("the C kernels did not build: is a C compiler installed?")
    torch.set_num_threads(1)
    print(f"{cpu_name(flags=True)}; one thread; best of {tries}")
    levels = {p: FLOAT_CEILING[p] for p in PATHS if lib.float_isa(FLOAT_CEILING[p]) == FLOAT_CEILING[p]}
    levels.update({f"{p} packed": level for p, level in list(levels.items()) if p.startswith("avx512")})
    print("| weights | rows x inputs -> outputs | " + " | ".join(f"{p} GFLOP/s" for p in levels) + " | torch GFLOP/s |")
    print("|---|---|" + "---|" * (len(levels) + 1))
    for dtype in (torch.bfloat16, torch.float32):
        for B, I, O in SHAPES:
            w, x = torch.randn(O, I).to(dtype), torch.randn(B, I)
            xt, y, xb = x.to(dtype), torch.empty(B, O), torch.empty(B * I, dtype=torch.int16)
            wp = pack_float(w)
            runs = {p: (lambda level=level, packed=p.endswith("packed"):
                        lib.float_linear((wp if packed else w).data_ptr(), int(dtype == torch.bfloat16), level,
                                         int(packed), x.data_ptr(), xb.data_ptr(), y.data_ptr(), B, I, O, 1))
                    for p, level in levels.items() if not (p.startswith("avx512-bf16") and dtype == torch.float32)}
            runs["torch"] = lambda: xt @ w.t()
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(tries):
                for name, run in runs.items():
                    t = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - t)
            rate = {name: 2 * B * I * O / s / 1e9 for name, s in best.items()}
            cells = [f"{rate[p]:.0f}" if p in rate else "-" for p in levels]
            print(f"| {str(dtype).removeprefix('torch.')} | {B} x {I} -> {O} | " + " | ".join(cells)
                  + f" | {rate['torch']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
