"""Probe: where a batched decode step's time goes off the AMX tiles. SmolLM2 in --dtype, --batch
rows of --context tokens each in a paged cache, decode steps through FastDecoder.step_paged
(tiles=False, the float path `--path` or the best float_isa picks), and then, with the same
threads, each projection of the step alone through kernels.c's float_linear over all 30 layers'
own matrices (so the weights come from memory as in a step): q, k, v, o, gate, up, down and the
output layer, packed as the step reads them (fast.py's pack_float) and as the model holds them
(the dot-product kernels). What the step takes beyond the sum of its products is attention, norms, rotation,
barriers; what engine.step() takes beyond the C call is Python and the scheduler.

    .venv/bin/python benchmarks/probes/decode_parts.py --dtype float32 --batch 8
    .venv/bin/python benchmarks/probes/decode_parts.py --dtype bfloat16 --path avx512-bf16
"""
import argparse
import time

import torch

from parley.engine.cache import CachedSequence, PagedKVCache
from parley.engine.fast import FLOAT_ISAS, FastDecoder, pack_float
from parley.model.weights import load_gguf
from parley.registry import smollm2_gguf


def best_of(runs: dict, tries: int) -> dict:
    """The least time of `tries` calls of each run() in ms, the runs taking turns (so that other
    work on the machine disturbs each alike), after one call each to warm up."""
    best = {}
    for name, run in runs.items():
        run()
        best[name] = float("inf")
    for _ in range(tries):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], (time.perf_counter() - t) * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=192, help="tokens already in each row's cache")
    ap.add_argument("--path", default="avx512", choices=["avx512", "avx512-fma", "avx512-bf16", "avx2", "scalar"])
    ap.add_argument("--tries", type=int, default=20)
    args = ap.parse_args()
    if args.batch < 1 or args.context < 1 or args.tries < 1:
        raise SystemExit("--batch, --context and --tries must be positive")
    model = load_gguf(smollm2_gguf())[0].to(getattr(torch, args.dtype)).eval()
    fast = FastDecoder.create(model, tiles=False, path=args.path)
    if fast is None:
        raise SystemExit("the C kernels did not build: is a C compiler installed?")
    lib, cfg = fast.lib, model.config
    cache = PagedKVCache(cfg, 2**29, 16, fast.kv_dtype)
    per = cache.pages_for(args.context + 1)
    seqs = [CachedSequence(tokens=[100 + (7 * b + i) % 4000 for i in range(args.context + 1)],
                           pages=list(range(b * per, (b + 1) * per)), length=args.context) for b in range(args.batch)]
    def build():
        for s in seqs:
            s.length = args.context
        return cache.batch([(s, 1) for s in seqs])
    with torch.inference_mode():
        batch = build()
        fast.step_paged(batch)  # keys and values at the new position, once: the cache is real
        building = best_of({0: build}, args.tries)[0]
        step = best_of({0: lambda: fast.step_paged(batch)}, args.tries)[0]
        c_calls = []
        call = lib.decode_step_paged

        def timed(*a):
            t = time.perf_counter()
            call(*a)
            c_calls.append((time.perf_counter() - t) * 1000)
        fast.lib = type("Timed", (), {"__getattr__": lambda _, n: timed if n == "decode_step_paged" else getattr(lib, n)})()
        for _ in range(args.tries):
            fast.step_paged(batch)
        c_ms = min(c_calls)
        fast.lib = lib

    w_bf16, level = int(args.dtype == "bfloat16"), fast.fisa
    B, layers = args.batch, model.model.layers
    x = torch.randn(B, max(cfg.hidden_size, cfg.intermediate_size))
    xb = torch.empty(x.numel(), dtype=torch.int16)

    def products(weights: list[torch.Tensor], packed: bool):
        ys = [torch.empty(B, w.shape[0]) for w in weights]
        shapes = [w.shape for w in weights]
        if packed:
            weights = [pack_float(w) for w in weights]

        def run():
            for w, (O, I), y in zip(weights, shapes, ys):
                lib.float_linear(w.data_ptr(), w_bf16, level, int(packed), x.data_ptr(), xb.data_ptr(), y.data_ptr(), B,
                                 I, O, 0)
        return run
    parts = {name: [getattr(getattr(block, where), name).weight for block in layers]
             for name, where in (("q_proj", "self_attn"), ("k_proj", "self_attn"), ("v_proj", "self_attn"),
                                 ("o_proj", "self_attn"), ("gate_proj", "mlp"), ("up_proj", "mlp"),
                                 ("down_proj", "mlp"))}
    parts["lm_head"] = [model.lm_head.weight]
    kinds = (True, False) if fast.packed else (False,)
    times = best_of({(name, packed): products(ws, packed) for name, ws in parts.items() for packed in kinds}, args.tries)
    nbytes = {name: sum(w.numel() * w.element_size() for w in ws) for name, ws in parts.items()}
    print(f"{args.dtype}, batch {B}, context {args.context}, float path {FLOAT_ISAS[level]} "
          f"(asked {args.path}), packed weights {fast.packed}, {torch.get_num_threads()} threads; best of {args.tries}")
    print(f"step_paged {step:.2f} ms ({B / step * 1000:.0f} tok/s at this step alone); the C call {c_ms:.2f} ms, "
          f"Python around it {step - c_ms:.2f} ms; building the step's PagedBatch {building:.2f} ms")
    print("| part | weights | ms | share of the C call | GB/s | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for (name, packed), ms in times.items():
        flops = 2 * B * nbytes[name] / (2 if w_bf16 else 4)
        print(f"| {name} | {'packed' if packed else 'as held'} | {ms:.2f} | {ms / c_ms:.0%} | "
              f"{nbytes[name] / ms / 1e6:.1f} | {flops / ms / 1e6:.0f} |")
    products_ms = sum(ms for (_, packed), ms in times.items() if packed == fast.packed)
    print(f"| products | {'packed' if fast.packed else 'as held'} | {products_ms:.2f} | {products_ms / c_ms:.0%} | "
          f"{sum(nbytes.values()) / products_ms / 1e6:.1f} | |")
    rest = c_ms - products_ms
    print(f"| the rest (attention, norms, rotation, barriers) | | {rest:.2f} | {rest / c_ms:.0%} | | |")


if __name__ == "__main__":
    main()
