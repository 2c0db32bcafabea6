"""What every benchmark script writes down with its figures: the commit it measured, the CPU,
and the section appended to benchmarks/RESULTS.md (newest last).

    from record import append_section, commit, cpu_name   # the scripts run from this folder

`no_amx()`, called before torch is imported, honours a script's `--no-amx`: it runs the whole
process as on a CPU without AMX tiles (Parley's engines with PARLEY_KERNELS=avx512, PyTorch's
oneDNN with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16), and cpu_name says so.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = ("# Benchmark results\n\nNewest last. Every table comes from a script in this folder (or from the `parley` "
          "command it names), run side by side with its peer; probes/ holds the probes behind the accounts.\n")


def commit() -> str:
    """The short hash of the checked-out commit, or "?" outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS.parent)
    except OSError:
        return "?"
    return done.stdout.strip() or "?"


NO_AMX = {"PARLEY_KERNELS": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


def no_amx() -> bool:
    """If the command line has --no-amx, set NO_AMX in the environment (this process's and its
    children's: a server subprocess too) and say True. Must run before torch is imported: oneDNN
    reads its ISA cap once."""
    if "--no-amx" not in sys.argv:
        return False
    if "torch" in sys.modules:
        raise RuntimeError("no_amx() must run before torch is imported")
    os.environ.update(NO_AMX)
    return True


def cpu_name(flags: bool = False) -> str:
    """The CPU's model name from /proc/cpuinfo (the machine type elsewhere); with `flags`, also
    which of AVX-512, AVX-512 BF16 and AMX-BF16 it has, and whether AMX is switched off (no_amx)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    if not flags:
        return name
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in info]
    off = all(os.environ.get(k) == v for k, v in NO_AMX.items())
    return f"{name} ({', '.join(have) or 'no AVX2'})" + \
        (", AMX unused (--no-amx: " + ", ".join(f"{k}={v}" for k, v in NO_AMX.items()) + ")" if off else "")


def append_section(text: str) -> None:
    """Append a section (markdown, starting with its own blank line and heading) to RESULTS.md."""
    if not RESULTS.exists():
        RESULTS.write_text(HEADER, encoding="utf-8")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    print(f"appended to {RESULTS}")
