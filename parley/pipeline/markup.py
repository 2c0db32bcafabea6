"""The prompt's passage fences never reach the user: a streaming filter for the model's answer.

    strip = FenceFilter()
    for piece in backend.stream(messages):
        if shown := strip.push(piece):     # the text with fence tags taken out
            yield TextDelta(shown)
    if rest := strip.flush():              # what was held back at the end
        yield TextDelta(rest)

respond puts retrieved text between `<<<passage n source="...">>>` and `<<<end passage n>>>`
(untrusted.fence). A small model often copies such tags into its answer, and an injected
order can ask it to. A tag may arrive split over any number of streamed pieces, so text
that could still become one (a trailing `<<`, `<<<pass`, `<<<passage 2 source="a.t`) is
held back until it is known: a whole tag is dropped; a tag cut off by a newline (or past
MAX_TAG characters) is dropped up to there; anything else (`<<<EOF` in a shell snippet) is
shown as written. Only tags naming a passage are touched, so code with `<<<` or `>>>` in it
stays intact.
"""

from __future__ import annotations

import re

MAX_TAG = 300  # characters of a tag: the fence writes sources and locations of at most 200
_TAG = re.compile(r"<{3,}\s*(?:end\s+)?passage\b[^\n]*?>{3,}", re.IGNORECASE)
_OPEN = re.compile(r"<{3,}\s*(?:end\s+)?passage\b[^\n]*", re.IGNORECASE)  # a tag begun, not yet closed
_START = re.compile(r"<{3,}")
_PREFIXES = ("end passage", "passage")


def _could_become_tag(rest: str) -> bool:
    """Whether `rest` (starting with <<<) is the beginning of a tag that is not complete yet."""
    head = _START.match(rest)
    word = re.sub(r"\s+", " ", rest[head.end():].lstrip()).lower()
    if len(rest) > MAX_TAG:
        return False
    if any(p.startswith(word) for p in _PREFIXES):
        return True  # "<<<", "<<<en", "<<<end pass": still a tag's first word
    opened = _OPEN.fullmatch(rest)
    return opened is not None  # "<<<passage 2 source=..." with no newline or >>> yet


class FenceFilter:
    """Takes the answer's pieces as they stream; gives back the text to show."""

    def __init__(self):
        self._held = ""

    def push(self, piece: str) -> str:
        text, out = self._held + piece, []
        while True:
            start = _START.search(text)
            if start is None:
                keep = len(text.rstrip("<"))  # up to two trailing "<" may yet open a tag
                out.append(text[:keep])
                self._held = text[keep:]
                return "".join(out)
            out.append(text[:start.start()])
            rest = text[start.start():]
            if tag := _TAG.match(rest):
                if tag.end() == len(rest):  # more ">" may follow: the tag takes them too
                    self._held = rest
                    return "".join(out)
                if tag.end() <= MAX_TAG:
                    text = rest[tag.end():]
                    continue
            elif _could_become_tag(rest):
                self._held = rest
                return "".join(out)
            if opened := _OPEN.match(rest):  # a tag cut off by a newline or grown past MAX_TAG
                text = rest[min(opened.end(), MAX_TAG):]
                continue
            out.append(start.group())  # "<<<EOF": not a fence tag
            text = rest[len(start.group()):]

    def flush(self) -> str:
        """The text still held back once the answer has ended: shown unless it began a tag."""
        held, self._held = self._held, ""
        begun = _START.match(held) and held.lstrip("<").strip()  # "<<<pass", "<<<passage 1 ..."
        return "" if begun and _could_become_tag(held) else held
