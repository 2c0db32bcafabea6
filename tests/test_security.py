"""Issue 15 (hardening): each finding of the attacker's and the operator's report is a test here or
in the module named, and each of these failed on the code the report was written against.

    1. another user's dialogue state      test_a_new_users_conversation_never_shows_another_users_things,
                                          test_what_a_caller_embeds_outside_a_turn_never_meets_the_shared_memory_of_texts;
                                          test_store.py: test_user_ids_are_never_reused,
                                          test_conversation_ids_are_never_reused
    2. memory exhaustion without a key    test_security_body.py (chunked bodies: key first, 413 while streaming)
    3. the page cache and private hosts   test_web.py: test_a_private_fetch_is_never_written_to_the_shared_cache,
                                          test_the_address_rules_are_checked_before_a_cached_page_is_served,
                                          test_a_cache_file_from_before_the_scoped_keys_is_never_served
    4. browsers and a loopback server     test_a_foreign_host_is_refused_before_anything_is_read,
                                          test_a_cross_site_write_is_refused_and_the_api_clients_still_work,
                                          test_every_answer_carries_the_security_headers_and_no_cors,
                                          test_allowed_hosts_and_origins_open_the_server_to_named_pages
    5. 5xx on bad text                    test_security_input.py; test_no_request_the_schema_allows_is_a_5xx
                                          (Schemathesis, below)
    6. one request stalls everyone        test_a_big_embeddings_request_does_not_stall_a_turn,
                                          test_the_embedding_lock_is_handed_over_in_arrival_order,
                                          test_embeddings_over_the_limits_are_a_clear_400
    7. injected orders / fence markup     test_security_fences.py (twelve injected phrasings: fenced as data
                                          for the model, no fence markup for the user, however streamed)
    8. operations                         test_users.py (revoke, delete), test_security_body.py (0600 store,
                                          0700 home, failed-auth limit), test_security_input.py (max_tokens),
                                          test_serve.py (upload source);
                                          test_a_turn_killed_mid_answer_leaves_no_empty_conversation (kill -9)

The servers are real (uvicorn on loopback ports, the tiny model, the real MiniLM, SQLite files).
"""

import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from parley.engine.config import EngineConfig
from parley.serve.app import create_app
from parley.serve.http import HEAD_BYTES, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT, BoundedHttp
from parley.serve.main import users_main
from parley.serve.server import EMBEDDING_MODEL, FairLock
from parley.serve.settings import ServeError, Settings
from parley.store import Store
from serving import serving
from test_serve import Site, _until, embedder, make_users  # noqa: F401 (embedder: a fixture)

STAGES = ["safety_in", "sentiment", "state", "knowledge", "respond", "safety_out"]
SECRETS = ("ann@example.org", "1990-04-01", "X1234567", "ann.txt")  # what ann leaves behind


class Watched:
    """The real MiniLM embedder, with a hook a test can set to act on each call (inside the
    server's embedding lock): a test then knows where a request is, without timing it."""

    def __init__(self, embedder):
        self.embedder, self.tokenizer, self.hook, self.calls = embedder, embedder.tokenizer, None, []

    def __call__(self, texts, **options):
        self.calls.append(list(texts))
        if self.hook is not None:
            self.hook(texts)
        return self.embedder(texts, **options)


@pytest.fixture(scope="module")
def watched(embedder):  # noqa: F811
    return Watched(embedder)


@pytest.fixture(scope="module")
def site(tiny768_registry, watched, tmp_path_factory):
    db = str(tmp_path_factory.mktemp("db") / "parley.db")
    keys = make_users(db, bob="user", ann="user")  # ann last: on the old store her id came back
    settings = Settings(db=db, home=tiny768_registry.home, model="tiny768", engine=EngineConfig(dtype="float32"),
                        stages=STAGES, max_tokens=4, requests_per_minute=0, embedding_batch=2,
                        max_embedding_inputs=40, max_embedding_chars=4000)
    app = create_app(settings, embedder=watched)
    with serving(app) as url:
        site = Site(url, keys, db)
        site.server = app.state.server
        yield site


