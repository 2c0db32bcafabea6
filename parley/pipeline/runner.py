"""Run one turn through a list of stages, streaming, and record what each stage did.

    pipeline = Pipeline([InputSafety(...), NLU(...), Respond(...), OutputSafety(...)])
    turn = Turn(user_id=1)
    for frame in pipeline.run(turn, UserText("hello")):
        if isinstance(frame, TextDelta):
            print(frame.text, end="")
    print(turn.trace_dict())

A stage is a small object with one method, `process(frame, turn)`, a generator that gets one
frame and yields what goes downstream: the same frame to pass it on, new frames to add,
nothing to drop it. A stage that learns something about a frame yields what it learned
first and the frame after it (NLU yields `Intent`, then the `UserText`), so every stage
downstream already has the facts when the frame arrives. Stages are chained as generators, so the first `TextDelta` of an answer
reaches the caller while later ones are still being generated, and every stage downstream
of respond (output safety) sees each piece as it comes.

The `Turn` is the whole context of one turn, and the only thing that changes from turn to
turn: the store (the calling thread's connection), who is speaking, the conversation and its
history, the sampling overrides of this request, its cancellation, every frame any stage
created (so respond can ask for the `Intent` or the `Passages`), and the trace: per stage a
decision, its evidence and the milliseconds spent inside that stage (its own work only: time
spent upstream or downstream is not counted twice). Stages are built once and hold nothing
per turn, so one pipeline serves many threads at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from parley.pipeline.frames import Frame, Interrupt, Passage, Passages, TextDelta, TraceEntry

if TYPE_CHECKING:
    from parley.store import Store

F = TypeVar("F", bound=Frame)


class Cancel:
    """A turn's stop signal, safe to set from any thread (the server's, when a client leaves):
    `set()` runs at once every callback registered with `on_set` (a generation request's
    cancel), so generation stops without waiting for its next token."""

    def __init__(self):
        self._lock, self._set, self._callbacks = threading.Lock(), False, []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            self._set, callbacks, self._callbacks = True, self._callbacks, []
        for callback in callbacks:
            callback()

    def on_set(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the turn is cancelled (now, if it already is)."""
        with self._lock:
            if not self._set:
                self._callbacks.append(callback)
                return
        callback()


class Tentative:
    """A turn started before it is known to be wanted: the live voice route starts one on its
    guess of what the user said, before the user is known to have finished. Its writes (the
    exchange, memory) wait until the route keeps it (`keep`) or drops it (`drop`: nothing of it is
    saved); one never decided is dropped after `timeout_s`, so no thread waits for ever."""

    def __init__(self, timeout_s: float = 60.0):
        self._decided, self._kept, self.timeout_s = threading.Event(), False, timeout_s

    def keep(self) -> None:
        self._kept = True
        self._decided.set()

    def drop(self) -> None:
        self._decided.set()

    def wait(self) -> bool:
        """Block until kept (True) or dropped (False)."""
        return self._decided.wait(self.timeout_s) and self._kept


