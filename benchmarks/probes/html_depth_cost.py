"""What the HTML reader's depth check (readers.shallow_html, sixteenth session) costs on real pages: every page of the
Python documentation (Debian python3.11-doc, `make data-sources`) read by `_html` at a commit before it and now, twice,
alternating, in one process (benchmarks/RESULTS.md, "Hardening, sixteenth session").

    python benchmarks/probes/html_depth_cost.py 347c6d5
"""

import glob
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(before: str) -> None:
    old = subprocess.run(["git", "show", f"{before}:parley/pipeline/readers.py"], capture_output=True, text=True,
                         check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "readers_before.py"
        path.write_text(old)
        spec = importlib.util.spec_from_file_location("readers_before", path)
        previous = importlib.util.module_from_spec(spec)
        sys.modules["readers_before"] = previous  # its dataclasses look their module up
        spec.loader.exec_module(previous)
    from parley.pipeline import readers

    files = sorted(glob.glob("/usr/share/doc/python3.11/html/**/*.html", recursive=True))
    if not files:
        raise SystemExit("no pages under /usr/share/doc/python3.11/html: run `make data-sources` first")
    pages = [Path(f).read_bytes() for f in files]
    print(f"{len(pages)} pages, {sum(map(len, pages)) / 1e6:.0f} MB")
    for rnd in range(2):
        for name, module in ((f"before ({before})", previous), ("now", readers)):
            t = time.perf_counter()
            for page in pages:
                module._html(page)
            print(f"pass {rnd + 1}, {name}: {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "347c6d5")
