"""Text on top of the token engine: stream decoded pieces and stop at stop strings.

    stream = TextStream(engine, tokenizer, tokenizer.encode("Once upon"), SamplingParams(max_tokens=32),
                        stop=["\\n\\n"])
    for piece in stream:
        print(piece, end="", flush=True)
    print(stream.finish_reason, stream.tokens)

The engine works on ids only; this is the one place that turns its tokens into text.
Text that might be the start of a stop string is held back until it is known not to be.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.model.tokenizer import Tokenizer


class TextStream:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, prompt: Sequence[int],
                 params: SamplingParams, stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.engine, self.tokenizer, self.prompt = engine, tokenizer, list(prompt)
        self.params, self.stop = params, list(stop)
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        decoder = self.tokenizer.stream_decoder()
        hold = max((len(s) for s in self.stop), default=1) - 1
        emitted = 0  # characters of self.text already yielded
        events = self.engine.stream([self.prompt], self.params)
        try:
            for event in events:
                if event.token is not None:
                    self.tokens.append(event.token)
                    self.text += decoder.push(event.token)
                if event.finish_reason:
                    self.finish_reason = event.finish_reason
                    self.text += decoder.flush()
                cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.text, self.finish_reason = self.text[:cut], "stop"
                    break
                safe = len(self.text) if self.finish_reason else max(emitted, len(self.text) - hold)
                if safe > emitted:
                    yield self.text[emitted:safe]
                    emitted = safe
        finally:
            events.close()  # a consumer that stops early frees the engine's batch
        if len(self.text) > emitted:
            yield self.text[emitted:]