def ask(http: httpx.Client, text: str, conversation: int | None = None, **headers) -> tuple[int, int, dict]:
    """(conversation id, answer id, body) of one assistant turn."""
    if conversation is not None:
        headers["X-Parley-Conversation"] = str(conversation)
    reply = http.post("/v1/chat/completions", headers=headers,
                      json={"model": "parley", "messages": [{"role": "user", "content": text}], "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return body["parley"]["conversation_id"], body["parley"]["turn_id"], body


# --- finding 1 ------------------------------------------------------------------------------


def test_a_new_users_conversation_never_shows_another_users_things(site, tmp_path):
    """Ann leaves slots, a trace, memory and a document; her conversation and then she herself
    are deleted. Neither bob (whose new conversation comes next) nor carol (the next new user)
    ever sees any of it: slots, traces, memory recall, retrieval, lists; ids are not reused."""
    with site.http("ann") as ann:
        assert ann.post("/api/memory", json={"text": "my email is ann@example.org"}).status_code == 201
        upload = ann.post("/api/knowledge", files={"file": ("ann.txt", b"Ann's passport number is X1234567.")})
        assert upload.status_code == 201, upload.text
        conv, _, _ = ask(ann, "what is my passport number and email?")
        with Store(site.db) as store:
            ann_id = store.get_user_by_name("ann").id
            store.set_slots(ann_id, conv, {"email": "ann@example.org", "birth_date": "1990-04-01"})
        _, answer, _ = ask(ann, "and my birth date?", conv)
        trace = json.dumps(ann.get(f"/api/turns/{answer}/trace").json())
        assert SECRETS[0] in trace and SECRETS[1] in trace  # the paths that could leak do carry her things
        assert ann.delete(f"/api/conversations/{conv}").status_code == 200

    def seen_by(user: str, http: httpx.Client) -> str:
        new, answer, body = ask(http, "what is my email, birth date and passport number?")
        assert new != conv
        again = ask(http, "tell me more", new)[2]
        views = [body, again, http.get(f"/api/turns/{answer}/trace").json(), http.get(f"/api/conversations/{new}").json(),
                 http.get("/api/conversations").json(), http.get("/api/memory").json(),
                 http.get("/api/knowledge").json()]
        assert http.post("/v1/chat/completions", headers={"X-Parley-Conversation": str(conv)}, json={
            "model": "parley", "messages": [{"role": "user", "content": "hi"}]}).status_code == 404
        return json.dumps(views)

    with site.http("bob") as bob:
        seen = seen_by("bob", bob)
    assert not any(s in seen for s in SECRETS), seen

    out = io.StringIO()
    users_main(["--db", site.db, "delete", "ann", "--yes"], out=out)
    keys = make_users(site.db, carol="user")
    with Store(site.db) as store:
        assert store.get_user_by_name("carol").id > ann_id  # never ann's id again
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {keys['carol']}"}, timeout=60) as carol:
        seen = seen_by("carol", carol)
        trace = json.loads(seen)[2]
    assert not any(s in seen for s in SECRETS), seen
    decisions = {s["stage"]: s["decision"] for s in trace["stages"]}
    assert decisions["state"] == "no memory used" and decisions["knowledge"] == "no documents"


def test_what_a_caller_embeds_outside_a_turn_never_meets_the_shared_memory_of_texts(site, watched):
    """The embedder remembers recent texts for all users (a turn embeds its message three times).
    /v1/embeddings, memory facts and uploads neither read it (a planted wrong vector is not
    returned) nor fill it: timing such a request could otherwise tell whether another user had
    sent a given text lately."""
    recent = watched.embedder._recent
    recent["my email is dee@example.org"] = np.zeros(watched.embedder.dim, dtype=np.float32)  # as if cached
    with site.http("bob") as http:
        answer = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL,
                                                   "input": ["my email is dee@example.org", "a probe never seen"]})
        assert http.post("/api/memory", json={"text": "a fact never seen"}).status_code == 201
        assert http.post("/api/knowledge", files={"file": ("f.txt", b"A chunk never seen.")}).status_code == 201
        ask(http, "a message sent in a turn")
    vector = np.array(answer.json()["data"][0]["embedding"])
    assert abs(np.linalg.norm(vector) - 1) < 1e-4  # computed, not the planted zeros
    assert not {"a probe never seen", "a fact never seen", "A chunk never seen."} & recent.keys()
    assert "a message sent in a turn" in recent  # turns still share their message's vector


