"""Hardening (issue 15): request bodies are bounded while they stream and need a key before they are
read, and the files Parley creates for the store are private to their owner.

The server is real (uvicorn on a loopback port) and the client a raw socket, so a test sees how
much of a chunked body the server takes in before it answers: a server that reads it all lets the
client push every byte; one that answers early stops it after the cap plus the kernel's buffers."""

import json
import os
import select
import socket
import stat
from urllib.parse import urlsplit

import pytest

from parley.engine.config import EngineConfig
from parley.registry import Registry, store_target
from parley.serve.app import create_app
from parley.serve.settings import Settings
from parley.store import Store
from serving import serving
from test_serve import make_users

CAP = 100_000  # max_body_bytes of the test server
TOTAL = 200_000_000  # what a client offers to send, at most
CHUNK = 64 * 1024
# the cap, plus what loopback socket buffers hold (a few MB each way), with room to spare; far
# below TOTAL: a server that reads the whole body before answering lets the client send all of it
BOUNDED = 32_000_000


@pytest.fixture(scope="module")
def site(tiny768_registry, tmp_path_factory):
    db = str(tmp_path_factory.mktemp("db") / "parley.db")
    keys = make_users(db, ann="user")
    settings = Settings(db=db, home=tiny768_registry.home, model="tiny768", engine=EngineConfig(dtype="float32"),
                        max_body_bytes=CAP, max_upload_bytes=CAP)
    with serving(create_app(settings)) as url:
        yield url, keys["ann"]


def push_chunked(url: str, path: str, key: str | None, total: int = TOTAL) -> tuple[int, int, dict]:
    """POST a chunked body of up to `total` bytes, stopping as soon as the server answers (or
    closes): (body bytes sent, status, JSON answer). An answer that comes before the body is all
    sent must close the connection, or the server would go on reading the rest."""
    parts = urlsplit(url)
    kind, start = "application/json", b""
    if path == "/api/knowledge":  # a file upload, whose file goes on and on
        kind, start = "multipart/form-data; boundary=b", (b'--b\r\nContent-Disposition: form-data; name="file"; '
                                                         b'filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n')
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {kind}\r\n"
            "Transfer-Encoding: chunked\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n")
    piece = f"{CHUNK:x}\r\n".encode() + b"x" * CHUNK + b"\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head.encode() + (f"{len(start):x}\r\n".encode() + start + b"\r\n" if start else b""))
        sock.setblocking(False)
        sent, pending, pieces = 0, b"", 0
        while pieces < total // CHUNK or pending:  # bounded: each turn sends something or breaks
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable or not writable:
                break  # the server answered (or stopped reading for 10 s)
            if not pending:
                pending, pieces = piece, pieces + 1
            try:
                n = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break
            pending = pending[n:]
            sent += n
        else:
            sock.setblocking(True)
            sock.sendall(b"0\r\n\r\n")  # the whole body went out: end it, for the server's answer
        sock.setblocking(True)
        answer = b""
        for _ in range(1000):  # bounded: until the server closes, or the answer is whole
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
            header, _, body = answer.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in header.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                break
        sock.settimeout(2)
        try:
            closed = sock.recv(1) == b""  # the server closed after its answer: it reads no more
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
    header, _, body = answer.partition(b"\r\n\r\n")
    assert header, f"no answer after sending {sent} bytes"
    assert closed or sent == total // CHUNK * len(piece), "the server answered early but kept the connection open"
    return sent, int(header.split()[1]), json.loads(body)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/knowledge", "/api/memory"])
def test_a_chunked_body_without_a_key_is_refused_before_it_is_read(site, path):
    url, _ = site
    sent, status, body = push_chunked(url, path, key=None)
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    assert sent < BOUNDED, f"the client sent {sent} bytes before the 401: the server read the body"
    sent, status, body = push_chunked(url, path, key="not-a-key")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert sent < BOUNDED


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/knowledge", "/api/memory"])
def test_a_chunked_body_over_the_cap_is_a_413_before_it_ends(site, path):
    url, key = site
    sent, status, body = push_chunked(url, path, key=key)
    assert status == 413, body
    assert body["error"] == {"message": body["error"]["message"], "type": "invalid_request_error",
                             "param": None, "code": "too_large"}
    cap = CAP + 64_000 if path == "/api/knowledge" else CAP  # an upload's form around its file
    assert f"{cap} byte limit" in body["error"]["message"]
    assert cap < sent < BOUNDED, f"the client sent {sent} bytes before the 413"


