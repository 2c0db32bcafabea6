"""The two HTML readers side by side on a whole manual: the direct walk of a page's main
landmark (what `parley ingest` uses where a page has one) against trafilatura's extraction (the
reader before it, still used for pages without one).

    python benchmarks/ingest_readers.py                 # every page of the Python docs
    python benchmarks/ingest_readers.py --limit 40      # the first 40 pages: a quick run
    python benchmarks/ingest_readers.py --show 5        # and the 5 least similar pages' differences

For each page both readers' sections are chunked as ingest chunks them (200 words, 40 of
overlap). Prints the CPU seconds of each reader (reading and chunking, the file's bytes in
memory), the chunks each gives, and how alike their text is: per page, the similarity of the
two word sequences (difflib's ratio over the words of all sections, headings included; 1.0 is
the same words in the same order), with its distribution and the pages furthest apart.
"""

from __future__ import annotations

import argparse
import difflib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval_manual import manual_pages  # noqa: E402

from parley.pipeline import readers  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11/html")


def read(data: bytes, blocks) -> tuple[list[readers.Chunk], float, list[readers.Section]]:
    """Chunks of the page through one reader's blocks, the process CPU seconds it took, and its sections."""
    start = time.process_time()
    found = blocks(data)
    sections = readers._sections(found) if found else [readers.Section(readers._html_fallback(data))]
    chunks = readers.chunk_sections(sections, 200, 40)
    return chunks, time.process_time() - start, sections


def words(sections: list[readers.Section]) -> list[str]:
    return [w for s in sections for w in s.text.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=Path, default=DOCS, help="the HTML docs folder (apt-get install python3.11-doc)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N pages (0: all)")
    ap.add_argument("--show", type=int, default=0, help="print the word differences of the N least similar pages")
    args = ap.parse_args()
    pages = manual_pages(args.docs)[: args.limit or None]
    rows, landmark = [], 0
    for page in pages:
        data = (args.docs / page).read_bytes()
        new, new_s, new_sections = read(data, readers._landmark_blocks)
        landmark += readers._landmark_blocks(data) is not None
        old, old_s, old_sections = read(data, readers._trafilatura_blocks)
        a, b = words(old_sections), words(new_sections)
        ratio = difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if a or b else 1.0
        rows.append((page, ratio, len(old), len(new), old_s, new_s, a, b))
    ratios = sorted(r[1] for r in rows)
    old_cpu, new_cpu = sum(r[4] for r in rows), sum(r[5] for r in rows)
    old_chunks, new_chunks = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"{len(pages)} pages from {args.docs}; {landmark} with one main landmark (walked directly)")
    print("| reader | CPU s | ms per page | chunks | words |")
    print("|---|---|---|---|---|")
    print(f"| trafilatura | {old_cpu:.1f} | {1000 * old_cpu / len(rows):.1f} | {old_chunks} | "
          f"{sum(len(r[6]) for r in rows)} |")
    print(f"| main landmark | {new_cpu:.1f} | {1000 * new_cpu / len(rows):.1f} | {new_chunks} | "
          f"{sum(len(r[7]) for r in rows)} |")
    print(f"CPU ratio {old_cpu / max(new_cpu, 1e-9):.1f}x; word-sequence similarity per page: "
          f"min {ratios[0]:.3f}, 1st pct {ratios[len(ratios) // 100]:.3f}, median {statistics.median(ratios):.3f}; "
          f">= 0.99: {sum(r >= 0.99 for r in ratios)}, >= 0.95: {sum(r >= 0.95 for r in ratios)}, "
          f"< 0.90: {sum(r < 0.9 for r in ratios)} of {len(ratios)}")
    worst = sorted(rows, key=lambda r: r[1])
    print("least similar: " + ", ".join(f"{r[0]} {r[1]:.3f} ({r[2]} -> {r[3]} chunks)" for r in worst[:10]))
    for page, ratio, _, _, _, _, a, b in worst[: args.show]:
        print(f"\n=== {page} ({ratio:.3f})")
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
            if op != "equal":
                print(f"  {op}: trafilatura {' '.join(a[i1:i2])[:300]!r} -> landmark {' '.join(b[j1:j2])[:300]!r}")


if __name__ == "__main__":
    main()
