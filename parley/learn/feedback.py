"""What users' feedback teaches: the store's thumbs, edits, regenerations and barge-ins turned
into training examples, with everything that must not be learned from left out (and counted).

    from parley.learn.feedback import collect
    found = collect(store, since="2026-12-05T10:00:00+00:00")          # every user's, since then
    found = collect(store, since="", user="ann")                         # one user's, all of it
    found.sft      # [{"messages": [...history, {"role": "assistant", "content": TARGET}], ...}]
    found.pairs    # preference pairs: parley.train.preferences.Pair (source "feedback", labeler "human")
    found.against  # answers counted against with no better answer to pair them with
    found.skipped  # [{"feedback_id", "reason"}]: untrusted user, caught by the rails, no question ...
    found.until    # the newest feedback time read: the next round's `since`

What each kind of feedback becomes:
- an edit (any rating): an SFT target (the edited text after the same history) and a pair
  (chosen: the edit, rejected: the answer);
- thumbs up without an edit: an SFT target (the answer as it was);
- a regenerated answer: a pair with the answer the same question got next, when that one was
  not itself rejected; otherwise it is counted against;
- thumbs down without an edit, and a barge-in (feedback kind "barge-in", where the voice path
  writes it): the answer is counted against; a later regeneration of it pairs it.

Never learned from: feedback of a user marked untrusted (`parley users untrust NAME`) or opted
out (`parley users optout NAME`: withdrawal.withdraw also takes what earlier rounds kept of theirs
out of the round folders), and answers whose trace shows the safety rails caught the question
or the answer (a refusal, a rewrite, a flagged injection), whoever rated them. Every example
carries its `user_id`, so that it can be withdrawn later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from parley.store import Store
from parley.train.preferences import Pair

SAFETY_STAGES = ("safety_in", "safety_out")
NEGATIVE_KINDS = ("regenerated", "barge-in")


@dataclass
class Examples:
    sft: list[dict] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    against: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    until: str = ""

    def counts(self) -> dict[str, int]:
        reasons: dict[str, int] = {}
        for s in self.skipped:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        return {"sft": len(self.sft), "pairs": len(self.pairs), "against": len(self.against),
                "skipped": len(self.skipped), **{f"skipped_{k}": v for k, v in sorted(reasons.items())}}


def caught_by_rails(trace: dict | None) -> str | None:
    """Why the rails caught this answer's turn (e.g. "safety_in: refuse"), or None if they let it be."""
    for entry in (trace or {}).get("stages", []):
        if entry.get("stage") in SAFETY_STAGES and entry.get("decision") not in ("allow", None):
            return f"{entry['stage']}: {entry['decision']}"
        if entry.get("stage") in SAFETY_STAGES and (entry.get("evidence") or {}).get("injection"):
            return f"{entry['stage']}: injection"
    return None


def _prompt(store: Store, answer_id: int) -> list[dict]:
    """The conversation before the answer, as chat messages ending with the user's question."""
    history = [{"role": m.role, "content": m.content} for m in store.history_before(answer_id)
               if m.role in ("system", "user", "assistant")]
    return history if history and history[-1]["role"] == "user" else []


def _next_answer(store: Store, row: dict, question: str, rejected: set[int]) -> str | None:
    """The answer the same question got next in the conversation, unless that one was rejected too."""
    for answer in store.answers_after(row["turn_id"]):
        before = _prompt(store, answer.id)
        if before and before[-1]["content"] == question:
            return None if answer.id in rejected else answer.content
    return None


def collect(store: Store, since: str = "", user: str | None = None) -> Examples:
    """The training examples in the feedback written after `since` (ISO time, '' = all), of every
    user or of the user named `user`. Pure reading: nothing in the store changes."""
    user_id = None
    if user is not None:
        found = store.get_user_by_name(user)
        if found is None:
            raise ValueError(f"no user named {user!r}: `parley users list` shows who there is")
        user_id = found.id
    rows = store.feedback_rows(since, user_id)
    out = Examples(until=max((r["created_at"] for r in rows), default=since))
    negative = {r["turn_id"] for r in rows if r["rating"] < 0 and not r["edited_text"]}
    opted_in: dict[int, bool] = {}
    for row in rows:
        base = {"feedback_id": row["id"], "turn_id": row["turn_id"], "user": row["user_name"],
                "user_id": row["user_id"], "model": row["model"], "kind": row["kind"]}
        trace = json.loads(row["trace"]) if row["trace"] else None
        if row["user_id"] not in opted_in:
            opted_in[row["user_id"]] = store.personalized(row["user_id"])
        reason = ("untrusted user" if not row["trusted"] else
                  "opted out of learning" if not opted_in[row["user_id"]] else
                  f"rails ({caught})" if (caught := caught_by_rails(trace)) else None)
        prompt = [] if reason else _prompt(store, row["turn_id"])
        if not reason and not prompt:
            reason = "no question before the answer"
        if reason:
            out.skipped.append({**base, "reason": reason})
            continue
        answer, edit = row["answer"], (row["edited_text"] or "").strip()
        meta = {k: v for k, v in base.items() if v is not None}
        if edit and edit != answer.strip():
            out.sft.append({"messages": [*prompt, {"role": "assistant", "content": edit}], "source": "edit", **meta})
            _pair(out, prompt, edit, answer, meta)
        elif row["rating"] > 0 and row["kind"] not in NEGATIVE_KINDS:
            out.sft.append({"messages": [*prompt, {"role": "assistant", "content": answer}], "source": "thumbs_up",
                            **meta})
        else:
            better = _next_answer(store, row, prompt[-1]["content"], negative) \
                if row["kind"] == "regenerated" or row["rating"] < 0 else None
            if better is not None and better.strip() != answer.strip():
                _pair(out, prompt, better, answer, meta)
            else:
                out.against.append({"prompt": prompt, "answer": answer, **meta})
    return out


def _pair(out: Examples, prompt: list[dict], chosen: str, rejected: str, meta: dict[str, Any]) -> None:
    """Add one preference pair in the shared format (parley/train/preferences.py), or say why not."""
    try:
        out.pairs.append(Pair(prompt=prompt, chosen=chosen, rejected=rejected, principle=None, source="feedback",
                              labeler="human", meta=meta))
    except ValueError as e:
        out.skipped.append({**meta, "reason": f"not a valid pair: {e}"})