# --- finding 4 ------------------------------------------------------------------------------


def _host(site: Site) -> str:
    return site.url.removeprefix("http://")


def test_a_foreign_host_is_refused_before_anything_is_read(site):
    """DNS rebinding: evil.example re-pointed at 127.0.0.1 reaches the server with its own name
    as Host. It gets 421 whatever it asks, key or not; the server's own names still work."""
    with site.http("bob") as http:
        for path in ("/api/memory", "/api/conversations", "/v1/models", "/", "/health"):
            refused = http.get(path, headers={"Host": "evil.example"})
            assert refused.status_code == 421, (path, refused.text)
            assert refused.json()["error"]["code"] == "invalid_host"
        port = _host(site).rsplit(":", 1)[1]
        for host in (_host(site), f"localhost:{port}", "localhost", f"[::1]:{port}", f"127.0.0.2:{port}"):
            assert http.get("/api/memory", headers={"Host": host}).status_code == 200, host
        assert http.post("/api/memory", headers={"Host": "evil.example"},
                         json={"text": "planted"}).status_code == 421
        assert "planted" not in http.get("/api/memory").text


def test_a_cross_site_write_is_refused_and_the_api_clients_still_work(site):
    """A write needs this server's own Origin (or none, from a client that is no browser); a
    cross-site form upload plants nothing. Reads are not writes: a GET passes (the browser
    lets no other origin read the answer, as no CORS header is sent)."""
    own = site.url
    with site.http("bob") as http:
        before = len(http.get("/api/knowledge").json()["data"])
        for origin in ("http://evil.example", "null", site.url.replace("127.0.0.1", "localhost"),
                       own.rsplit(":", 1)[0] + ":1", "file://", own.replace("http://", "ftp://")):
            planted = http.post("/api/knowledge", headers={"Origin": origin},
                                files={"file": ("x.txt", b"planted by a cross-site form")})
            assert planted.status_code == 403, (origin, planted.text)
            assert planted.json()["error"]["code"] == "cross_origin"
        assert http.delete("/api/memory/1", headers={"Origin": "http://evil.example"}).status_code == 403
        assert http.post("/api/memory", headers={"Sec-Fetch-Site": "cross-site"},
                         json={"text": "x y z"}).status_code == 403
        assert len(http.get("/api/knowledge").json()["data"]) == before
        assert http.get("/api/knowledge", headers={"Origin": "http://evil.example"}).status_code == 200
        assert http.post("/api/memory", headers={"Origin": own}, json={"text": "tea with milk"}).status_code == 201
        assert http.post("/api/memory", headers={"Sec-Fetch-Site": "same-origin"},
                         json={"text": "coffee black"}).status_code == 201
        assert http.post("/api/memory", json={"text": "no browser here"}).status_code == 201  # an SDK, curl


def test_every_answer_carries_the_security_headers_and_no_cors(site):
    with site.http("bob") as http:
        answers = [http.get("/api/memory"), http.get("/"), http.get("/static/app.js"), http.get("/nowhere"),
                   http.get("/api/memory", headers={"Host": "evil.example"}),
                   http.post("/api/memory", headers={"Origin": "http://evil.example"}, json={"text": "a b"}),
                   http.options("/api/memory", headers={"Origin": "http://evil.example",
                                                        "Access-Control-Request-Method": "POST"})]
    for answer in answers:
        h = answer.headers
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY", answer.request.url
        assert h["referrer-policy"] == "no-referrer" and "frame-ancestors 'none'" in h["content-security-policy"]
        assert "access-control-allow-origin" not in h
    page = answers[1].headers["content-security-policy"]
    assert "script-src 'self'" in page and len(answers[1].headers.get_list("content-security-policy")) == 1
    assert answers[0].headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"


