"""Hostile text at the HTTP edge: lone surrogates, odd digits in headers, out-of-range max_tokens.
Each is a 400 in OpenAI's error shape, never a 500, and the connection keeps serving. A real
server over the tiny model, the real embedder and a SQLite file, as in test_serve.py."""

import json

import httpx
import hypothesis  # installed with schemathesis, a pinned dev dependency
import hypothesis.strategies as st
import pytest

from parley.engine.config import EngineConfig
from parley.serve.app import create_app
from parley.serve.server import EMBEDDING_MODEL
from parley.serve.settings import Settings
from serving import serving
from test_serve import STAGES, Site, embedder, make_users  # noqa: F401 (embedder: a fixture)

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def site(tiny768_registry, embedder, tmp_path_factory):  # noqa: F811
    db = str(tmp_path_factory.mktemp("db") / "parley.db")
    keys = make_users(db, ann="admin")
    settings = Settings(db=db, home=tiny768_registry.home, model="tiny768", engine=EngineConfig(dtype="float32"),
                        stages=STAGES, max_tokens=4)
    with serving(create_app(settings, embedder=embedder)) as url:
        yield Site(url, keys, db)


@pytest.fixture()
def http(site):
    with site.http() as client:
        yield client


def chat(model: str, content: str = "hi", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def _port(response: httpx.Response) -> int:
    """The client's local port: the same port means the same (kept-alive) connection."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def assert_refused(response: httpx.Response, param: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_still_serving(http: httpx.Client, refused: httpx.Response) -> None:
    good = http.post(CHAT, json=chat("tiny768"))
    assert good.status_code == 200, good.text
    assert _port(good) == _port(refused), "the bad request cost the client its connection"


# JSON texts whose "\ud800" escapes decode to lone surrogates (json.dumps would escape the backslash)
BAD_BODIES = [
    (CHAT, '{"model": "tiny768", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages"),
    (CHAT, '{"model": "parley", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages"),
    (CHAT, '{"model": "parley", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
    (CHAT, '{"model": "tiny768", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages"),
    (CHAT, '{"model": "parley", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages"),
    (CHAT, '{"model": "tiny768", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop"),
    (CHAT, '{"model": "tiny768", "messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}', "stop"),
    (CHAT, '{"model": "tiny\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (CHAT, '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/completions", '{"model": "tiny768", "prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "tiny768", "prompt": ["\\ud800"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "tiny768", "prompt": "hi", "stop": ["\\udc00"], "max_tokens": 2}', "stop"),
    ("/v1/embeddings", '{"model": "' + EMBEDDING_MODEL + '", "input": "hi \\ud800"}', "input"),
    ("/v1/embeddings", '{"model": "' + EMBEDDING_MODEL + '", "input": ["fine", "\\ud800"]}', "input"),
    ("/v1/embeddings", '{"model": "\\ud800", "input": "hi"}', "model"),
    ("/api/memory", '{"text": "I like \\ud800"}', "text"),
]


@pytest.mark.parametrize("route, body, param", BAD_BODIES, ids=[f"{r}-{p}-{i}" for i, (r, _, p) in
                                                               enumerate(BAD_BODIES)])
def test_a_lone_surrogate_is_a_400_naming_the_field(http, route, body, param):
    refused = http.post(route, content=body.encode(), headers={"Content-Type": "application/json"})
    error = assert_refused(refused, param)
    assert "surrogate" in error["message"] and "U+D" in error["message"]
    assert_still_serving(http, refused)


def test_a_surrogate_in_feedback_is_a_400(http):
    done = http.post(CHAT, json=chat("parley"))
    assert done.status_code == 200, done.text
    turn = done.json()["parley"]["turn_id"]
    refused = http.post(f"/api/turns/{turn}/feedback", content=b'{"rating": -1, "edited_text": "better \\ud800"}',
                        headers={"Content-Type": "application/json"})
    assert_refused(refused, "edited_text")
    assert_still_serving(http, refused)


def test_invalid_utf8_bytes_in_the_body_are_a_400(http):
    refused = http.post(CHAT, content=b'{"model": "tiny768", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                        headers={"Content-Type": "application/json"})
    assert_refused(refused)
    assert_still_serving(http, refused)


# header bytes are read as Latin-1, so b"\xb2" arrives as "²", which str.isdigit() takes and int() refuses
@pytest.mark.parametrize("header", [b"\xb2", b"1\xb2", b"\xb9\xb2\xb3", "١٢".encode(), b"+3", b"-1", b"3.0", b"0x10",
                                    b"9" * 40])
def test_the_conversation_header_takes_ascii_digits_only(http, header):
    refused = http.post(CHAT, json=chat("parley"), headers={"X-Parley-Conversation": header})
    error = assert_refused(refused, "X-Parley-Conversation")
    assert "ASCII digits" in error["message"]
    assert_still_serving(http, refused)


def test_a_good_conversation_header_still_continues_the_conversation(http):
    first = http.post(CHAT, json=chat("parley"))
    conv = first.json()["parley"]["conversation_id"]
    again = http.post(CHAT, json=chat("parley", "and again"), headers={"X-Parley-Conversation": str(conv)})
    assert again.status_code == 200, again.text
    assert again.json()["parley"]["conversation_id"] == conv


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [10**9, 1e9, 769, 768])
def test_max_tokens_past_the_context_is_the_same_400_for_both_models(http, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    raw, parley = (http.post(CHAT, json={**body, "model": m}) for m in ("tiny768", "parley"))
    raw_error, parley_error = assert_refused(raw, "max_tokens"), assert_refused(parley, "max_tokens")
    assert raw_error["code"] == parley_error["code"] == "context_length_exceeded"
    assert "768" in parley_error["message"]  # the context it has to fit in


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, -(10**9), 1.5, "many"])
def test_max_tokens_out_of_range_is_the_same_400_for_both_models(http, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    raw, parley = (http.post(CHAT, json={**body, "model": m}) for m in ("tiny768", "parley"))
    assert assert_refused(raw, field)["code"] == assert_refused(parley, field)["code"]


def test_a_max_tokens_that_fits_still_answers_with_the_assistant(http):
    answer = http.post(CHAT, json=chat("parley", max_tokens=3))
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] <= 3


# any code point, lone surrogates (category Cs) and control characters included
ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(text=st.text(ANY_CHAR, max_size=40), model=st.sampled_from(["tiny768", "parley"]))
@hypothesis.example(text="\ud800", model="parley")
@hypothesis.example(text="\x00\x1b[2J\udfff", model="tiny768")
def test_no_chat_message_text_is_a_server_error(http, text, model):
    body = json.dumps(chat(model, text, max_tokens=1))  # ASCII: a lone surrogate goes as its \u escape
    response = http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
