"""Text on top of the token engine: stream decoded pieces and stop at stop strings.

    stream = TextStream(engine, tokenizer, tokenizer.encode("Once upon"), SamplingParams(max_tokens=32),
                        stop=["\\n\\n"])
    for piece in stream:
        print(piece, end="", flush=True)
    print(stream.finish_reason, stream.tokens)

The engine works on ids only; this is the one place that turns its tokens into text.
Text that might be the start of a stop string is held back until it is known not to be, so a
stop string may be at most MAX_STOP_CHARS long: one of 100,000 characters would hold back
the whole answer until its end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from parley.engine.engine import Engine, Event
from parley.engine.sampling import SamplingParams
from parley.model.tokenizer import Tokenizer

MAX_STOP_CHARS = 256  # the longest stop string, and so the most text held back from a stream


def check_stops(stop: Sequence[str]) -> None:
    """ValueError unless every stop string is non-empty and at most MAX_STOP_CHARS long."""
    if any(not s for s in stop):
        raise ValueError("stop strings must not be empty")
    if (longest := max(map(len, stop), default=0)) > MAX_STOP_CHARS:
        raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters (one has {longest}): "
                         "text that could be the start of one is held back from the stream")


class TextAssembler:
    """Tokens to text for one sequence: decodes byte-level tokens across boundaries and stops at
    the first stop string, holding back text that could be the start of one."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        check_stops(stop)  # the hold-back below is at most MAX_STOP_CHARS - 1
        self.decoder, self.stop = tokenizer.stream_decoder(), list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text, self.emitted, self.tokens = "", 0, 0
        self.finish_reason: str | None = None

    def push(self, event: Event) -> str:
        """The new text this event makes safe to show ('' if none). Once a stop string is
        seen (finish_reason "stop") or the sequence ends, everything is shown and later
        events are ignored."""
        if self.finish_reason:
            return ""
        seen = len(self.text)  # searched already: a stop string not found there ends in the new text
        if event.token is not None:
            self.tokens += 1
            self.text += self.decoder.push(event.token)
        if event.finish_reason:
            self.finish_reason = event.finish_reason
            self.text += self.decoder.flush()
        cut = min((i for i in (self.text.find(s, max(0, seen - len(s) + 1)) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish_reason = self.text[:cut], "stop"
        safe = len(self.text) if self.finish_reason else max(self.emitted, len(self.text) - self.hold)
        piece, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return piece


class TextStream:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, prompt: Sequence[int],
                 params: SamplingParams, stop: Sequence[str] = ()):
        check_stops(stop)  # now, rather than when iteration starts
        self.engine, self.tokenizer, self.prompt = engine, tokenizer, list(prompt)
        self.params, self.stop = params, list(stop)
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        text = TextAssembler(self.tokenizer, self.stop)
        events = self.engine.stream([self.prompt], self.params)
        try:
            for event in events:
                if event.token is not None:
                    self.tokens.append(event.token)
                piece = text.push(event)
                self.text, self.finish_reason = text.text, text.finish_reason
                if piece:
                    yield piece
                if text.finish_reason:
                    break
        finally:
            events.close()  # a consumer that stops early frees the engine's batch
