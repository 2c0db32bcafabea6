"""The pipeline core: frames flow through stages as a stream, the trace records each stage,
and an interrupt closes every stage's generator."""

import pytest

from parley.pipeline.frames import EndOfAnswer, Interrupt, Intent, Notice, TextDelta, UserText
from parley.pipeline.runner import Pipeline, Stage, Turn


class Upper(Stage):
    name = "upper"

    def process(self, frame, turn):
        if isinstance(frame, UserText):
            turn.note(self.name, "shouted", length=len(frame.text))
            yield Intent("greeting", 0.9)
            yield UserText(frame.text.upper())
        else:
            yield frame


class Words(Stage):
    """Streams the text back one word at a time, counting what it has been asked for."""

    name = "words"

    def __init__(self):
        self.pulled = 0
        self.closed = False

    def process(self, frame, turn):
        yield frame
        if isinstance(frame, UserText):
            try:
                for word in frame.text.split():
                    self.pulled += 1
                    yield TextDelta(word + " ")
                yield EndOfAnswer()
            finally:
                self.closed = True


class Drop(Stage):
    name = "drop"

    def process(self, frame, turn):
        if not isinstance(frame, Intent):  # drops frames of one kind
            yield frame


def test_frames_flow_in_order_and_are_recorded():
    words = Words()
    turn = Turn(user_id=1)
    out = list(Pipeline([Upper(), Drop(), words])(turn, "hello big world"))
    assert [type(f).__name__ for f in out] == ["UserText", "TextDelta", "TextDelta", "TextDelta", "EndOfAnswer"]
    assert turn.text() == "HELLO BIG WORLD "
    assert turn.get(Intent).name == "greeting"  # created upstream, recorded though dropped downstream
    assert turn.get(UserText).text == "HELLO BIG WORLD"
    assert [f.text for f in turn.all(UserText)] == ["hello big world", "HELLO BIG WORLD"]
    trace = turn.trace_dict()
    assert [s["stage"] for s in trace["stages"]] == ["upper", "drop", "words"]
    assert trace["stages"][0]["decision"] == "shouted" and trace["stages"][0]["evidence"] == {"length": 15}
    assert all(s["ms"] >= 0 for s in trace["stages"]) and trace["total_ms"] >= 0


def test_streaming_is_lazy_and_interrupt_closes_generators():
    words = Words()
    turn = Turn(user_id=1)
    stream = Pipeline([words]).run(turn, UserText("one two three four five"))
    assert next(stream) == UserText("one two three four five")
    assert next(stream) == TextDelta("one ") and words.pulled == 1  # nothing generated ahead
    turn.interrupt("barge-in")
    rest = list(stream)
    assert rest == [Interrupt("barge-in")]
    assert words.closed and words.pulled == 1  # nothing generated after the interrupt


def test_closing_the_stream_closes_every_stage():
    words = Words()
    stream = Pipeline([Upper(), words]).run(Turn(user_id=1), UserText("a b c"))
    assert [type(next(stream)).__name__ for _ in range(3)] == ["Intent", "UserText", "TextDelta"]
    stream.close()
    assert words.closed


def test_stage_names_must_be_unique_and_notes_merge():
    with pytest.raises(ValueError, match="repeated: upper"):
        Pipeline([Upper(), Upper()])
    turn = Turn(user_id=1)
    turn.note("x", "first", a=1)
    turn.note("x", "second", b=2)
    assert turn.trace["x"].decision == "second" and turn.trace["x"].evidence == {"a": 1, "b": 2}
    assert Notice("hi").to_dict() == {"type": "Notice", "text": "hi"}
