"""`parley chat --server`: the terminal front end over a real server (uvicorn on a local port, the
tiny model with room for the assistant's prompt, the real MiniLM embedder, a SQLite file)."""

import io
import socket
import subprocess
import sys

import httpx
import pytest

from parley.chat import run
from parley.pipeline.embed import Embedder
from parley.engine.config import EngineConfig
from parley.serve.app import Settings, create_app
from parley.serve.client import ClientError, RemoteAssistant
from parley.store import Store
from serving import serving

STAGES = ["safety_in", "sentiment", "state", "knowledge", "respond", "safety_out"]


@pytest.fixture(scope="module")
def site(tiny768_registry, tmp_path_factory):
    """(url, key) of a server whose user has one document, notes.txt."""
    registry = tiny768_registry
    db = str(tmp_path_factory.mktemp("db") / "parley.db")
    with Store(db) as store:
        key = store.create_api_key(store.add_user("ann").id)
    cfg = Settings(db=db, home=registry.home, model="tiny768", engine=EngineConfig(dtype="float32"), stages=STAGES,
                   max_tokens=8)
    with serving(create_app(cfg, embedder=Embedder.load())) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
            http.post("/api/knowledge", files={"file": ("notes.txt", b"The rent is due on the first of the month.")},
                      ).raise_for_status()
        yield url, key


def chat(assistant, *lines: str) -> str:
    out = io.StringIO()
    run(assistant, io.StringIO("".join(line + "\n" for line in lines)), out)
    return out.getvalue()


def stored(url: str, key: str) -> list[list[dict]]:
    """The user's conversations on the server, oldest first, each as its turns."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        ids = [c["id"] for c in http.get("/api/conversations").json()["data"]]
        return [http.get(f"/api/conversations/{i}").json()["turns"] for i in sorted(ids)]


def test_chat_keeps_the_conversation_shows_traces_and_resets(site):
    url, key = site
    before = len(stored(url, key))
    assistant = RemoteAssistant(url, key=key)
    text = chat(assistant, "/trace", "hello there", "how are you?", "/trace", "/reset", "hi again")
    assistant.close()
    first, second = stored(url, key)[before:]
    assert [t["content"] for t in first if t["role"] == "user"] == ["hello there", "how are you?"]
    assert [t["content"] for t in second if t["role"] == "user"] == ["hi again"]
    answers = [t["content"] for t in first + second if t["role"] == "assistant"]
    assert all(answer.strip() in text for answer in answers)  # what was streamed is what was saved
    assert "(no turn yet)" in text and "(new conversation)" in text
    trace = text.split("(new conversation)")[0]
    assert all(stage in trace for stage in STAGES) and "total" in trace
    assert [s.name for s in assistant.pipeline.stages] == STAGES  # learnt from the trace


def test_memory_sources_and_server_errors_keep_the_session(site):
    url, key = site
    assistant = RemoteAssistant(url + "/v1/", key=key)  # the SDK's base URL works too
    text = chat(assistant, "Remember that my sister is called Ana", "/memory", "/remember I like tea", "/memory",
                "When is the rent due?", "/sources", "x" * 9000, "/forget sister", "/memory")
    assistant.close()
    assert "- your sister is called Ana" in text
    assert "(remembered: I like tea)" in text and "- you like tea" in text
    assert "Sources: [1] notes.txt" in text and "[1] notes.txt, chunk id" in text
    assert "[error: the message has 9000 characters; the limit is 8000" in text and "(HTTP 400" in text
    assert "(forgot: my sister is called Ana)" in text and text.rstrip().endswith("- you like tea")


def test_a_plain_model_gets_the_history_from_the_client(site):
    url, key = site
    assistant = RemoteAssistant(url, key=key, model="tiny768")
    first = "".join(f.text for f in assistant.say("hello"))
    second = "".join(f.text for f in assistant.say("and then?"))
    assert assistant._messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                   {"role": "user", "content": "and then?"}, {"role": "assistant", "content": second}]
    with pytest.raises(ClientError, match="no trace"):
        assistant.last.trace_dict()
    assistant.close()


def test_bad_keys_urls_and_models_are_clear(site):
    url, key = site
    with pytest.raises(ClientError, match=r"invalid API key.*\(HTTP 401"):
        RemoteAssistant(url, key="pk-wrong")
    with pytest.raises(ClientError, match="missing API key"):
        RemoteAssistant(url)
    with pytest.raises(ClientError, match="the model 'nope' does not exist here"):
        RemoteAssistant(url, key=key, model="nope")
    with pytest.raises(ClientError, match="must look like http://HOST:PORT"):
        RemoteAssistant("localhost:8000")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ClientError, match=f"cannot reach the Parley server at {dead}.*parley serve"):
        RemoteAssistant(dead)


def test_the_cli_chats_with_a_server(site):
    url, key = site

    def parley(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "parley.cli", "chat", *args], input="hello there\n/trace\n",
                              capture_output=True, text=True, timeout=120)

    done = parley("--server", url, "--api-key", key)
    assert done.returncode == 0, done.stderr
    assert "respond" in done.stdout and "total" in done.stdout
    wrong = parley(f"server={url}", "api_key=pk-wrong")
    assert wrong.returncode == 2 and "parley: error: invalid API key" in wrong.stderr
    mixed = parley("--server", url, "--api-key", key, "temperature=0")
    assert mixed.returncode == 2 and "drop temperature=0" in mixed.stderr