def test_allowed_hosts_and_origins_open_the_server_to_named_pages(tiny768_registry, tmp_path):
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user")
    settings = Settings(db=db, home=tiny768_registry.home, model="tiny768", engine=EngineConfig(dtype="float32"),
                        stages=["respond"], allowed_hosts="parley.lan", allowed_origins="https://tools.example")
    with serving(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60, headers={
            "Authorization": f"Bearer {keys['ann']}"}) as http:
        assert http.get("/v1/models", headers={"Host": "parley.lan:8000"}).status_code == 200
        assert http.get("/v1/models", headers={"Host": "other.lan"}).status_code == 421
        proxied = http.post("/v1/completions", headers={"Host": "parley.lan", "Origin": "https://parley.lan"},
                            json={"model": "tiny768", "prompt": "hi", "max_tokens": 1})
        assert proxied.status_code == 200  # behind a proxy that ends TLS: the page is https, the server http
        preflight = http.options("/v1/chat/completions", headers={
            "Origin": "https://tools.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == "https://tools.example"
        answer = http.post("/v1/completions", headers={"Origin": "https://tools.example"},
                           json={"model": "tiny768", "prompt": "hi", "max_tokens": 1})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://tools.example"
        assert http.post("/v1/completions", headers={"Origin": "https://other.example"},
                         json={"model": "tiny768", "prompt": "hi", "max_tokens": 1}).status_code == 403
    for bad in ({"allowed_origins": "tools.example"}, {"allowed_origins": "*"}, {"allowed_hosts": "a b"}):
        with pytest.raises(ServeError, match="comma-separated"):
            Settings(**bad)


# --- finding 6 ------------------------------------------------------------------------------


def test_a_big_embeddings_request_does_not_stall_a_turn(site, watched):
    """A /v1/embeddings request of 24 inputs (12 batches of 2) runs; a turn sent meanwhile
    embeds between two of its batches and answers while the request is still running. Each
    batch after the first waits, holding the embedding lock, until the turn is done or queued
    on that lock: on a server that held the lock for the whole request, the turn could only
    have run after it."""
    lock, turn_done, started = site.server.embed_lock, threading.Event(), threading.Event()
    bulk = [f"bulk text number {i} about tides" for i in range(24)]
    batches = []

    def hook(texts):
        if not texts[0].startswith("bulk"):
            return
        batches.append(texts)
        started.set()
        assert _until(lambda: turn_done.is_set() or lock.waiting > 0, timeout=60)

    result = {}

    def big():
        with site.http("bob") as http:
            result["answer"] = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": bulk})
            result["turn done first"] = turn_done.is_set()

    watched.hook = hook
    try:
        with site.http("bob") as http:
            http.post("/api/memory", json={"text": "my boat is called Tern"})  # so the turn's recall embeds
            runner = threading.Thread(target=big)
            runner.start()
            assert started.wait(60)
            ask(http, "what is my boat called?")
            assert runner.is_alive() and len(batches) < 12  # the big request is not over
            turn_done.set()
            runner.join(60)
    finally:
        watched.hook = None
    answer = result["answer"]
    assert answer.status_code == 200 and result["turn done first"] and len(batches) == 12
    vectors = np.array([d["embedding"] for d in answer.json()["data"]], dtype=np.float32)
    assert np.allclose(vectors, watched.embedder(bulk), atol=1e-5)  # batching changed nothing


def test_the_embedding_lock_is_handed_over_in_arrival_order():
    """threading.Lock lets a thread that releases take it straight back, ahead of those waiting;
    the embedder's lock hands it to the longest waiter, so a request's next batch queues last."""
    lock, order = FairLock(), []
    lock.__enter__()

    def take(i: int) -> None:
        with lock:
            order.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(5)]
    for i, thread in enumerate(threads):
        thread.start()
        assert _until(lambda: lock.waiting == i + 1)  # queued in this order
    lock.__exit__()
    for thread in threads:
        thread.join(30)
    assert order == [0, 1, 2, 3, 4] and lock.waiting == 0
    with lock:  # free again
        pass


def test_embeddings_over_the_limits_are_a_clear_400(site):
    with site.http("bob") as http:
        many = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": ["word"] * 41})
        long = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": ["x" * 3000, "y" * 1001]})
        fits = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": ["word"] * 40})
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_inputs"
    assert "limit of 40" in many.json()["error"]["message"]
    assert long.status_code == 400 and long.json()["error"]["code"] == "input_too_long"
    assert "4001 characters" in long.json()["error"]["message"]
    assert fits.status_code == 200 and len(fits.json()["data"]) == 40


# --- finding 8 ------------------------------------------------------------------------------

KILLED_SERVER = """
import sys
sys.path.insert(0, sys.argv[4])
import uvicorn
from serving import GatedEngine
from parley.registry import Registry
from parley.serve.app import create_app
from parley.serve.settings import Settings

home, db, port = sys.argv[1:4]
model, tokenizer, _ = Registry(home).load("tiny768")
engine = GatedEngine(model, after=1)  # the answer's first token, then generation waits: killed mid-turn
app = create_app(Settings(db=db, home=home, model="tiny768", stages=["respond"]), engine=engine, tokenizer=tokenizer)
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_turn_killed_mid_answer_leaves_no_empty_conversation(tiny768_registry, tmp_path):
    """`parley serve` in a real process, killed with SIGKILL while a turn that opened a new
    conversation is generating: the next server to start on that database (past the hour a turn in
    another process is given) drops the empty conversation; saved ones stay."""
    db, port = str(tmp_path / "p.db"), _free_port()
    keys = make_users(db, ann="user")
    with Store(db) as store:
        ann = store.get_user_by_name("ann").id
        kept = store.create_conversation(ann, "answered before")
        store.add_exchange(ann, kept.id, "q", "a")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-c", KILLED_SERVER, str(tiny768_registry.home), db, str(port),
                               str(Path(__file__).parent)], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return server.poll() is not None  # died: stop waiting
        assert _until(up, timeout=120) and server.poll() is None, server.stderr.read().decode()[-2000:]

        def chat():
            try:
                httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {keys['ann']}"},
                           json={"model": "parley", "messages": [{"role": "user", "content": "hello"}],
                                 "max_tokens": 50, "stream": True}, timeout=120)
            except httpx.HTTPError:
                pass  # the server died under it: that is the point
        client = threading.Thread(target=chat)
        client.start()

        def opened() -> bool:
            with Store(db) as store:
                return len(store.list_conversations(ann)) == 2
        assert _until(opened, timeout=60)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    client.join(60)
    with Store(db) as store:
        assert len(store.list_conversations(ann)) == 2  # the crash left it behind, empty
    with sqlite3.connect(db) as raw:  # an hour on: past the grace a turn in another process would get
        raw.execute("UPDATE conversations SET created_at = '2000-01-01T00:00:00.000000+00:00' WHERE saved = 0")
    settings = Settings(db=db, home=tiny768_registry.home, model="tiny768", stages=["respond"])
    with serving(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60, headers={
            "Authorization": f"Bearer {keys['ann']}"}) as http:
        assert [c["id"] for c in http.get("/api/conversations").json()["data"]] == [kept.id]


class _QuickHead(BoundedHttp):
    head_seconds = 0.5  # the shipped 20 s, shortened so the test waits half a second for the server to act


def _raw_reply(url: str, data: bytes) -> bytes:
    """What the server sends back on a connection given `data`, until it closes it (at most 10 s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(data)
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
    return reply


def test_a_request_head_that_is_too_big_or_never_ends_is_refused_and_its_connection_closed(tiny768_registry, tmp_path):
    """uvicorn's parser took a header of any size (the process grew by hundreds of megabytes) and waited for a head
    forever (thousands of connections held that way ran the server out of file descriptors)."""
    settings = Settings(db=str(tmp_path / "p.db"), home=tiny768_registry.home, model="tiny768", no_auth=True)
    with serving(create_app(settings), http=_QuickHead) as url:
        # just over the bound, so that the server has read every byte when it answers (had it closed with bytes
        # unread, the kernel would reset the connection and the client might never see the answer)
        huge = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * HEAD_BYTES
        assert _raw_reply(url, huge).startswith(b"HTTP/1.1 431 ")
        assert _raw_reply(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").startswith(b"HTTP/1.1 408 ")
        assert _raw_reply(url, b"").startswith(b"HTTP/1.1 408 ")  # connected, never a byte
        # a whole request on the same server is answered, its body not counted as head
        body = json.dumps({"model": EMBEDDING_MODEL, "input": "x" * (2 * HEAD_BYTES)}).encode()
        ok = _raw_reply(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ")
        posted = _raw_reply(url, b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert posted.split(b"\r\n")[0] in (b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"), posted[:300]


# --- the hostile probe of `parley serve`: connections, bodies Starlette parses, field names ------------------------

HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def _connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    """A connection from `source` (any 127.x.y.z is this machine: a client address of the test's choosing)."""
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))


def _reply_to(url: str, data: bytes, source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """(status, headers, body) of what the server answers `data` from `source`, read until it closes."""
    with _connect(url, source) as conn:
        conn.sendall(data)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _close(conn: socket.socket) -> None:
    """Close a connection once the server has closed its end too: uvicorn forgets a connection before it closes the
    socket, so its place is free when this returns (no waiting for a time)."""
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(65536):
        pass
    conn.close()


def test_one_address_cannot_take_every_connection_and_a_closed_one_frees_its_place(tiny768_registry, tmp_path):
    """The request-head bounds close a connection after 20 s, but a client opening them faster held them all, until
    the server was out of file descriptors and /health failed for everyone. One address now holds at most
    MAX_CONNECTIONS_PER_CLIENT (`parley serve`'s default, and `parley voice`'s, which builds its server from the same
    settings): one more is answered 429 at once, with Retry-After, and closed; other addresses are served; a
    connection that closes frees its place at once."""
    settings = Settings(db=str(tmp_path / "p.db"), home=tiny768_registry.home, model="tiny768", no_auth=True)
    assert (settings.max_connections_per_client, settings.max_connections) == (MAX_CONNECTIONS_PER_CLIENT,
                                                                               MAX_CONNECTIONS)
    with serving(create_app(settings)) as url:  # the shipped BoundedHttp, its default caps
        assert _reply_to(url, HEALTH)[0] == 200  # up (until then the kernel queues connections, 64 at most)
        held = [_connect(url) for _ in range(MAX_CONNECTIONS_PER_CLIENT)]  # idle: not a byte sent
        status, headers, body = _reply_to(url, HEALTH)
        assert status == 429 and headers["retry-after"] == "1" and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["code"] == "too_many_connections" and error["type"] == "rate_limit_error"
        assert f"{MAX_CONNECTIONS_PER_CLIENT} connections" in error["message"]
        assert _reply_to(url, HEALTH, source="127.0.0.2")[0] == 200  # everyone else is still served
        refused = _connect(url)  # answered at once, before it sends a byte; its client keeps it open
        assert refused.recv(65536).startswith(b"HTTP/1.1 429 ")
        for conn in held:
            _close(conn)
        assert _reply_to(url, HEALTH)[0] == 200  # the refused connection, open or not, holds no place
        refused.close()
        with httpx.Client(base_url=url, timeout=10) as http:  # an HTTP client sees the refusal as an answer too
            held = [_connect(url) for _ in range(MAX_CONNECTIONS_PER_CLIENT)]
            refused = http.get("/health")
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_connections"
            _close(held.pop())
            assert http.get("/health").status_code == 200


def test_past_the_servers_own_cap_every_address_gets_503_until_a_connection_closes(tiny768_registry, tmp_path):
    settings = Settings(db=str(tmp_path / "p.db"), home=tiny768_registry.home, model="tiny768", no_auth=True)
    with serving(create_app(settings), http=BoundedHttp.capped(per_client=2, total=3)) as url:
        held = [_connect(url, source) for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3")]
        assert _reply_to(url, HEALTH, source="127.0.0.2")[0] == 429  # its own cap first
        status, headers, body = _reply_to(url, HEALTH, source="127.0.0.4")
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        _close(held.pop())
        assert _reply_to(url, HEALTH, source="127.0.0.4")[0] == 200
    with serving(create_app(settings), http=BoundedHttp.capped(per_client=0, total=0)) as url:  # 0: no cap
        assert _reply_to(url, HEALTH)[0] == 200
        held = [_connect(url) for _ in range(MAX_CONNECTIONS_PER_CLIENT + 1)]
        assert _reply_to(url, HEALTH)[0] == 200
        for conn in held:
            conn.close()


def test_the_connection_caps_are_settings_of_parley_serve():
    from parley.config import parse_cli, usage

    settings = parse_cli(Settings, ["--max-connections-per-client", "300", "max_connections=4000"])
    assert (settings.max_connections_per_client, settings.max_connections) == (300, 4000)
    help_text = usage(Settings, "parley serve")
    assert "max_connections_per_client" in help_text and "reverse proxy" in help_text
    with pytest.raises(ServeError, match="max_connections must be >= 0"):
        Settings(max_connections=-1)


@pytest.fixture(scope="module")
def open_url(tiny768_registry, tmp_path_factory):
    """A server without keys (these requests are refused before a key would matter) and the pipeline's one stage."""
    settings = Settings(db=str(tmp_path_factory.mktemp("db") / "p.db"), home=tiny768_registry.home, model="tiny768",
                        no_auth=True, engine=EngineConfig(dtype="float32"), stages=["respond"], max_tokens=1)
    with serving(create_app(settings)) as url:
        yield url


def _error(answer: httpx.Response) -> dict:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["code"], error  # never null
    return error


def test_bodies_starlette_cannot_parse_are_a_400_that_says_why(open_url):
    """Starlette's and FastAPI's own parse errors came back as `code: null` and 'There was an error parsing the
    body' (or Starlette's bare sentence): a JSON body with bytes that are not UTF-8, one nested 100,000 levels deep (a
    RecursionError inside the parser), malformed multipart forms. Each is a 400 in the envelope of every other 400,
    with a code and what to do; deep JSON is refused before anything parses or validates it."""
    chat, as_json = "/v1/chat/completions", {"Content-Type": "application/json"}
    request = b'{"model": "tiny768", "messages": [{"role": "user", "content": %s}]}'
    with httpx.Client(base_url=open_url, timeout=60) as http:
        assert _error(http.post(chat, json={"model": "tiny768", "messages": []}))["code"] == "invalid_value"

        error = _error(http.post(chat, content=request % b'"caf\xe9 \xff"', headers=as_json))
        assert error["code"] == "invalid_json" and "not UTF-8" in error["message"] and "byte 0xe9 at offset" in \
            error["message"] and "encoded as UTF-8" in error["message"]
        error = _error(http.post(chat, content=request % (b"1" * 5000), headers=as_json))
        assert error["code"] == "invalid_json" and "5000 digits" in error["message"] and "as strings" in error["message"]
        for deep in (b"[" * 100_000, request % (b"[" * 100_000), request % (b"[" * 900 + b"]" * 900),
                     b'{"a": ' * 65 + b"1" + b"}" * 65, b"[" * 1_900_000):
            error = _error(http.post(chat, content=deep, headers=as_json))
            assert error["code"] == "too_deep" and "at most 64" in error["message"], error
        # brackets inside strings are text, however many; 64 levels are taken
        text = "[{" * 40 + '\\"[' * 9
        answer = http.post(chat, json={"model": "tiny768", "messages": [{"role": "user", "content": text}]})
        assert answer.status_code == 200, answer.text
        assert _error(http.post(chat, content=b"[" * 64 + b"]" * 64, headers=as_json))["code"] == \
            "invalid_value"  # parsed and validated: a list where an object belongs

        audio = "/v1/audio/transcriptions"
        forms = {"boundary": (b"a=b", "multipart/form-data"),
                 "Invalid multipart data": (b"not a multipart body", "multipart/form-data; boundary=xx"),
                 '"name" must be provided': (b'--xx\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--xx--\r\n',
                                            "multipart/form-data; boundary=xx")}
        for what, (body, kind) in forms.items():
            error = _error(http.post(audio, content=body, headers={"Content-Type": kind}))
            assert error["code"] == "invalid_form" and what in error["message"] and "curl -F" in error["message"]
        error = _error(http.post(audio, files=[("file", ("a.wav", b"1")), ("file", ("b.wav", b"2"))]))
        assert error["code"] == "invalid_form" and "Too many files" in error["message"]


def test_an_error_in_a_field_of_several_shapes_names_it_as_sent_and_the_shapes_it_takes(open_url):
    """pydantic names the member of a union it tried: the errors said `messages.0.content.str` (and with param
    `messages.0.content.str`), which no client wrote and which did not say that a list of parts would do."""
    one = [{"role": "user", "content": "hi"}]
    cases = [("/v1/chat/completions", {"model": "tiny768", "messages": [{"role": "user", "content": 5}]},
              "messages.0.content", 'must be a string, a list of objects like {"type": "text", "text": ...}, or null'),
             ("/v1/chat/completions", {"model": "tiny768", "messages": [{"role": "user", "content": [{"type": "x"}]}]},
              "messages.0.content", "; messages.0.content.0.type: Input should be 'text'"),
             ("/v1/chat/completions", {"model": "tiny768", "messages": one, "stop": {"a": 1}},
              "stop", "stop must be a string, a list of strings, or null"),
             ("/v1/completions", {"model": "tiny768", "prompt": ["a", 5]},
              "prompt", "prompt must be a string or a list of strings; prompt.1: Input should be a valid string"),
             ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": 5}, "input", "a string or a list of strings")]
    with httpx.Client(base_url=open_url, timeout=60) as http:
        for path, body, param, said in cases:
            error = _error(http.post(path, json=body))
            assert error["param"] == param and said in error["message"], error
            assert ".str" not in error["message"] and "list[" not in error["message"], error
            assert error["code"] == "invalid_value"


def test_the_assistants_message_errors_name_the_message(open_url):
    """model "parley" checks its message in the pipeline (empty, too long, a NUL byte, a prompt past the context):
    those 400s had `param: null`; they name the user message the assistant answers, as sent."""
    def ask(*contents):
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "earlier"},
                    {"role": "assistant", "content": "yes"}] + [{"role": "user", "content": c} for c in contents]
        return http.post("/v1/chat/completions", json={"model": "parley", "messages": messages})

    with httpx.Client(base_url=open_url, timeout=60) as http:
        for contents, field, said in ((("   ",), "messages.3.content", "the message is empty"),
                                      (("a", "x\x00y"), "messages.4.content", "NUL"),
                                      (("x" * 9000,), "messages.3.content", "characters; the limit is"),
                                      (("word " * 1500,), "messages.3.content", "context is 768 tokens")):
            error = _error(ask(*contents))
            assert error["param"] == field and said in error["message"]
        # a raw model's prompt past its context names the field that holds it
        for route, body, field in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1500}]},
                                    "messages"), ("/v1/completions", {"prompt": "word " * 1500}, "prompt")):
            error = _error(http.post(route, json={"model": "tiny768", **body}))
            assert error["param"] == field and "context" in error["message"], error
