"""Chat sessions in-process: history kept across turns, trimmed to fit the context, the
system message always first, and errors reported without ending the session."""

import io

import pytest

from parley.chat import ChatSession, run
from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.registry import Registry


@pytest.fixture(scope="module")
def session_parts(tiny_hf_dir, tmp_path_factory):
    registry = Registry(tmp_path_factory.mktemp("home"))
    registry.import_model(str(tiny_hf_dir), name="tiny")
    model, tokenizer, _ = registry.load("tiny")
    return Engine(model), tokenizer


def test_history_is_kept_and_trimmed_to_the_context(session_parts):
    engine, tok = session_parts
    session = ChatSession(engine, tok, SamplingParams(max_tokens=4, temperature=0), system="Be brief.")
    for turn in range(12):
        "".join(session.reply(f"hello there number {turn}"))
        ids = session.prompt_ids("how are you today?")
        assert len(ids) + min(4, engine.context_length // 4) <= engine.context_length
    rendered = tok.decode(session.prompt_ids("last one"), skip_special_tokens=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.")
    assert "hello there number 11" in rendered and "hello there number 0" not in rendered
    assert len(session.history) == 24  # the session remembers everything; only the prompt is trimmed


def test_run_reports_errors_and_keeps_going(session_parts):
    engine, tok = session_parts
    session = ChatSession(engine, tok, SamplingParams(max_tokens=3, temperature=0))
    out = io.StringIO()
    run(session, io.StringIO("Paris " * 200 + "\n/bogus\nhello\n"), out)
    text = out.getvalue()
    assert "[error: the prompt is" in text and "context is 96 tokens" in text
    assert "unknown command /bogus" in text
    assert len(session.history) == 2  # the failed turn left no trace; the last one did


def test_text_stream_stops_at_stop_strings_without_emitting_them(session_parts):
    from parley.engine.text import TextStream

    engine, tok = session_parts
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
