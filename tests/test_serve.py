"""The HTTP server over real parts: uvicorn on a local port, the official openai SDK as client, a
tiny random model from a temporary registry, the real MiniLM embedder and a SQLite file."""

import base64
import dataclasses
import io
import json
import re
import socket
import threading

import httpx
import numpy as np
import openai
import pytest

from parley.config import ConfigError
from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.engine.text import TextStream
from parley.pipeline.embed import Embedder
from parley.registry import Registry
from parley.engine.config import EngineConfig
from parley.serve.app import create_app
from parley.serve.main import serve_main, users_main
from parley.serve.settings import ServeError, Settings
from parley.store import Store
from serving import GatedEngine, serving

STAGES = ["safety_in", "sentiment", "state", "respond", "safety_out"]


@pytest.fixture(scope="module")
def registry(tiny768_registry):
    return tiny768_registry


@pytest.fixture(scope="module")
def reference(registry):
    """What the engine says on its own, for comparing the server's answers with."""
    model, tokenizer, _ = registry.load("tiny768")
    engine = Engine(model)

    def complete(ids: list[int], max_tokens: int, stop=()) -> str:
        params = SamplingParams(max_tokens=max_tokens, stop_ids=tokenizer.stop_ids)
        return "".join(TextStream(engine, tokenizer, ids, params, stop=stop))

    return engine, tokenizer, complete


@pytest.fixture(scope="module")
def embedder():
    return Embedder.load()


@dataclasses.dataclass
class Site:
    url: str
    keys: dict[str, str]
    db: str

    def sdk(self, user: str = "ann") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.keys.get(user, user), max_retries=0)

    def http(self, user: str = "ann") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.keys[user]}"}, timeout=60)


def make_users(db: str, **roles: str) -> dict[str, str]:
    """Users made with `parley users`, and a key for each."""
    keys = {}
    for name, role in roles.items():
        users_main(["--db", db, "add", name, *(["--admin"] if role == "admin" else [])], out=io.StringIO())
        out = io.StringIO()
        users_main(["--db", db, "key", name], out=out)
        keys[name] = out.getvalue().strip()
    return keys


@pytest.fixture(scope="module")
def site(registry, embedder, tmp_path_factory):
    db = str(tmp_path_factory.mktemp("db") / "parley.db")
    keys = make_users(db, ann="admin", bob="user")
    settings = Settings(db=db, home=registry.home, model="tiny768", engine=EngineConfig(dtype="float32"), stages=STAGES,
                        max_tokens=12, max_upload_bytes=20_000)
    with serving(create_app(settings, embedder=embedder)) as url:
        yield Site(url, keys, db)


def test_models_lists_the_registry_the_assistant_and_the_embedder(site):
    names = [m.id for m in site.sdk().models.list()]
    assert names[:4] == ["tiny", "tiny768", "parley", "all-minilm-l6-v2"]  # then the speech models
    assert site.sdk().models.retrieve("parley").id == "parley"
    with pytest.raises(openai.NotFoundError):
        site.sdk().models.retrieve("nope")


