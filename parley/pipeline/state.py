"""Dialogue state: the history window, slots carried across turns, and long-term memory.

    memory = Memory(store, embedder)
    memory.remember(user_id, "my sister is called Ana")
    memory.recall(user_id, "what is my sister's name?")   # -> [(fact, similarity)]
    memory.forget(user_id, "my sister")                   # -> facts deleted

Memory facts are rows in the store with their embedding beside them, so they survive
restarts and belong to one user. Recall is an embedding search with a similarity floor:
a fact is only put in front of the model when it bears on what was said.

`StateStage` runs each turn after NLU. It merges this turn's slots with those carried from
earlier turns of the conversation (kept in the store, per user and conversation, and saved
with the turn's answer: see `Store.add_exchange`), answers the memory intents itself (remember / recall / forget: these are
commands with exact answers, not something to leave to a 135M-parameter model's wording),
and otherwise adds a `MemoryRecall` frame with the facts relevant to the message.

`fit_history` keeps a conversation inside a token budget: the oldest exchanges go first,
and what they were about survives as a one-line summary instead of vanishing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from parley.pipeline.embed import from_blob, to_blob
from parley.pipeline.frames import Frame, Intent, MemoryRecall, MemoryUpdate, Notice, Slots, UserText
from parley.pipeline.runner import Stage, Turn
from parley.store import Store

MAX_FACT_CHARS = 500

# "remember that X", "please remember: X", "note that X", "don't forget that X"
_REMEMBER = re.compile(
    r"^\s*(?:please\s+|hey\s*,?\s*)?(?:can you\s+|could you\s+)?"
    r"(?:remember|memori[sz]e|note|keep in mind|don'?t forget|do not forget)\s*(?:that|this|:|,)?\s*",
    re.IGNORECASE,
)
_FORGET = re.compile(
    r"^\s*(?:please\s+|can you\s+|could you\s+)?(?:forget|delete|erase|remove)\s+"
    r"(?:(?:that|about|the fact that|the memory)\s+)*",
    re.IGNORECASE,
)
_FORGET_ALL = re.compile(r"^(?:everything|all|all (?:of )?(?:my )?memor(?:y|ies)|what you know about me)\W*$", re.I)


class MemoryInputError(ValueError):
    """Bad input to memory: empty or oversized facts."""


@dataclass(frozen=True)
class Fact:
    id: int
    text: str
    similarity: float = 0.0


class Memory:
    """Long-term facts per user, searchable by meaning."""

    def __init__(self, store: Store, embed: Callable[[list[str]], np.ndarray], min_similarity: float = 0.35):
        self.store, self.embed, self.min_similarity = store, embed, min_similarity

    def remember(self, user_id: int, text: str) -> Fact:
        fact = " ".join(text.split()).rstrip(".")
        if not fact:
            raise MemoryInputError("nothing to remember: say what, e.g. /remember my sister is called Ana")
        if len(fact) > MAX_FACT_CHARS:
            raise MemoryInputError(f"a memory fact is at most {MAX_FACT_CHARS} characters; this one has {len(fact)}")
        for old in self.store.list_memory(user_id):
            if old.text.lower() == fact.lower():
                return Fact(old.id, old.text, 1.0)  # already known: do not store it twice
        row = self.store.add_memory(user_id, fact, to_blob(self.embed([fact])[0]))
        return Fact(row.id, row.text, 1.0)

    def all(self, user_id: int) -> list[Fact]:
        return [Fact(f.id, f.text) for f in self.store.list_memory(user_id)]

    def recall(self, user_id: int, query: str, k: int = 3, min_similarity: float | None = None) -> list[Fact]:
        rows = self.store.list_memory(user_id)
        if not rows or not query.strip():
            return []
        floor = self.min_similarity if min_similarity is None else min_similarity
        matrix = np.stack([from_blob(r.embedding) if r.embedding else self.embed([r.text])[0] for r in rows])
        scores = matrix @ self.embed([query])[0]
        best = np.argsort(-scores)[:k]
        return [Fact(rows[i].id, rows[i].text, float(scores[i])) for i in best if scores[i] >= floor]

    def forget(self, user_id: int, what: str) -> list[Fact]:
        """Delete the facts `what` refers to: all of them for "everything", else those that
        contain it or mean nearly the same (similarity >= 0.6, else the single best >= 0.45)."""
        what = what.strip().rstrip(".?!")
        if not what:
            raise MemoryInputError("say what to forget, e.g. /forget my sister, or /forget everything")
        if _FORGET_ALL.match(what):
            doomed = self.all(user_id)
        else:
            words = re.compile(rf"\b{re.escape(what)}\b", re.IGNORECASE)
            doomed = [f for f in self.all(user_id) if words.search(f.text)]
            if not doomed:
                close = self.recall(user_id, what, k=10, min_similarity=0.45)
                doomed = [f for f in close if f.similarity >= 0.6] or close[:1]
        for fact in doomed:
            self.store.delete_memory(user_id, fact.id)
        return doomed


def explicit_command(text: str) -> str | None:
    """The memory intent a message states outright ("forget that ...", "remember that ..."),
    or None. The classifier confuses "forget that I live in Porto" with "I live in Porto"."""
    if _FORGET.match(text) and fact_to_forget(text).lower().strip(" .!?") not in ("", "it", "this", "that", "them"):
        return "forget_memory"
    if _REMEMBER.match(text) and re.match(r"\s*\S+\s+\S+", fact_to_remember(text)) and \
            not re.match(r"^\s*(?:do you|can you tell|what)", text, re.I):
        return "remember"
    return None


def fact_to_remember(text: str) -> str:
    """The fact in "remember that my sister is called Ana" (the text itself if no cue)."""
    return _REMEMBER.sub("", text, count=1).strip()


def fact_to_forget(text: str) -> str:
    return _FORGET.sub("", text, count=1).strip()


def second_person(fact: str) -> str:
    """'my sister is Ana' -> 'your sister is Ana', for confirmations addressed to the user."""
    swaps = {"i": "you", "me": "you", "my": "your", "mine": "yours", "i'm": "you're", "am": "are",
             "myself": "yourself", "i've": "you've", "i'll": "you'll", "i'd": "you'd"}
    return re.sub(r"\b(i'm|i've|i'll|i'd|myself|mine|my|me|am|i)\b",
                  lambda m: swaps[m.group(0).lower()], fact, flags=re.IGNORECASE)


def fit_history(messages: list[dict[str, str]], count_tokens: Callable[[list[dict[str, str]]], int],
                budget: int) -> tuple[list[dict[str, str]], str | None]:
    """The newest messages that fit in `budget` tokens, and a one-line summary of the ones
    dropped (the user's questions, shortened), or None when nothing was dropped."""
    kept = list(messages)
    dropped: list[dict[str, str]] = []
    while kept and count_tokens(kept) > budget:
        # drop a whole exchange (user + assistant) so the kept history never starts mid-reply
        cut = 2 if len(kept) >= 2 and kept[0]["role"] == "user" and kept[1]["role"] == "assistant" else 1
        dropped += kept[:cut]
        kept = kept[cut:]
    if not dropped:
        return kept, None
    asked = [_shorten(m["content"]) for m in dropped if m["role"] == "user"]
    summary = "Earlier in this conversation the user said: " + "; ".join(f'"{a}"' for a in asked[-6:]) + "."
    return kept, summary if asked else None


def _shorten(text: str, words: int = 12) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


class StateStage(Stage):
    """Slots carried across turns, memory commands, and recall of relevant facts. It keeps
    nothing itself: memory and carried slots are read from the turn's store."""

    name = "state"

    def __init__(self, embed: Callable[[list[str]], np.ndarray], recall_k: int = 3):
        self.embed, self.recall_k = embed, recall_k

    def process(self, frame: Frame, turn: Turn) -> Iterator[Frame]:
        if not isinstance(frame, UserText):
            yield frame
            return
        if turn.store is None:
            raise ValueError("the state stage reads memory and slots from the store: give the Turn a store")
        memory = Memory(turn.store, self.embed)
        carried = turn.store.get_slots(turn.user_id, turn.conversation_id) if turn.conversation_id else {}
        slots = dict(carried)
        this_turn = turn.get(Slots)
        if this_turn is not None:
            slots.update(this_turn.values)
        turn.slots = slots  # saved with the answer, for the conversation's next turn
        turn.note(self.name, "slots", slots=slots)  # in the trace whatever the stage decides next
        if slots:
            yield Slots(slots)
        intent = turn.get(Intent)
        name = intent.name if intent else ""
        cue = explicit_command(frame.text)
        if cue and cue != name:  # "forget that X" said in so many words beats the classifier's guess
            turn.note(self.name, f"rule: {cue}", classifier=name)
            name = cue
        if name in ("remember", "forget_memory") and not turn.may_write():
            return  # a tentative turn that was dropped (Turn.tentative): it changes no memory
        if name == "remember":
            fact = memory.remember(turn.user_id, fact_to_remember(frame.text))
            turn.note(self.name, "remembered", fact=fact.text, fact_id=fact.id)
            yield MemoryUpdate("remembered", (fact.text,))
            yield Notice(f"I'll remember that {second_person(fact.text)}.")
            return  # a command, answered here: nothing to generate
        if name == "forget_memory":
            gone = memory.forget(turn.user_id, fact_to_forget(frame.text))
            turn.note(self.name, "forgot" if gone else "nothing to forget", facts=[f.text for f in gone])
            yield MemoryUpdate("forgot", tuple(f.text for f in gone))
            yield Notice("Forgotten: " + "; ".join(second_person(f.text) for f in gone) + "." if gone
                         else "I had nothing like that in memory.")
            return
        if name == "recall_memory":
            facts = memory.recall(turn.user_id, frame.text, k=self.recall_k) or memory.all(turn.user_id)
            turn.note(self.name, f"recalled {len(facts)}", facts=[f.text for f in facts])
            yield MemoryRecall(tuple(f.text for f in facts))
            lines = "\n".join(f"- {second_person(f.text)}" for f in facts)
            yield Notice("Here is what I remember:\n" + lines if facts else "I don't have anything in memory about you yet.")
            return
        facts = memory.recall(turn.user_id, frame.text, k=self.recall_k)
        turn.note(self.name, f"recalled {len(facts)}" if facts else "no memory used",
                  facts=[(f.text, round(f.similarity, 3)) for f in facts])
        if facts:
            yield MemoryRecall(tuple(f.text for f in facts))
        yield frame