def test_a_chunked_body_under_the_cap_still_reaches_the_route(site):
    url, key = site
    sent, status, body = push_chunked(url, "/api/memory", key=key, total=CHUNK)
    assert sent == CHUNK + len(f"{CHUNK:x}\r\n\r\n")
    assert status == 400 and body["error"]["code"] == "invalid_json"  # the route parsed it: x... is not JSON


def test_an_answer_before_the_body_ends_closes_the_connection(site):
    """A route that answers without reading the body (no such route here: an unknown path's 404)
    does not let the server go on taking the rest in."""
    url, key = site
    sent, status, body = push_chunked(url, "/nowhere", key=key)
    assert status == 404
    assert sent < BOUNDED


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    """The usual umask, under which files are world-readable unless made otherwise."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_the_store_parley_creates_is_private(tmp_path, monkeypatch, umask_022):
    home = tmp_path / "home" / ".parley"
    monkeypatch.setenv("PARLEY_HOME", str(home))
    db = store_target()
    assert db == str(home / "parley.db")
    assert mode(home) == 0o700 and mode(home.parent) == 0o700  # both made by Parley
    with Store(db) as store:
        store.add_user("ann")
        assert mode(db) == 0o600
        sides = [db + "-wal", db + "-shm"]
        assert all(os.path.exists(side) for side in sides)  # WAL mode: open while a connection is
        assert [mode(side) & 0o077 for side in sides] == [0, 0]


def test_folders_and_files_that_exist_are_left_as_they_are(tmp_path, umask_022):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    db = store_target(str(mine / "chat.db"))
    assert mode(mine) == 0o755
    old = tmp_path / "old.db"
    old.touch(mode=0o640)
    with Store(old) as store:
        store.add_user("ann")
    assert mode(old) == 0o640
    with Store(db):
        assert mode(db) == 0o600


def test_a_registry_home_parley_creates_is_private(tmp_path, tiny768_registry, umask_022):
    model, tokenizer, meta = tiny768_registry.load("tiny")
    home = tmp_path / "models-home"
    Registry(home).save("copy", model, tokenizer, meta)
    assert mode(home) == 0o700 and mode(home / "models") == 0o700


def test_without_auth_a_body_needs_no_key_but_is_still_capped(tiny768_registry, tmp_path):
    settings = Settings(db=str(tmp_path / "parley.db"), home=tiny768_registry.home, model="tiny768",
                        engine=EngineConfig(dtype="float32"), max_body_bytes=CAP, no_auth=True)
    with serving(create_app(settings)) as url:
        sent, status, body = push_chunked(url, "/api/memory", key=None)
        assert status == 413 and body["error"]["code"] == "too_large"
        assert CAP < sent < BOUNDED
        sent, status, body = push_chunked(url, "/api/memory", key=None, total=CHUNK)
        assert status == 400 and body["error"]["code"] == "invalid_json"


def test_failed_authentications_are_limited_per_client_address(tiny768_registry, tmp_path):
    """Past `failed_auth_per_minute` failures an address gets 429 without its key being looked at,
    its good keys too; another address is not affected."""
    import httpx

    from parley.engine.config import EngineConfig
    from parley.serve.app import create_app
    from parley.serve.settings import Settings
    from serving import serving
    from test_serve import make_users

    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user")
    settings = Settings(db=db, home=tiny768_registry.home, model="tiny768", engine=EngineConfig(dtype="float32"),
                        failed_auth_per_minute=3, requests_per_minute=0)
    with serving(create_app(settings)) as url:
        def models(key: str, address: str = "127.0.0.1") -> httpx.Response:
            with httpx.Client(transport=httpx.HTTPTransport(local_address=address)) as http:
                return http.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})

        assert [models("pk-wrong").status_code for _ in range(3)] == [401, 401, 401]
        blocked = models("pk-wrong")
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
        assert "failed authentications" in blocked.json()["error"]["message"]
        assert models(keys["ann"]).status_code == 429  # the address is blocked, whatever it sends
        assert models(keys["ann"], "127.0.0.2").status_code == 200  # another address is not
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.1")) as http:  # bodies too
            chat = http.post(url + "/v1/chat/completions", json={"model": "tiny768", "messages": []},
                             headers={"Authorization": "Bearer pk-wrong"})
        assert chat.status_code == 429
