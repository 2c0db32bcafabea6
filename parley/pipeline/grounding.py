"""Answers that hold to their sources: which passages fit the prompt, and whether the answer's
citations are backed by the passages they cite.

    kept, dropped = fit_passages(passages, lambda ps: count(prompt_with(ps)) <= limit)
    report = check_citations("The rent is due on the 1st [1].", passages)
    report["grounding"]        # "supported" | "unsupported" | "uncited" | "no sources"

Passages reach the prompt best first (the knowledge stage orders them by its search; web pages
follow in the order they were fetched). When they do not all fit the model's context, the
weakest (lowest score; among equals the last) are left out first; the others keep the numbers
the user is shown.

A citation [n] is *supported* when the sentence citing it shares enough content words with
passage n: at least half of the sentence's content words (words of three or more letters or
digits that are not common English words, lowercased, a plural "s" ignored) occur in the
passage, or all of them where the sentence has at most two. A cheap, explainable rule that
catches an answer citing the wrong passage or one it did not get; it does not judge meaning
(tests/test_grounding.py). A citation of a number the prompt did not hold is *missing*. The
respond stage records the verdicts in the trace; an answer that cites nothing although it was
given sources is flagged "uncited".

Small models rarely write [n] themselves (SmolLM2-135M wrote none in 45 answers), so the respond
stage passes the answer through `Citer` as it streams: each finished sentence that cites nothing
gets " [n]" before its final full stop, n the passage that supports it by the same rule (the one sharing most of its
content words); a sentence that no passage supports gets nothing and is listed in the trace as
unsupported. The model's own citations are left as written and checked like any other.

    citer = Citer(passages)
    shown = "".join(citer.push(piece) for piece in pieces) + citer.flush()
    citer.added, citer.unsupported      # [{"n": 1, "sentence": ...}], [sentence, ...]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from parley.pipeline.frames import Passage

MIN_OVERLAP = 0.5  # share of a citing sentence's content words the cited passage must hold
NOTHING_FOUND = ("I found nothing about that in your documents, so I will not guess. "
                 "Try other words, or add a document that covers it.")

STOPWORDS = frozenset("""about above after again all also and any are because been before being below
between both but can cannot could did does doing down during each few for from further had has have
having her here hers herself him himself his how into its itself just more most nor not now off once
only other our ours out over own same she should some such than that the their theirs them then there
these they this those through too under until upon very was were what when where which while who whom
why will with would you your yours yourself use used uses using one two default value""".split())
CITATION = re.compile(r"\[(\d{1,3})\]")
WORD = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


def content_words(text: str) -> set[str]:
    """Lowercased words of 3+ characters, minus common English words; "deque"/"deques" alike.
    Dotted names (asyncio.gather) count whole and by their parts."""
    words = set()
    for token in WORD.findall(text.lower()):
        for w in {token, *token.split(".")}:
            if (len(w) >= 3 or w.isdigit()) and w not in STOPWORDS:
                words.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return words


def supports(words: set[str], passage_words: set[str], min_overlap: float = MIN_OVERLAP) -> tuple[bool, float]:
    """(whether a sentence with content words `words` is supported by a passage with
    `passage_words`, the share of its words the passage holds): the rule in the docstring above."""
    shared = words & passage_words
    overlap = len(shared) / len(words) if words else 0.0
    return overlap >= min_overlap or (0 < len(words) <= 2 and len(shared) == len(words)), overlap


def fit_passages(passages: Sequence[Passage], fits: Callable[[list[Passage]], bool]) -> tuple[list[Passage], list[Passage]]:
    """(kept, dropped): the passages in their order, the weakest left out until `fits(kept)`."""
    kept = list(passages)
    dropped: list[Passage] = []
    while kept and not fits(kept):
        weakest = min(range(len(kept)), key=lambda i: (kept[i].score, -i))
        dropped.append(kept.pop(weakest))
    return kept, dropped


def check_citations(answer: str, passages: Sequence[Passage], min_overlap: float = MIN_OVERLAP) -> dict:
    """Per cited sentence: the numbers it cites, each one's overlap and verdict; and the answer's
    verdict: "no sources" (none were given), "uncited" (sources given, none cited),
    "unsupported" (some citation is missing or unsupported) or "supported"."""
    from parley.pipeline.guard import split_sentences

    by_n = {p.n: p for p in passages}
    citations, unsupported, missing = [], [], []
    for sentence in split_sentences(answer):
        cited = [int(n) for n in CITATION.findall(sentence)]
        if not cited:
            continue
        words = content_words(CITATION.sub(" ", sentence))
        for n in dict.fromkeys(cited):
            entry = {"n": n, "sentence": sentence.strip()[:200]}
            if n not in by_n:
                entry.update(verdict="missing")
                missing.append(n)
            else:
                ok, overlap = supports(words, content_words(by_n[n].text), min_overlap)
                entry.update(verdict="supported" if ok else "unsupported", overlap=round(overlap, 3),
                             words=len(words))
                if not ok:
                    unsupported.append(n)
            citations.append(entry)
    if citations:
        verdict = "unsupported" if unsupported or missing else "supported"
    else:
        verdict = "uncited" if passages else "no sources"
    return {"grounding": verdict, "citations": citations, "unsupported": unsupported, "missing": missing,
            "min_overlap": min_overlap}


SENTENCE_END = re.compile(r"[.!?]+(?=\s)|\n")  # a sentence ends at . ! ? before a space, or at a line break


class Citer:
    """Passes an answer through piece by piece, adding " [n]" before the final punctuation of
    each sentence that cites nothing, where passage n supports it (`supports`; the passage
    sharing the most content words, the first among equals). A piece's trailing . ! ? is held
    back until the next piece shows whether the sentence ended there; nothing else waits."""

    def __init__(self, passages: Sequence[Passage], min_overlap: float = MIN_OVERLAP):
        self.passages = [(p.n, content_words(p.text)) for p in passages]
        self.min_overlap = min_overlap
        self.sentence = ""  # the unfinished sentence so far (already passed on)
        self.held = ""  # trailing punctuation not yet passed on
        self.added: list[dict] = []  # {"n", "sentence"} for each citation added
        self.unsupported: list[str] = []  # sentences with content words that no passage supports

    def push(self, piece: str) -> str:
        piece, self.held, out = self.held + piece, "", []
        while (m := SENTENCE_END.search(piece)) is not None:
            sentence = self.sentence + piece[: m.start()]
            out += [piece[: m.start()], self.cite(sentence), m.group()]
            self.sentence, piece = "", piece[m.end() :]
        body = piece.rstrip(".!?")
        self.held, self.sentence = piece[len(body) :], self.sentence + body
        return "".join(out) + body

    def flush(self) -> str:
        """The last sentence's citation and final punctuation (the answer has ended)."""
        sentence, held, self.sentence, self.held = self.sentence, self.held, "", ""
        return self.cite(sentence) + held

    def cite(self, sentence: str) -> str:
        """" [n]" for a finished sentence that cites nothing and that passage n supports, else ""."""
        words = content_words(sentence)
        if not words or not self.passages or CITATION.search(sentence):
            return ""
        best = max(self.passages, key=lambda p: len(words & p[1]))  # max keeps the first among equals
        if not supports(words, best[1], self.min_overlap)[0]:
            self.unsupported.append(sentence.strip()[:200])
            return ""
        self.added.append({"n": best[0], "sentence": sentence.strip()[:200]})
        return f" [{best[0]}]"
