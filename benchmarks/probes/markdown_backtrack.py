"""The Markdown reader on lines made to backtrack (helper 63's hostile probe, seventeenth session): the time
`readers._markdown` takes on each crafted line at two lengths, so the growth shows (linear: 10x the length,
about 10x the time). On the patterns before commit 3bcaab4, 20 kB of "*a " took about 23 s and of backticks 153 s.

    python benchmarks/probes/markdown_backtrack.py            # this checkout
"""

import time

from parley.pipeline.readers import _markdown

LINES = {"stars": "*a ", "unders": "_a ", "bold": "**a ", "brackets": "[", "images": "![", "tags": "<a",
         "autolinks": "<http://"}


def main() -> None:
    for name, unit in [*LINES.items(), ("backticks", None)]:
        times = []
        for n in (200_000, 2_000_000):
            line = "x " + "`" * n + "a" if unit is None else unit * (n // len(unit))
            start = time.perf_counter()
            _markdown(line)
            times.append(time.perf_counter() - start)
        print(f"{name:10} 200 kB {times[0] * 1e3:8.1f} ms   2 MB {times[1] * 1e3:8.1f} ms   ratio {times[1] / times[0]:.1f}")


if __name__ == "__main__":
    main()
