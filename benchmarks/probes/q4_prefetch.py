"""Probe: the VNNI path's software prefetch (kernels.c's qgroup_rows) for few rows of x against many.
SmolLM2-135M-Instruct's own Q4_1 GGUF kept (16-row layout), decode steps through FastDecoder.step_paged
at `--batches` rows of 128 tokens of context, on three builds of kernels.c compiled side by side
into one process: as it is (prefetch 8 records ahead only with more than 4 rows of x), prefetching
at every batch, and never prefetching; plus the same weights dequantized to bf16 as a yardstick.
The builds alternate, 20 steps a round, each going first in turn; medians of `--rounds`
(q4_step.rotated_medians).

    .venv/bin/python benchmarks/probes/q4_prefetch.py --batches 1,8 --rounds 20
"""
import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from q4_step import Case, rotated_medians  # noqa: E402
from record import cpu_name  # noqa: E402

import parley.engine.fast as fast  # noqa: E402
from parley.engine.fast import FastDecoder  # noqa: E402
from parley.model import quant, weights  # noqa: E402
from parley.model.weights import load_gguf  # noqa: E402
from parley.registry import smollm2_gguf  # noqa: E402

RULE = "if (NB > 4)\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    source = fast.SOURCE.read_text()
    assert source.count(RULE) == 1, "kernels.c's prefetch rule moved: update this probe"
    folder = Path(tempfile.mkdtemp())
    builds = {"as is (NB > 4)": source, "always": source.replace(RULE, "if (NB > 0)\n"),
              "never": source.replace(RULE, "if (NB > 8)\n")}
    path = smollm2_gguf()
    model = weights.keep_gguf_blocks(load_gguf(path)[0], path).to(torch.bfloat16)
    dequantized = quant.dequantize_model(copy.deepcopy(model), torch.bfloat16)
    print(f"{cpu_name(flags=True)}; {torch.get_num_threads()} threads")
    for B in (int(b) for b in args.batches.split(",")):
        cases = {}
        for name, text in builds.items():
            (folder / f"{len(cases)}.c").write_text(text)
            fast.SOURCE = folder / f"{len(cases)}.c"
            fast.kernels.cache_clear()
            cases[name] = Case(FastDecoder.create(model), B, 128, 16)
        cases["bf16, dequantized"] = Case(FastDecoder.create(dequantized), B, 128, 16)
        medians = rotated_medians(cases, B, args.rounds)
        for name, m in medians.items():
            nbytes = quant.weight_bytes(dequantized if "bf16" in name else model)
            print(f"batch {B}  {name:18} {m * 1e3:7.3f} ms a step  {B / m:7.1f} tok/s  {nbytes / m / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
