"""A Parley server as the assistant: what `parley chat --server URL` talks to.

    assistant = RemoteAssistant("http://127.0.0.1:8000", key="pk-...")
    for frame in assistant.say("hello"):     # TextDelta frames, streamed as the server sends them
        print(frame.text, end="")
    assistant.last.trace_dict()              # GET /api/turns/{id}/trace
    assistant.new_conversation()             # the next turn opens a new conversation
    parley.chat.run(assistant)               # the terminal front end, unchanged

It has the surface `parley.chat` uses of a local `parley.chat.Session`: `say`, `last` (`trace_dict`,
`sources`), `memory` (`all`, `forget`; `remember` has no route), `new_conversation`,
`pipeline.stages`, `user_id`, `close`. Each turn is one streamed POST /v1/chat/completions
with model "parley"; the server keeps the history, and the X-Parley-Conversation header it
answers with names the conversation the next turn continues. The server folds notices and
refusals into the answer's text, so every frame is a `TextDelta`. Another model answers
directly, with the history kept here. The user is whoever the key belongs to.

Failures are `ClientError`s (ValueErrors) with the server's own message for an OpenAI-shaped
error, or one naming the URL when the server cannot be reached.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from parley.pipeline.assistant import DEFAULT_STAGES
from parley.pipeline.frames import Frame, Passage, TextDelta
from parley.pipeline.state import Fact

ASSISTANT = "parley"


class ClientError(ValueError):
    """The server said no, or could not be reached."""


@dataclass(frozen=True)
class StageName:
    name: str


class RemotePipeline:
    """The stage names, as the last trace shows them (the defaults until there is one)."""

    def __init__(self):
        self.stages = tuple(StageName(n) for n in DEFAULT_STAGES)


class RemoteTurn:
    """The last turn: its trace fetched once, when first asked for."""

    def __init__(self, client: RemoteAssistant, turn_id: int | None):
        self.client, self.turn_id, self._trace = client, turn_id, None

    def trace_dict(self) -> dict:
        if self.turn_id is None:
            raise ClientError("the server saved no answer, so no trace, for the last turn")
        if self._trace is None:
            self._trace = self.client.request("GET", f"/api/turns/{self.turn_id}/trace")
            self.client.pipeline.stages = tuple(StageName(s["stage"]) for s in self._trace["stages"])
        return self._trace

    def sources(self) -> list[Passage]:
        """The documents and pages the answer drew on, numbered as the model saw them. The trace
        names them, without their text."""
        if self.turn_id is None:
            return []
        found = []
        for stage in self.trace_dict()["stages"]:
            evidence = stage["evidence"]
            if stage["stage"] == "knowledge" and stage["decision"].startswith("retrieved"):
                floor = evidence.get("min_similarity", 0)
                found += [Passage(0, c["document"], f"chunk id {c['chunk_id']}", "")
                          for c in evidence.get("candidates", []) if c.get("cosine", 0) >= floor]
            elif stage["stage"] == "web" and stage["decision"] == "fetched":
                found.append(Passage(0, evidence["url"], "page", ""))
            elif stage["stage"] == "web" and stage["decision"] == "searched":
                found += [Passage(0, p["url"], "page", "") for p in evidence.get("pages", []) if "error" not in p]
        return [Passage(n, p.source, p.location, p.text) for n, p in enumerate(found, 1)]


class RemoteMemory:
    """The caller's long-term memory on the server (the user id is the key's, so it is ignored)."""

    def __init__(self, client: RemoteAssistant):
        self.client = client

    def all(self, user_id=None) -> list[Fact]:
        return [Fact(f["id"], f["text"]) for f in self.client.request("GET", "/api/memory")["data"]]

    def remember(self, user_id, text: str) -> Fact:
        fact = self.client.request("POST", "/api/memory", json={"text": text})
        return Fact(fact["id"], fact["text"])

    def forget(self, user_id, what: str) -> list[Fact]:
        """Delete the facts that contain `what` (all of them for "everything"). The server's
        memory search by meaning is not exposed, so this matches words only."""
        what = what.strip().rstrip(".?!").lower()
        if not what:
            raise ClientError("say what to forget, e.g. /forget sister (or /forget everything)")
        gone = [f for f in self.all() if what == "everything" or what in f.text.lower()]
        for fact in gone:
            self.client.request("DELETE", f"/api/memory/{fact.id}")
        return gone


class RemoteAssistant:
    def __init__(self, url: str, key: str | None = None, model: str = ASSISTANT, timeout: float = 300):
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ClientError(f"the server URL must look like http://HOST:PORT, not {url!r}")
        self.url = url.strip().rstrip("/").removesuffix("/v1")  # the base URL, or the SDK's .../v1
        self.model, self.user_id = model, None  # the server knows the user from the key
        self.conversation_id: int | None = None
        self.last: RemoteTurn | None = None
        self.memory, self.pipeline, self._messages = RemoteMemory(self), RemotePipeline(), []
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        try:
            self.request("GET", f"/v1/models/{model}")  # reachable, the key is good, the model is served
        except ClientError:
            self.http.close()
            raise

    def close(self) -> None:
        self.http.close()

    def new_conversation(self) -> None:
        self.conversation_id, self._messages = None, []

    def request(self, method: str, path: str, **kwargs) -> dict:
        """One JSON request; a ClientError saying what went wrong if it failed."""
        with _reaching(self.url):
            response = self.http.request(method, path, **kwargs)
        _raise_for_error(response)
        return response.json()

    def say(self, text: str) -> Iterator[Frame]:
        """One turn: the answer's text as it streams in. Closing the iterator early (Ctrl-C)
        closes the connection, which stops the server's generation."""
        headers = {"X-Parley-Conversation": str(self.conversation_id)} if self.conversation_id else {}
        messages = [{"role": "user", "content": text}]
        if self.model != ASSISTANT:  # a plain model keeps no conversation: send it the history
            messages = self._messages + messages
        body = {"model": self.model, "messages": messages, "stream": True}
        answer, ids = [], {}
        with _reaching(self.url), self.http.stream("POST", "/v1/chat/completions", json=body,
                                                  headers=headers) as response:
            if response.status_code != 200:
                response.read()
                _raise_for_error(response)
            if response.headers.get("X-Parley-Conversation", "").isdigit():
                self.conversation_id = int(response.headers["X-Parley-Conversation"])
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise ClientError(chunk["error"].get("message") or "the server failed mid-answer")
                ids = chunk.get("parley") or ids
                for choice in chunk.get("choices", []):
                    if piece := choice.get("delta", {}).get("content"):
                        answer.append(piece)
                        yield TextDelta(piece)
        if self.model != ASSISTANT:
            self._messages = messages + [{"role": "assistant", "content": "".join(answer)}]
        self.last = RemoteTurn(self, ids.get("turn_id"))


@contextmanager
def _reaching(url: str) -> Iterator[None]:
    """Network failures as ClientErrors that name the server."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise ClientError(f"the Parley server at {url} did not answer in time ({e})") from e
    except httpx.TransportError as e:
        raise ClientError(f"cannot reach the Parley server at {url} ({e or type(e).__name__}); "
                          "is `parley serve` running there?") from e


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300] or response.reason_phrase
    raise ClientError(f"{message} (HTTP {response.status_code} from {response.request.url})")
