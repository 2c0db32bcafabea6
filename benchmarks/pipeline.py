"""Pipeline overhead per turn, generation excluded: every stage but respond, timed by the trace.

    python benchmarks/pipeline.py [--turns 60] [--write]

The assistant runs with the full default pipeline on SmolLM2 (answers capped at 8 tokens:
generation is not what is measured), a knowledge base of a few documents, and memory facts,
so NLU, sentiment, memory recall, retrieval and both safety checks do their real work on
each message. The messages are the held-out intent set (benchmarks/data/intents_heldout.yml)
minus those with URLs, whose cost would be the network's. The first turns warm up and are
not counted. Overhead = the trace's total minus the respond stage's time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import re
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from record import append_section

ROOT = Path(__file__).resolve().parent
DOCS = {
    "lisbon.md": "# Lisbon\n\nLisbon is the capital of Portugal. Trams climb its hills; the 28 line is the best known. "
                 "The city hosts the Santo Antonio festival every June, with grilled sardines in the streets.",
    "plants.txt": "Water succulents every two weeks in summer and once a month in winter. Too much water rots "
                  "their roots. Ferns like shade and moist soil.",
    "python.md": "# Processes\n\nTo stop a running Python process, send it SIGTERM with `kill PID`, or SIGKILL with "
                 "`kill -9 PID` if it does not exit. `os.kill` does the same from Python.",
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_flush_denormal(True)

    from parley.chat import Session
    from parley.pipeline.assistant import Assistant, AssistantConfig
    from parley.pipeline.knowledge import ingest

    heldout = yaml.safe_load((ROOT / "data" / "intents_heldout.yml").read_text())["examples"]
    # the web stage's cost is the network's: leave out messages that name a site
    messages = [m for texts in heldout.values() for m in texts if not re.search(r"\w\.(com|org|net|io|\w\w)\b|http", m)]
    random.Random(0).shuffle(messages)  # intents mixed, the same order every run
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in DOCS.items():
            (Path(tmp) / name).write_text(text)
        session = Session(Assistant.build(AssistantConfig(db=f"{tmp}/parley.db", max_tokens=8, temperature=0)))
        ingest(session.store, session.assistant.embedder, session.user_id, [Path(tmp) / n for n in DOCS])
        for fact in ("my sister is called Ana", "I live in Porto", "I am allergic to peanuts"):
            session.memory.remember(session.user_id, fact)
        overheads, by_stage = [], {}
        for i in range(args.warmup + args.turns):
            session.new_conversation()  # each message alone: history length is not what is measured
            list(session.say(messages[i % len(messages)]))
            stages = session.last.trace_dict()["stages"]
            if i < args.warmup:
                continue
            overheads.append(sum(s["ms"] for s in stages if s["stage"] != "respond"))
            for s in stages:
                by_stage.setdefault(s["stage"], []).append(s["ms"])
        session.close()

    p50, p95 = percentile(overheads, 0.5), percentile(overheads, 0.95)
    lines = [f"turns {len(overheads)}: overhead p50 {p50:.1f} ms, p95 {p95:.1f} ms (aim: p50 < 50 ms)", "",
             "| stage | p50 ms | p95 ms |", "|---|---|---|"]
    lines += [f"| {name} | {percentile(v, 0.5):.2f} | {percentile(v, 0.95):.2f} |" for name, v in by_stage.items()]
    report = "\n".join(lines)
    print(report)
    if args.write:
        section = (f"\n## Pipeline overhead per turn ({dt.date.today()})\n\n"
                   f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
                   f"Command: `python benchmarks/pipeline.py --turns {args.turns} --write`. Every stage of the "
                   "default pipeline except respond (generation), over held-out intent messages, with 3 documents "
                   "and 3 memory facts in the store.\n\n" + report + "\n")
        append_section(section)


if __name__ == "__main__":
    sys.exit(main())
