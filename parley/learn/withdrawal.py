"""Withdrawal: a user who opts out of learning, or is deleted, is taken out of the general
rounds' folders as well as out of their own adapter (personal.forget calls `withdraw`).

    withdraw(user_id)                      # the round folders it changed
    write_jsonl(path, rows)                # one JSON object a line, written atomically

Every feedback row a round keeps names its user (user_id), so this module can find them; a
round's decision, report card and adapter stay as they were made, and withdrawn.json plus a
line on the report card say how many examples went, and when.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from parley.files import atomic_open
from parley.registry import parley_home


# the files of a round folder that hold users' feedback, and where a row names its user
HELD = {"data/dialogs-train.jsonl": lambda r: r.get("user_id"), "sft-heldout.jsonl": lambda r: r.get("user_id"),
        "pairs.jsonl": lambda r: (r.get("meta") or {}).get("user_id"),
        "pairs-heldout.jsonl": lambda r: (r.get("meta") or {}).get("user_id"), "against.jsonl": lambda r: r.get("user_id")}
WITHDRAWN = "withdrawn.json"


def withdraw(user_id: int, home: str | Path | None = None) -> list[str]:
    """Take every example of a user (opted out or deleted) out of the general rounds' folders, of
    every model; the rounds it was taken from. The round's decision, report card and adapter stay
    (they were made with it; a trained model cannot forget): withdrawn.json and the report card
    say how many examples went, and when, so the decision still traces to what it was made on."""
    touched = []
    for folder in sorted(((Path(home) if home else parley_home()) / "learn").glob("*/round-*")):
        counts = {}
        for name, owner in HELD.items():
            path = folder / name
            if not path.is_file():
                continue
            rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
            kept = [r for r in rows if owner(r) != user_id]
            if len(kept) < len(rows):
                write_jsonl(path, kept)
                counts[name] = len(rows) - len(kept)
        summary = folder / "feedback.json"
        if summary.is_file():  # what was left out, and why: the user's rows go too (the counts stay)
            found = json.loads(summary.read_text(encoding="utf-8"))
            kept = [r for r in found.get("skipped", []) if r.get("user_id") != user_id]
            if len(kept) < len(found.get("skipped", [])):
                counts["feedback.json"] = len(found["skipped"]) - len(kept)
                with atomic_open(summary) as f:
                    json.dump({**found, "skipped": kept}, f, indent=1)
        if counts:
            _note_withdrawal(folder, user_id, counts)
            touched.append(str(folder))
    return touched


def _note_withdrawal(folder: Path, user_id: int, counts: dict[str, int]) -> None:
    at = time.strftime("%Y-%m-%dT%H:%M:%S")
    examples = sum(n for name, n in counts.items() if name != "feedback.json")
    notes = json.loads((folder / WITHDRAWN).read_text()) if (folder / WITHDRAWN).is_file() else []
    notes.append({"at": at, "user_id": user_id, "examples": examples, "rows": counts})
    with atomic_open(folder / WITHDRAWN) as f:
        json.dump(notes, f, indent=1)
    report = folder / "report.md"
    if report.is_file():
        with atomic_open(report) as f:
            f.write(report.read_text(encoding="utf-8") + f"\n**withdrawn** ({at}): {examples} example(s) of user "
                    f"{user_id} (opted out or deleted) were taken out of this round's data; the figures above were "
                    f"measured before, with them ({WITHDRAWN}).\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_open(path) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