@dataclass
class Usage:
    """Tokens a turn's generation read and wrote (0 where the backend cannot count them)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # the last generation's, as the engine gave it ("stop", "length")


@dataclass
class Turn:
    user_id: int
    conversation_id: int | None = None
    store: Store | None = None  # the calling thread's connection; stages that read or write the store need it
    overrides: dict[str, Any] = field(default_factory=dict)  # sampling fields of this request: temperature, seed ...
    history: list[dict[str, str]] = field(default_factory=list)  # earlier messages, oldest first
    slots: dict[str, Any] | None = None  # the dialogue state to carry to the next turn (the state stage sets it)
    cancel: Cancel = field(default_factory=Cancel)
    usage: Usage = field(default_factory=Usage)
    message_id: int | None = None  # the saved answer's id, once the turn is saved
    frames: list[Frame] = field(default_factory=list)  # every frame created in the turn, in order
    output: list[Frame] = field(default_factory=list)  # the frames that left the last stage
    trace: dict[str, TraceEntry] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)  # per-turn working state of a stage, by stage name
    interrupted: str | None = None  # set (to a reason) to stop the turn; see `interrupt`
    tentative: Tentative | None = None  # a turn not yet known to be wanted: its writes wait (may_write)
    draft: Callable[[str], None] | None = None  # given each piece of the answer as the model writes it,
    # before later stages check it: the live voice route synthesizes from it, and sends only checked text

    def get(self, kind: type[F]) -> F | None:
        """The latest frame of this type created so far in the turn, or None."""
        for frame in reversed(self.frames):
            if isinstance(frame, kind):
                return frame
        return None

    def all(self, kind: type[F]) -> list[F]:
        return [f for f in self.frames if isinstance(f, kind)]

    def note(self, stage: str, decision: str, **evidence: Any) -> None:
        """Record a stage's decision for the trace (the last note of a stage wins; evidence merges)."""
        entry = self.trace.setdefault(stage, TraceEntry(stage))
        entry.decision = decision
        entry.evidence.update(evidence)

    def interrupt(self, reason: str = "interrupted") -> None:
        """Stop the turn: the runner stops pulling frames, closing every stage's generator,
        so generation upstream ends at its next token."""
        self.interrupted = reason

    def may_write(self) -> bool:
        """Whether the turn may write to the store now: a plain turn always; a tentative one waits
        until it is kept (True) or dropped (False: it writes nothing)."""
        return self.tentative is None or self.tentative.wait()

    def drafted(self, piece: str) -> None:
        """The respond stage wrote `piece` of the answer (not yet checked): tell `draft`, if any."""
        if self.draft is not None:
            self.draft(piece)

    def text(self) -> str:
        """The answer as it left the pipeline so far (after any stage that held or rewrote it)."""
        return "".join(f.text for f in self.output if isinstance(f, TextDelta))

    def sources(self) -> list[Passage]:
        """Every passage the turn retrieved or fetched, numbered [1], [2], ... across all its
        Passages frames: the numbers the model sees, cites, and the user is shown."""
        found = [p for frame in self.all(Passages) for p in frame.items]
        return [replace(p, n=i) for i, p in enumerate(found, 1)]

    def trace_dict(self) -> dict[str, Any]:
        return {
            "stages": [
                {"stage": e.stage, "decision": e.decision, "evidence": e.evidence, "ms": round(e.ms, 3)}
                for e in self.trace.values()
            ],
            "total_ms": round(sum(e.ms for e in self.trace.values()), 3),
        }


class Stage:
    """Base class: override `process`. The default passes every frame on unchanged."""

    name = "stage"

    def process(self, frame: Frame, turn: Turn) -> Iterator[Frame]:
        yield frame


class Pipeline:
    def __init__(self, stages: list[Stage]):
        names = [s.name for s in stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"pipeline stage names must be unique; repeated: {', '.join(duplicates)}")
        self.stages = list(stages)

    def __repr__(self) -> str:
        return f"Pipeline({' -> '.join(s.name for s in self.stages)})"

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r} in {self!r}")

    def run(self, turn: Turn, first: Frame) -> Iterator[Frame]:
        """Stream the frames that leave the last stage. Closing the iterator (or calling
        `turn.interrupt`) closes every stage, so a streaming generator stops promptly."""
        turn.frames.append(first)
        for stage in self.stages:
            turn.trace.setdefault(stage.name, TraceEntry(stage.name))
        stream: Iterator[Frame] = _source(first)
        for stage in self.stages:
            stream = _through(stage, stream, turn)
        try:
            for frame in stream:
                turn.output.append(frame)
                yield frame
                if turn.interrupted is not None:
                    break
            if turn.interrupted is not None:
                turn.output.append(Interrupt(turn.interrupted))
                yield turn.output[-1]
        finally:
            stream.close()

    def __call__(self, turn: Turn, text: str) -> list[Frame]:
        """Run a text turn to the end and return the frames that came out."""
        from parley.pipeline.frames import UserText

        return list(self.run(turn, UserText(text)))


def _source(first: Frame) -> Iterator[Frame]:
    yield first


def _through(stage: Stage, upstream: Iterator[Frame], turn: Turn) -> Iterator[Frame]:
    entry = turn.trace[stage.name]
    try:
        for frame in upstream:
            if isinstance(frame, Interrupt):
                yield frame
                continue
            out = stage.process(frame, turn)
            if not hasattr(out, "__next__"):
                out = iter(out)
            try:
                while True:
                    start = time.perf_counter()
                    try:
                        emitted = next(out)
                    except StopIteration:
                        break
                    finally:
                        entry.ms += (time.perf_counter() - start) * 1000
                    if emitted is not frame:
                        turn.frames.append(emitted)
                    yield emitted
                    if turn.interrupted is not None:
                        return
            finally:
                close = getattr(out, "close", None)
                if close is not None:
                    close()
            if turn.interrupted is not None:
                return
    finally:
        upstream.close()