def test_chat_answers_as_the_engine_does_whole_and_streamed(site, reference):
    engine, tokenizer, complete = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"}]
    ids = tokenizer.encode_chat(messages)
    expected = complete(ids, 10)
    reply = site.sdk().chat.completions.create(model="tiny768", messages=messages, temperature=0, max_tokens=10)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(ids) and 1 <= reply.usage.completion_tokens <= 10
    chunks = list(site.sdk().chat.completions.create(model="tiny768", messages=messages, temperature=0,
                                                     max_completion_tokens=10, stream=True,
                                                     stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_with_a_stop_string(site, reference):
    engine, tokenizer, complete = reference
    prompt = "The capital of France is"
    full = complete(tokenizer.encode(prompt), 20)
    reply = site.sdk().completions.create(model="tiny768", prompt=prompt, temperature=0, max_tokens=20)
    assert reply.choices[0].text == full
    stop = full[3:5]
    cut = site.sdk().completions.create(model="tiny768", prompt=prompt, temperature=0, max_tokens=20, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = site.sdk().completions.create(model="tiny768", prompt=prompt, temperature=0, max_tokens=20,
                                             stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_completions_echo_the_prompt_whole_and_streamed(site, reference):
    """echo=true sends the prompt back before its completion, as OpenAI and vLLM do (it was ignored)."""
    engine, tokenizer, complete = reference
    prompt = "The capital of France is"
    full = complete(tokenizer.encode(prompt), 8)
    reply = site.sdk().completions.create(model="tiny768", prompt=[prompt], temperature=0, max_tokens=8, echo=True)
    assert reply.choices[0].text == prompt + full and reply.usage.completion_tokens <= 8
    chunks = list(site.sdk().completions.create(model="tiny768", prompt=prompt, temperature=0, max_tokens=8,
                                                echo=True, stream=True))
    assert chunks[0].choices[0].text == prompt  # the prompt comes first, as a chunk of its own
    assert "".join(c.choices[0].text for c in chunks) == prompt + full
    assert site.sdk().completions.create(model="tiny768", prompt=prompt, temperature=0, max_tokens=8,
                                         echo=False).choices[0].text == full
    stopped = site.sdk().completions.create(model="tiny768", prompt=prompt, temperature=0, max_tokens=8, echo=True,
                                            stop="France")  # stop strings end the completion, not the prompt
    assert stopped.choices[0].text.startswith(prompt)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_options_not_implemented_are_refused_unless_they_ask_for_nothing(site, route):
    """OpenAI's options that this server does not implement were answered 200 and ignored; now each is a
    400 naming it and saying what is supported, except for the values that ask for nothing special."""
    base = {"model": "tiny768", "max_tokens": 1, **({"messages": [{"role": "user", "content": "hi"}]}
                                                     if route == "/v1/chat/completions" else {"prompt": "Hi"})}
    plain = {"response_format": {"type": "text"}, "echo": False, "best_of": 1, "suffix": "", "tool_choice": "none",
             "top_logprobs": 0, "logprobs": False, "tools": [], "frequency_penalty": 0, "presence_penalty": 0.0,
             "logit_bias": {}, "functions": [], "function_call": "none", "modalities": ["text"],
             "parallel_tool_calls": True, "prediction": None}
    refused = [("response_format", {"type": "json_object"}),
               ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
               ("best_of", 2), ("suffix", " and so on."), ("top_logprobs", 5), ("tool_choice", "required"),
               ("tool_choice", {"type": "function", "function": {"name": "weather"}}), ("logprobs", True),
               ("logprobs", 5), ("frequency_penalty", 0.5), ("presence_penalty", -1), ("logit_bias", {"50256": -100}),
               ("functions", [{"name": "weather", "parameters": {}}]), ("function_call", {"name": "weather"}),
               ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
               ("prediction", {"type": "content", "content": "The answer, nearly as it was."})]
    if route == "/v1/chat/completions":
        refused.append(("echo", True))  # on /v1/completions it is implemented
    with site.http() as http:
        for values in (plain, {**plain, "suffix": None, "tool_choice": "auto", "top_logprobs": None,
                               "best_of": None, "response_format": None, "parallel_tool_calls": False},
                       {**plain, "parallel_tool_calls": None}):
            assert http.post(route, json={**base, **values}).status_code == 200, values
        for name, value in refused:
            reply = http.post(route, json={**base, name: value})
            assert reply.status_code == 400, (name, value, reply.text)
            error = reply.json()["error"]
            assert error["param"] == name and f"{name} " in error["message"], error
            assert "not supported" in error["message"], error["message"]


def test_parallel_tool_calls_must_be_a_boolean_and_prediction_is_refused(site):
    """parallel_tool_calls and prediction were accepted whatever they held and ignored. OpenAI defines the first
    as a boolean (it only matters with tools, which are refused) and the second as predicted output, which Parley
    does not use: the SDK's own values get an answer, anything else a 400 that names the field."""
    chat = {"model": "tiny768", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    for value in (True, False):  # as the official SDK sends them, and its prediction=None as null
        reply = site.sdk().chat.completions.create(**chat, parallel_tool_calls=value, prediction=None)
        assert reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as refused:
        site.sdk().chat.completions.create(**chat, prediction={"type": "content", "content": "hi there"})
    assert refused.value.body["param"] == "prediction" and "predicted outputs" in refused.value.body["message"]
    with site.http() as http:
        for value in ("yes", "true", 1, 0, {}, [True]):
            reply = http.post("/v1/chat/completions", json={**chat, "parallel_tool_calls": value})
            assert reply.status_code == 400, (value, reply.text)
            error = reply.json()["error"]
            assert error["param"] == "parallel_tool_calls" and "boolean" in error["message"], error
        for value in ("content", ["content"]):
            reply = http.post("/v1/chat/completions", json={**chat, "prediction": value})
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "prediction", reply.text
        tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
        reply = http.post("/v1/chat/completions", json={**chat, "tools": tools, "parallel_tool_calls": False})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "tools", reply.text


def test_stop_strings_are_bounded_so_a_stream_is_never_held_back_whole(site, reference):
    """Text that could be the start of a stop string is held back from a stream: a stop string of 100,000
    characters held back everything until the end. Each may now be at most MAX_STOP_CHARS long, 4 at most."""
    from parley.engine.text import TextAssembler

    with site.http() as http:
        for route, body in [("/v1/completions", {"prompt": "Hi"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
            body = {**body, "model": "tiny768", "max_tokens": 2}
            for stop in ("z" * 100_000, ["never", "z" * 257], ["a", "b", "c", "d", "e"], ["a", ""]):
                reply = http.post(route, json={**body, "stop": stop})
                assert reply.status_code == 400 and reply.json()["error"]["param"] == "stop", reply.text
            assert "at most 256 characters (one has 100000)" in \
                http.post(route, json={**body, "stop": "z" * 100_000}).json()["error"]["message"]
            assert http.post(route, json={**body, "stop": ["z" * 256, "a", "b", "c"]}).status_code == 200
    tokenizer = reference[1]  # the server's text assembler refuses them too: it holds back 255 characters at most
    assert TextAssembler(tokenizer, ["x" * 256]).hold == 255
    with pytest.raises(ValueError, match="at most 256 characters"):
        TextAssembler(tokenizer, ["x" * 257])
    # each token's search starts where a stop string could begin in the new text: the first stop is still found
    from parley.engine.engine import Event

    text = "The cat sat on the mat. STOP here, then more words follow STOP again."
    for stops in (["STOP"], ["more", "sat on the mat"], [" the m", "x" * 256], ["again."]):
        assembler = TextAssembler(tokenizer, stops)
        shown = "".join(assembler.push(Event(0, t, None)) for t in tokenizer.encode(text))
        shown += assembler.push(Event(0, None, "length"))
        assert shown == text[:min(i for i in map(text.find, stops) if i >= 0)] and assembler.finish_reason == "stop"


def test_embeddings_are_minilm_vectors_as_floats_and_base64(site, embedder):
    texts = ["The rent is due on the first.", "Paris is in France."]
    reply = site.sdk().embeddings.create(model="all-minilm-l6-v2", input=texts)  # the SDK asks for base64
    got = np.array([d.embedding for d in reply.data])
    np.testing.assert_allclose(got, embedder(texts), atol=1e-6)
    with site.http() as http:
        body = http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": texts[0],
                                                 "encoding_format": "float"}).json()
    assert len(body["data"][0]["embedding"]) == 384 and body["usage"]["prompt_tokens"] > 0
    raw = site.sdk().embeddings.with_raw_response.create(model="all-minilm-l6-v2", input=texts[0],
                                                         encoding_format="base64")
    vector = np.frombuffer(base64.b64decode(json.loads(raw.text)["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, body["data"][0]["embedding"], atol=1e-6)


def test_bad_requests_are_openai_errors_with_the_right_status(site):
    sdk, chat = site.sdk(), [{"role": "user", "content": "hi"}]
    cases = [
        (openai.NotFoundError, dict(model="gpt-9", messages=chat), "model"),
        (openai.BadRequestError, dict(model="tiny768", messages=chat, temperature=5), "temperature"),
        (openai.BadRequestError, dict(model="tiny768", messages=chat, n=2), "n"),
        (openai.BadRequestError, dict(model="tiny768", messages=chat, max_tokens=100_000), "max_tokens"),
        (openai.BadRequestError, dict(model="tiny768", messages=[]), "messages"),
        (openai.BadRequestError, dict(model="parley", messages=chat, stop="x"), "stop"),
        (openai.BadRequestError, dict(model="tiny768", messages=chat, seed=2**70), "seed"),
        (openai.BadRequestError, dict(model="tiny768", messages=chat, logprobs=True), "logprobs"),
        (openai.BadRequestError, dict(model="parley", messages=[{"role": "system", "content": "x"}]), "messages"),
    ]
    for error, kwargs, param in cases:
        with pytest.raises(error) as caught:
            sdk.chat.completions.create(**kwargs)
        assert caught.value.body["param"] == param and caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="tiny768", input="x")
    with pytest.raises(openai.AuthenticationError):
        site.sdk("not-a-key").models.list()
    with httpx.Client(base_url=site.url) as http:
        missing = http.get("/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    with site.http() as http:
        bad = http.post("/v1/chat/completions", content=b'{"model": "tiny768", "messages": [', 
                        headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
        for kind in ("application/x-www-form-urlencoded", "text/plain"):  # curl -d's type, and a plain one
            form = http.post("/v1/chat/completions", headers={"Content-Type": kind},
                             content=b'{"model": "tiny768", "messages": [{"role": "user", "content": "hi"}]}')
            assert form.status_code == 400 and "Content-Type: application/json" in form.json()["error"]["message"]
        assert http.post("/v1/completions", json={"model": "tiny768", "prompt": "x" * 5000}).status_code == 400
        huge = http.post("/v1/completions", content=b"x" * 3_000_000)
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "too_large"
        assert http.get("/api/nowhere").json()["error"]["type"] == "not_found_error"
        assert http.get(f"/api/conversations/{2**70}").status_code == 400  # not an overflow deep down
        assert http.get("/api/conversations/abc").status_code == 400
        tiny_t = http.post("/v1/completions", json={"model": "tiny768", "prompt": "Hi", "temperature": 1e-300,
                                                    "max_tokens": 2})
        assert tiny_t.status_code == 200


def test_the_assistant_says_when_max_tokens_cut_its_answer(site):
    # model "parley" reported "stop" for every answer, also one cut at max_tokens, which model "tiny" calls "length"
    sdk = site.sdk()
    chat = [{"role": "user", "content": "tell me a long story about the sea"}]
    reply = sdk.chat.completions.create(model="parley", messages=chat, temperature=0, max_tokens=2)
    assert reply.usage.completion_tokens == 2 and reply.choices[0].finish_reason == "length"
    chunks = list(sdk.chat.completions.create(model="parley", messages=chat, temperature=0, max_tokens=2, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_assistant_keeps_a_conversation_with_traces_and_feedback(site):
    sdk = site.sdk()
    first = sdk.chat.completions.with_raw_response.create(
        model="parley", messages=[{"role": "user", "content": "hello there"}], temperature=0)
    conv = int(first.headers["x-parley-conversation"])
    reply = first.parse()
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    chunks = list(sdk.chat.completions.create(model="parley", messages=[{"role": "user", "content": "how are you?"}],
                                              temperature=0, stream=True,
                                              extra_headers={"X-Parley-Conversation": str(conv)}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    turn_id = chunks[-1].model_extra["parley"]["turn_id"]
    with site.http() as http:
        turns = http.get(f"/api/conversations/{conv}").json()["turns"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * 2
        # what was shown is what was saved (the store keeps it without surrounding whitespace)
        assert turns[1]["content"] == reply.choices[0].message.content.strip()
        assert turns[3]["content"] == streamed.strip()
        assert turns[3]["id"] == turn_id
        stages = [s["stage"] for s in http.get(f"/api/turns/{turn_id}/trace").json()["stages"]]
        assert stages == STAGES
        saved = http.post(f"/api/turns/{turn_id}/feedback", json={"rating": -1, "edited_text": "Fine, thanks!"})
        assert saved.status_code == 200 and saved.json()["rating"] == -1
        assert http.post(f"/api/turns/{turn_id}/feedback", json={"rating": 3}).status_code == 400
        assert http.get(f"/api/turns/{turn_id}/feedback").json()["edited_text"] == "Fine, thanks!"
        assert conv in [c["id"] for c in http.get("/api/conversations").json()["data"]]
    with Store(site.db) as store:
        feedback = store.get_feedback(store.get_user_by_name("ann").id, turn_id)
    assert (feedback.rating, feedback.edited_text) == (-1, "Fine, thanks!")


def test_a_user_cannot_see_or_touch_another_users_things(site):
    with Store(site.db) as store:
        ann = store.get_user_by_name("ann").id
        conv = store.create_conversation(ann, "private")
        _, answer = store.add_exchange(ann, conv.id, "q", "a", {"stages": [], "total_ms": 0})
        fact = store.add_memory(ann, "my sister is called Ana")
        doc = store.add_document(ann, "notes.txt", "text/plain", ["secret notes"])
    with site.http("bob") as bob:
        for method, path, body in [("GET", f"/api/conversations/{conv.id}", None),
                                   ("DELETE", f"/api/conversations/{conv.id}", None),
                                   ("GET", f"/api/turns/{answer.id}/trace", None),
                                   ("POST", f"/api/turns/{answer.id}/feedback", {"rating": 1}),
                                   ("GET", f"/api/turns/{answer.id}/feedback", None),
                                   ("DELETE", f"/api/memory/{fact.id}", None),
                                   ("DELETE", f"/api/knowledge/{doc}", None)]:
            assert bob.request(method, path, json=body).status_code == 404, path
        assert bob.get("/api/memory").json()["data"] == [] and bob.get("/api/knowledge").json()["data"] == []
        assert conv.id not in [c["id"] for c in bob.get("/api/conversations").json()["data"]]
        assert bob.get("/api/users").status_code == 403
        hijack = bob.post("/v1/chat/completions", headers={"X-Parley-Conversation": str(conv.id)},
                          json={"model": "parley", "messages": [{"role": "user", "content": "hi"}]})
        assert hijack.status_code == 404
    with site.http("ann") as ann_http:
        assert ann_http.get(f"/api/turns/{answer.id}/trace").status_code == 200
        assert [f["text"] for f in ann_http.get("/api/memory").json()["data"]] == ["my sister is called Ana"]
        assert ann_http.delete(f"/api/memory/{fact.id}").status_code == 200
        added = ann_http.post("/api/memory", json={"text": "I live in Porto"})
        assert added.status_code == 201 and added.json()["text"] == "I live in Porto"
        assert ann_http.post("/api/memory", json={"text": "   "}).json()["error"]["message"].startswith("nothing to")
        assert ann_http.post("/api/memory", json={"text": "x" * 501}).status_code == 400
    with site.http("bob") as bob:
        assert bob.get("/api/memory").json()["data"] == []  # ann's new fact is hers alone
    with site.http("ann") as ann_http:
        assert ann_http.delete(f"/api/conversations/{conv.id}").status_code == 200
        assert ann_http.get(f"/api/conversations/{conv.id}").status_code == 404
        assert {u["name"] for u in ann_http.get("/api/users").json()["data"]} >= {"ann", "bob"}


def test_knowledge_upload_list_delete_and_limits(site):
    with site.http("bob") as http:
        files = {"file": ("rent.md", b"# Rent\n\nThe rent is due on the first of each month.", "text/markdown")}
        stored = http.post("/api/knowledge", files=files, data={"collection": "home"})
        assert stored.status_code == 201 and stored.json()["chunks"] == 1
        assert http.post("/api/knowledge", files=files).json()["status"] == "stored"  # another collection
        again = http.post("/api/knowledge", files=files, data={"collection": "home"})
        assert again.status_code == 200 and again.json()["status"] == "skipped"
        docs = http.get("/api/knowledge").json()["data"]
        # where an upload came from is its name, never the server's temporary folder
        assert {d["source"] for d in docs} == {"upload:rent.md"}
        assert [(d["name"], d["collection"]) for d in docs] == [("rent.md", "home"), ("rent.md", "default")]
        for d in docs:
            assert http.delete(f"/api/knowledge/{d['id']}").status_code == 200
        assert http.get("/api/knowledge").json()["data"] == []
        big = http.post("/api/knowledge", files={"file": ("big.txt", b"word " * 20_000, "text/plain")})
        assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
        odd = http.post("/api/knowledge", files={"file": ("tool.exe", b"MZ\x00\x01", "application/octet-stream")})
        assert odd.status_code == 400 and "unsupported file type" in odd.json()["error"]["message"]
        assert http.post("/api/knowledge", data={"collection": "x"}).status_code == 400


def test_metrics_are_prometheus_text_and_health_answers(site):
    site.sdk().completions.create(model="tiny768", prompt="Hello", temperature=0, max_tokens=3)
    with httpx.Client(base_url=site.url) as http:
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["kv_dtype"] == "float32" and health["kernels"]  # fp32 weights
        text = http.get("/metrics").text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]\w*="(\\.|[^"\\])*",?)*\})? -?[0-9.e+]+$')
    for line in text.strip().splitlines():
        assert line.startswith(("# HELP ", "# TYPE ")) or sample.match(line), line
    assert re.search(r'parley_requests_total\{method="POST",route="/v1/completions",status="200"\} [1-9]', text)
    assert int(re.search(r"^parley_tokens_generated_total (\d+)", text, re.M).group(1)) > 0
    assert "parley_queue_depth 0" in text and "parley_active_streams" in text


def test_kv_dtype_bfloat16_serves_and_health_says_so(registry, tmp_path):
    """engine.kv_dtype=bfloat16 on an fp32 model (whose cache is else fp32): the server answers, and
    /health names the cache's precision."""
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user")
    settings = Settings(db=db, home=registry.home, model="tiny768",
                        engine=EngineConfig(dtype="float32", kv_dtype="bfloat16"))
    with serving(create_app(settings)) as url:
        reply = Site(url, keys, db).sdk().completions.create(model="tiny768", prompt="Hello", temperature=0,
                                                             max_tokens=3)
        assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens <= 3
        assert httpx.get(url + "/health").json()["kv_dtype"] == "bfloat16"


@pytest.fixture
def gated(registry, tmp_path):
    """A server whose generation pauses after each request's first token until the test says."""
    model, tokenizer, _ = registry.load("tiny768")
    engine = GatedEngine(model, max_batch=1, max_waiting=1)
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user")
    settings = Settings(db=db, home=registry.home, model="tiny768", max_pending=1, requests_per_minute=0,
                        stages=["respond"])
    with serving(create_app(settings, engine=engine, tokenizer=tokenizer)) as url:
        yield Site(url, keys, db), engine
        engine.gate.set()
    engine.close()


def _until(condition, timeout: float = 30) -> bool:
    """Wait for something another thread does (no sleeping for a fixed time)."""
    done = threading.Event()
    for _ in range(int(timeout * 100)):
        if condition():
            return True
        done.wait(0.01)
    return condition()


def _stream(http: httpx.Client, max_tokens: int = 500, model: str = "tiny768"):
    return http.stream("POST", "/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "Hello"}], "stream": True,
        "temperature": 0.8, "seed": 1, "max_tokens": max_tokens})


@pytest.mark.parametrize("model", ["tiny768", "parley"])
def test_a_client_that_goes_away_cancels_its_generation(gated, model):
    site, engine = gated
    with site.http() as http, _stream(http, model=model) as reply:
        assert reply.status_code == 200
        assert next(reply.iter_lines()).startswith("data: ")  # the stream began; the engine is at the gate
    (request,) = engine.requests
    assert _until(lambda: request.cancelled)
    engine.gate.set()
    assert request.wait(timeout=30) == "cancelled"
    assert len(request.tokens) < 500 and _until(lambda: engine.stats()["running"] == 0)


@pytest.fixture
def gated_at_start(registry, tmp_path):
    """A server whose generation holds before its first token until the test says."""
    model, tokenizer, _ = registry.load("tiny768")
    engine = GatedEngine(model, after=0)
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user")
    settings = Settings(db=db, home=registry.home, model="tiny768", requests_per_minute=0, stages=["respond"])
    with serving(create_app(settings, engine=engine, tokenizer=tokenizer)) as url:
        yield Site(url, keys, db), engine
        engine.gate.set()
    engine.close()


def test_a_client_that_goes_away_before_the_first_words_stops_the_turn(gated_at_start):
    """The assistant answers with headers only once it has words (errors before them are plain
    HTTP errors), so a client that leaves earlier (the page's Stop) has no stream to break:
    the server notices it has gone and cancels the generation while it is still held."""
    site, engine = gated_at_start
    host, port = site.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "parley", "messages": [{"role": "user", "content": "Hello"}], "stream": True})
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Authorization: Bearer {site.keys['ann']}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        assert _until(lambda: len(engine.requests) == 1)  # the turn is generating, held before any token
    (request,) = engine.requests  # the client has gone without a byte of answer
    assert _until(lambda: request.cancelled)
    assert not engine.gate.is_set() and request.tokens == []
    engine.gate.set()
    assert request.wait(timeout=30) == "cancelled"


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"model": "tiny768", "messages": [{"role": "user", "content": "Hello"}]}),
    ("/v1/completions", {"model": "tiny768", "prompt": "Hello"})])
def test_a_client_that_leaves_a_whole_reply_stops_its_generation(gated_at_start, route, body):
    """A reply that is not streamed is generated apart from the connection; a client that leaves before it is
    done (a timeout, a closed tab) stops it, instead of the engine writing max_tokens for nobody."""
    site, engine = gated_at_start
    host, port = site.url.removeprefix("http://").split(":")
    body = json.dumps({**body, "max_tokens": 50})
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall((f"POST {route} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Authorization: Bearer {site.keys['ann']}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        assert _until(lambda: len(engine.requests) == 1)  # generating, held before any token
    (request,) = engine.requests
    assert _until(lambda: request.cancelled)
    engine.gate.set()
    assert request.wait(timeout=30) == "cancelled" and request.tokens == []


def test_a_client_that_leaves_the_assistants_whole_reply_after_its_first_words_stops_it(gated, registry):
    """As above for model "parley": only the wait for its first words watched the client, so once they were
    out a whole reply went on generating for nobody."""
    site, engine = gated  # the engine holds after each request's first token
    tokenizer = registry.load("tiny768")[1]
    host, port = site.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "parley", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0.8,
                       "seed": 1, "max_tokens": 50})
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Authorization: Bearer {site.keys['ann']}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        assert _until(lambda: engine.requests and engine.requests[0].tokens)  # the turn read its first token
        # which is words: the turn's first-words wait is over (as in the streamed test above, where they are sent)
        assert tokenizer.decode(engine.requests[0].tokens).strip()
    (request,) = engine.requests
    assert _until(lambda: request.cancelled)
    engine.gate.set()
    assert request.wait(timeout=30) == "cancelled" and len(request.tokens) < 50


def test_users_never_share_cached_prompt_pages(registry, tmp_path):
    """The engine reuses a prompt's cached pages only for the same user (the raw model and the
    assistant alike), so the time to a first token tells no one what another user sent."""
    model, tokenizer, _ = registry.load("tiny768")
    engine = Engine(model, page_size=8)
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user", bob="user")
    settings = Settings(db=db, home=registry.home, model="tiny768", requests_per_minute=0, stages=["respond"],
                        max_tokens=4)
    with serving(create_app(settings, engine=engine, tokenizer=tokenizer)) as url:
        site = Site(url, keys, db)

        def reused(user: str, model_name: str) -> int:
            before = engine.stats()["reused_tokens"]
            reply = site.http(user).post("/v1/chat/completions", json={
                "model": model_name, "messages": [{"role": "user", "content": "Tell me about the sea " * 8}],
                "max_tokens": 4, "temperature": 0})
            assert reply.status_code == 200, reply.text
            return engine.stats()["reused_tokens"] - before

        for model_name in ("tiny768", "parley"):
            assert reused("ann", model_name) == 0
            assert reused("bob", model_name) == 0  # ann's pages hold the same tokens: not for bob
            assert reused("ann", model_name) > 0  # her own are
    engine.close()


def test_a_full_queue_answers_429_with_retry_after_and_cancel_dequeues(gated):
    site, engine = gated
    with site.http() as http, _stream(http) as running:
        assert _until(lambda: engine.stats()["running"] == 1)
        with site.http() as http2, _stream(http2) as waiting:
            assert waiting.status_code == 200 and engine.stats()["waiting"] == 1
            with pytest.raises(openai.RateLimitError) as caught:
                site.sdk().chat.completions.create(model="tiny768", messages=[{"role": "user", "content": "hi"}])
            assert int(caught.value.response.headers["retry-after"]) >= 1
            assert caught.value.body["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):  # the assistant's turns queue for the same engine
                site.sdk().chat.completions.create(model="parley", messages=[{"role": "user", "content": "hi"}],
                                                   stream=True)
        # the client that waited went away: its request left the queue at once, the engine still held
        assert engine.requests[1].wait(timeout=30) == "cancelled" and engine.stats()["waiting"] == 0
        assert running.status_code == 200
    engine.gate.set()


def test_rate_limit_per_key(registry, tmp_path, reference):
    engine, tokenizer, _ = reference
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user", bob="user")
    settings = Settings(db=db, home=registry.home, model="tiny768", requests_per_minute=2)
    with serving(create_app(settings, engine=engine, tokenizer=tokenizer)) as url:
        site = Site(url, keys, db)
        site.sdk("ann").models.list()
        site.sdk("ann").models.list()
        with pytest.raises(openai.RateLimitError) as caught:
            site.sdk("ann").models.list()
        assert int(caught.value.response.headers["retry-after"]) >= 1
        site.sdk("bob").models.list()  # each key has its own bucket


def test_no_auth_only_on_loopback(registry, tmp_path, reference):
    with pytest.raises(ServeError, match="loopback"):
        Settings(db=str(tmp_path / "p.db"), host="0.0.0.0", no_auth=True)
    with pytest.raises(ConfigError, match="loopback"):  # the same check, one line for the command line
        serve_main(["--host", "0.0.0.0", "--no-auth", "--db", str(tmp_path / "p.db")])
    engine, tokenizer, _ = reference
    settings = Settings(db=str(tmp_path / "p.db"), host="::1", no_auth=True)
    with serving(create_app(settings, engine=engine, tokenizer=tokenizer)) as url:
        with httpx.Client(base_url=url) as http:
            assert http.get("/api/conversations").json() == {"data": []}
            assert [u["name"] for u in http.get("/api/users").json()["data"]] == ["local"]


def test_users_command(tmp_path):
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="admin")
    assert keys["ann"].startswith("pk-")
    out = io.StringIO()
    users_main(["--db", db, "list"], out=out)
    assert "\tann\tadmin\t" in out.getvalue()
    with pytest.raises(ValueError, match="already exists"):
        users_main(["--db", db, "add", "ann"], out=out)
    with pytest.raises(ValueError, match="no user named 'zed'"):
        users_main(["--db", db, "key", "zed"], out=out)


def test_smollm2_through_the_server_knows_the_capital_of_france(smollm2_path, tmp_path, embedder):
    registry = Registry(tmp_path / "home")
    registry.import_model(str(smollm2_path), name="smollm2")
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user")
    settings = Settings(db=db, home=registry.home, model="smollm2")
    with serving(create_app(settings, embedder=embedder)) as url:
        reply = Site(url, keys, db).sdk().chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=24)
    assert "Paris" in reply.choices[0].message.content


def test_continuous_batching_serves_concurrent_streams_as_each_alone(registry, reference, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    engine, tokenizer, complete = reference
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user")
    questions = [f"Hello there, how are you {i}?" for i in range(32)]
    expected = [complete(tokenizer.encode_chat([{"role": "user", "content": q}]), 12) for q in questions]
    assert len(set(expected)) > 24  # the answers differ, so a mix-up between streams would show
    settings = Settings(db=db, home=registry.home, model="tiny768", engine=EngineConfig(dtype="float32"),
                        requests_per_minute=0)
    with serving(create_app(settings)) as url:
        sdk = Site(url, keys, db).sdk()

        def ask(question: str) -> str:
            chunks = sdk.chat.completions.create(model="tiny768", messages=[{"role": "user", "content": question}],
                                                 temperature=0, max_tokens=12, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks)

        with ThreadPoolExecutor(len(questions)) as pool:
            assert list(pool.map(ask, questions)) == expected


def test_serve_settings_reach_the_assistant(registry, reference, embedder, tmp_path):
    """`parley serve` takes the assistant's settings by the names `parley chat` uses: the persona
    is in the prompt the served assistant generates from, web search goes to the SearXNG server,
    and self_check makes the output safety stage ask the model to judge the answer."""
    from parley.config import parse_cli
    from parley.serve.settings import Settings as ServeSettings
    from websrv import Reply, serve

    def searxng(req) -> Reply:
        base = "http://" + req.headers["Host"]
        results = [{"title": "Otters", "url": f"{base}/otters", "content": "Sea otters hold hands."}]
        return Reply(200, json.dumps({"query": req.query["q"][0], "results": results}).encode(), "application/json")

    engine, tokenizer, _ = reference
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user")
    routes = {"/search": searxng, "/otters": Reply(200, b"<html><body><p>Sea otters use stones.</p></body></html>")}
    with serve(routes) as searx:
        settings = parse_cli(ServeSettings, [
            "persona=You are Zed, a pirate who answers in rhyme.", f"--web-search-url={searx.base}",
            "--web-allow-private", "self_check=true", "--stages", "nlu,web,respond,safety_out", "--max-tokens", "6",
            f"db={db}", "--home", str(registry.home), "model=tiny768", "engine.dtype=float32"], prog="parley serve")
        recorder = GatedEngine(engine.model)  # keeps the requests it was given
        recorder.gate.set()  # and never holds them
        with serving(create_app(settings, engine=recorder, tokenizer=tokenizer, embedder=embedder)) as url:
            site = Site(url, keys, db)
            reply = site.sdk().chat.completions.with_raw_response.create(
                model="parley", messages=[{"role": "user", "content": "search the web for otters"}], temperature=0)
            conv = int(reply.headers["x-parley-conversation"])
            with site.http() as http:
                turn_id = http.get(f"/api/conversations/{conv}").json()["turns"][-1]["id"]
                trace = {s["stage"]: s for s in http.get(f"/api/turns/{turn_id}/trace").json()["stages"]}
    assert searx.hits["/search"] == 1 and trace["web"]["decision"] == "searched"
    prompt = tokenizer.decode(recorder.requests[0].prompt, skip_special_tokens=False)
    recorder.close()
    assert "You are Zed, a pirate who answers in rhyme." in prompt and "Sea otters" in prompt
    assert reply.parse().choices[0].message.content  # (some questions get an empty answer from this model)
    assert "self_check" in trace["safety_out"]["evidence"]  # the model was asked to judge its answer (the tiny
    # model's context is too small for the judge's prompt: the trace says so, which is enough here)
