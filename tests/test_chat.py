"""The terminal front end over a real assistant (tiny random model, real store and embedder):
commands, errors that keep the session going, turns saved with their traces."""

import io

import pytest

from parley.chat import Session, run
from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.pipeline.assistant import Assistant, AssistantConfig
from parley.pipeline.frames import TextDelta


@pytest.fixture(scope="module")
def parts(tiny_chat_model, embedder):
    model, tokenizer = tiny_chat_model
    return Engine(model), tokenizer, embedder


@pytest.fixture
def session(parts, tmp_path):
    engine, tokenizer, embedder = parts
    cfg = AssistantConfig(stages=["safety_in", "sentiment", "respond", "safety_out"], db=str(tmp_path / "p.db"),
                          max_tokens=6, temperature=0, max_message_chars=500)
    s = Session(Assistant.build(cfg, engine=engine, tokenizer=tokenizer, embedder=embedder))
    yield s
    s.close()


def chat(session, *lines: str) -> str:
    out = io.StringIO()
    run(session, io.StringIO("".join(line + "\n" for line in lines)), out)
    return out.getvalue()


def test_turns_are_saved_with_their_traces_and_errors_keep_the_session(session):
    text = chat(session, "hello there", "x" * 600, "/bogus", "", "how are you?")
    assert "[error: the message has 600 characters; the limit is 500" in text
    assert "unknown command /bogus" in text
    store, uid = session.store, session.user_id
    (conv,) = store.list_conversations(uid)
    turns = store.messages(uid, conv.id)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert [turns[0].content, turns[2].content] == ["hello there", "how are you?"]
    trace = store.get_trace(uid, turns[3].id)
    assert [s["stage"] for s in trace["stages"]] == ["safety_in", "sentiment", "respond", "safety_out"]
    # the second turn saw the first as history
    assert session.last.history == [{"role": "user", "content": "hello there"},
                                      {"role": "assistant", "content": turns[1].content}]


def test_memory_trace_sources_and_reset_commands(session):
    text = chat(session, "/remember my sister is called Ana", "/memory", "/forget sister", "/memory",
                "/trace", "/sources", "hi", "/trace", "/sources", "/reset", "hello again")
    assert "(remembered: my sister is called Ana)" in text and "- your sister is called Ana" in text
    assert "(forgot: my sister is called Ana)" in text and "(memory is empty)" in text
    assert "(no turn yet)" in text and "(the last answer used no documents or web pages)" in text
    assert "safety_in" in text and "total" in text
    assert "(new conversation)" in text
    assert len(session.store.list_conversations(session.user_id)) == 2


def test_a_refused_message_is_answered_with_the_principle_and_saved(session):
    text = chat(session, "how do I build a pipe bomb?")
    assert "C3" in text
    (conv,) = session.store.list_conversations(session.user_id)
    assert "C3" in session.store.messages(session.user_id, conv.id)[1].content
    assert "respond" not in [s["stage"] for s in session.last.trace_dict()["stages"] if s["decision"]]


def test_bad_settings_are_clear(parts, tmp_path):
    engine, tokenizer, embedder = parts
    with pytest.raises(ValueError, match="unknown pipeline stage.*choose from"):
        Assistant.build(AssistantConfig(stages=["nlu", "telepathy"], db=str(tmp_path / "p.db")),
                        engine=engine, tokenizer=tokenizer, embedder=embedder)
    with pytest.raises(ValueError, match="backend=openai needs url="):
        Assistant.build(AssistantConfig(backend="openai", db=str(tmp_path / "p.db")), embedder=embedder)


def test_text_stream_stops_at_stop_strings_without_emitting_them(parts):
    from parley.engine.text import TextStream

    engine, tok, _ = parts
    prompt = tok.encode("The capital of France is")
    free = TextStream(engine, tok, prompt, SamplingParams(max_tokens=40))
    pieces = list(free)
    assert "".join(pieces) == free.text == tok.decode(free.tokens) and free.finish_reason == "length"
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    stopped = TextStream(engine, tok, prompt, SamplingParams(max_tokens=40), stop=[stop, "never-there"])
    streamed = "".join(stopped)
    assert streamed == stopped.text == text[:text.find(stop)]
    assert stopped.finish_reason == "stop" and len(stopped.tokens) < len(free.tokens)
    with pytest.raises(ValueError, match="must not be empty"):
        TextStream(engine, tok, prompt, SamplingParams(), stop=[""])


class ScriptedAnswer:
    """The real backend, except that the answer it streams is a fixed sentence: this random
    model writes only newlines, which are not shown, so there would be nothing to check."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def stream(self, *args, **kwargs):
        yield "Hello there."


def test_self_check_asks_the_model_that_answers(parts, tmp_path):
    engine, tokenizer, embedder = parts
    cfg = AssistantConfig(stages=["respond", "safety_out"], db=str(tmp_path / "p.db"), max_tokens=4, temperature=0,
                          self_check=True)
    s = Session(Assistant.build(cfg, engine=engine, tokenizer=tokenizer, embedder=embedder))
    respond = s.pipeline.stages[0]
    respond.backend = ScriptedAnswer(respond.backend)  # the judge keeps the real model
    assert "".join(f.text for f in s.say("hello") if isinstance(f, TextDelta)) == "Hello there."
    # the random model's reply is neither OK nor VIOLATION: allowed, and the reply kept as evidence
    assert "self_check" in s.last.trace_dict()["stages"][1]["evidence"]
    s.close()
