"""Respond: build the prompt from what the turn found, and stream the answer.

    backend = LocalBackend(engine, tokenizer, SamplingParams(max_tokens=256, temperature=0))
    # or OpenAIBackend("http://127.0.0.1:8000/v1", model="smollm2")  (vLLM, llama.cpp, another Parley)
    stage = RespondStage(backend, persona="You are Parley ...", principles=constitution.summary)

The prompt is: a system message (persona, the constitution's summary, a tone instruction
from the sentiment, the user's relevant memory facts), the conversation history that fits
the model's context (older exchanges summarised in one line, see state.fit_history), and
the user's message. Retrieved or fetched text goes in front of the question inside fences
(untrusted.fence), numbered for citation as [n]; sentences in it that address the assistant
("ignore previous instructions ...") are replaced by a visible marker before the model
sees them, and the trace says which. Text from documents and web pages is data: the model
is told so, and it never gets the chance to read an injected order.

Passages come best first; those that do not fit the context are dropped weakest first. As the
answer streams, a sentence that cites nothing gets [n] before its full stop where passage n supports it
(grounding.Citer; `cite=False` leaves the model's text as written). After the answer, each
citation [n] is checked against passage n and the verdict goes into the trace, with the
citations added and the sentences no passage supports;
a question for the user's documents that found nothing gets a fixed answer saying so
(pipeline/grounding.py).

Backends implement one small interface (`Backend`): count tokens of a message list, say the
context length, stream the answer's text for a message list. A backend is built once and
shared by every turn (and thread): what differs per turn comes as arguments of `stream`, the
turn's sampling overrides, its cancellation and where to count its tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Protocol

import httpx

from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.engine.text import TextAssembler
from parley.model.tokenizer import Tokenizer
from parley.pipeline.frames import (EndOfAnswer, Frame, MemoryRecall, Notice, Passages, Sentiment, TextDelta,
                                    UserText)
from parley.pipeline.grounding import NOTHING_FOUND, Citer, check_citations, fit_passages
from parley.pipeline.markup import FenceFilter
from parley.pipeline.runner import Cancel, Stage, Turn, Usage
from parley.pipeline.state import fit_history

BLANK_LIMIT = 32  # characters of whitespace before any text after which an answer counts as empty
PERSONA = ("You are Parley, a helpful, honest and friendly assistant. Answer clearly and briefly. "
           "You are an AI, not a person.")


class BackendError(RuntimeError):
    """The generator could not answer (server unreachable, bad reply)."""


class Backend(Protocol):
    context_length: int
    answer_room: int  # tokens kept free for the answer

    def count_tokens(self, messages: list[dict[str, str]]) -> int: ...

    def stream(self, messages: list[dict[str, str]], overrides: dict | None = None, cancel: Cancel | None = None,
               usage: Usage | None = None) -> Iterator[str]: ...


def _sampling(params: SamplingParams, overrides: dict | None) -> SamplingParams:
    try:
        return dataclasses.replace(params, **overrides) if overrides else params
    except TypeError:
        known = ", ".join(f.name for f in dataclasses.fields(params))
        raise ValueError(f"unknown sampling setting in {sorted(overrides)}; known: {known}") from None


class LocalBackend:
    """Generation with Parley's own engine, in this process."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, params: SamplingParams):
        self.engine, self.tokenizer = engine, tokenizer
        # answers end at the model's end-of-turn tokens as well as any the caller gave
        self.params = dataclasses.replace(params, stop_ids=params.stop_ids | tokenizer.stop_ids)
        self.context_length = engine.context_length
        self.answer_room = min(params.max_tokens, engine.context_length // 4)

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.tokenizer.encode_chat(messages, add_generation_prompt=True))

    def stream(self, messages: list[dict[str, str]], overrides: dict | None = None, cancel: Cancel | None = None,
               usage: Usage | None = None) -> Iterator[str]:
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        text = TextAssembler(self.tokenizer)
        request = self.engine.submit(ids, _sampling(self.params, overrides))  # PromptError, QueueFull
        if cancel is not None:  # the server's thread cancels it at once when the client goes away
            cancel.on_set(request.cancel)
        if usage is not None:
            usage.prompt_tokens += len(ids)
        try:
            for event in request:  # steps the engine here unless it runs on its own thread
                if usage is not None and event.token is not None:
                    usage.completion_tokens += 1
                if piece := text.push(event):
                    yield piece
                if text.finish_reason or (cancel is not None and cancel.is_set()):
                    break
            if usage is not None:
                usage.finish_reason = text.finish_reason
        finally:
            request.cancel()  # a consumer that stops early frees the request's pages


class OpenAIBackend:
    """Any server speaking OpenAI's /v1/chat/completions with streaming (SSE): vLLM serving
    an exported Parley checkpoint, llama.cpp's server, or another Parley."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, params: SamplingParams | None = None,
                 context_length: int = 8192, timeout: float = 60.0):
        if not re.match(r"^https?://", base_url):
            raise ValueError(f"backend URL must start with http:// or https://, got {base_url!r}")
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.params = params or SamplingParams(max_tokens=512)
        self.context_length, self.timeout = context_length, timeout
        self.answer_room = min(self.params.max_tokens, context_length // 4)

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        # the remote tokenizer is unknown: ~4 characters per token, plus a few per message
        return sum(len(m["content"]) // 4 + 4 for m in messages)

    def stream(self, messages: list[dict[str, str]], overrides: dict | None = None, cancel: Cancel | None = None,
               usage: Usage | None = None) -> Iterator[str]:
        """The answer's text as the server streams it (token counts are not reported: `usage` stays)."""
        p = _sampling(self.params, overrides)
        body = {"model": self.model, "messages": messages, "stream": True, "max_tokens": p.max_tokens,
                "temperature": p.temperature, "top_p": p.top_p}
        if p.seed is not None:
            body["seed"] = p.seed
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        url = f"{self.base_url}/chat/completions"
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=self.timeout) as reply:
                if reply.status_code != 200:
                    reply.read()
                    raise BackendError(f"{url} answered HTTP {reply.status_code}: {reply.text[:300]}")
                for line in reply.iter_lines():
                    if cancel is not None and cancel.is_set():
                        return  # leaving the block closes the connection, which stops the server
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        delta = json.loads(data)["choices"][0].get("delta", {}).get("content")
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
                        raise BackendError(f"{url} sent a stream event that is not a chat completion chunk: "
                                           f"{data[:200]}") from None
                    if delta:
                        yield delta
        except httpx.HTTPError as e:
            raise BackendError(f"cannot reach the generation server at {url}: {e}") from None


def redact_instructions(text: str, guard=None) -> tuple[str, list[str]]:
    """Replace sentences that give the assistant orders with a marker; return them too
    (untrusted.redact_orders: the rules, and the guard model where given)."""
    from parley.pipeline.untrusted import redact_orders

    cleaned, removed = redact_orders(text, guard)
    return cleaned, [r["sentence"] for r in removed]


def build_messages(turn: Turn, backend: Backend, persona: str = PERSONA, principles: str = "",
                   text: str | None = None, guard=None) -> tuple[list[dict[str, str]], dict]:
    """The messages for this turn, and what went into them (for the trace)."""
    from parley.pipeline.sentiment import tone_instruction
    from parley.pipeline.untrusted import DATA_NOT_INSTRUCTIONS, redact_orders

    evidence: dict = {}
    system = [persona]
    if principles:
        system.append(principles)
    sentiment = turn.get(Sentiment)
    if sentiment is not None and (tone := tone_instruction(sentiment.label)):
        system.append(tone)
        evidence["tone"] = sentiment.label
    memory = turn.get(MemoryRecall)
    if memory is not None and memory.facts:
        system.append("What you know about the user: " + "; ".join(memory.facts) + ".")
        evidence["memory"] = list(memory.facts)

    asked = text if text is not None else (turn.get(UserText) or UserText("")).text
    question, passages = asked, turn.sources()
    limit = backend.context_length - backend.answer_room
    if passages:
        cleaned, removed, why = [], {}, {}
        for p in passages:
            body, gone = redact_orders(p.text, guard)
            if gone:
                removed[p.n] = [g["sentence"] for g in gone]
                why[p.n] = gone
            cleaned.append(dataclasses.replace(p, text=body))
        # best first; the weakest give way while the prompt would not fit even with the persona alone
        # as its system message (below, the system message shrinks before any passage goes)
        cleaned, dropped = fit_passages(cleaned, lambda ps: backend.count_tokens(
            [{"role": "system", "content": persona}, {"role": "user", "content": _with_sources(asked, ps)}]
        ) <= limit)
        if cleaned:
            system.append(DATA_NOT_INSTRUCTIONS)
            system.append("Answer from the sources when they help, and cite them as [1], [2].")
            question = _with_sources(asked, cleaned)
        evidence["passages"] = [f"[{p.n}] {p.source}, {p.location}" for p in cleaned]
        if dropped:
            evidence["passages_dropped"] = sorted(p.n for p in dropped)  # not in the prompt: the context is full
        if removed:
            evidence["injection_removed"] = removed
            evidence["injection_why"] = why  # per sentence: the rule signals and/or the guard's probability
    system_message = {"role": "system", "content": "\n".join(system)}
    user_message = {"role": "user", "content": question}

    if backend.count_tokens([system_message, user_message]) > limit:
        # a small context (a tiny trained model): the persona alone, then no system message at all
        system_message["content"] = persona
        evidence["system_prompt"] = "persona only: the model's context is too small for the rest"
        if backend.count_tokens([system_message, user_message]) > limit:
            system_message["content"] = ""
            evidence["system_prompt"] = "dropped: the model's context is too small for it"
    budget = limit - backend.count_tokens([system_message, user_message])
    history, summary = fit_history(turn.history, backend.count_tokens, max(budget, 0))
    if summary:
        with_summary = {"role": "system", "content": system_message["content"] + "\n" + summary}
        # the summary takes room too: older messages give way to it, and it gives way last of all
        while history and backend.count_tokens([with_summary, *history, user_message]) > limit:
            history = history[2:] if len(history) >= 2 else []
        if backend.count_tokens([with_summary, *history, user_message]) <= limit:
            system_message = with_summary
            evidence["history_summarised"] = True
    evidence["history_messages"] = len(history)
    head = [system_message] if system_message["content"] else []
    return [*head, *history, user_message], evidence


def _with_sources(question: str, passages: list) -> str:
    """The user's message: the fenced passages, then the question (a fetched page's URL in the
    question becomes "the page [n]": the model reads [n], not the URL)."""
    from parley.pipeline.untrusted import fence

    for p in passages:
        if p.location == "page" and p.source in question:
            question = question.replace(p.source, f"the page [{p.n}]")
    return fence(passages) + "\n\nQuestion: " + question


def _unfenced(pieces: Iterator[str]) -> Iterator[str]:
    """The model's pieces as the user may see them: passage fence tags removed, even when a tag
    is split across pieces (pipeline/markup.py)."""
    unfence = FenceFilter()
    for piece in pieces:
        if shown := unfence.push(piece):
            yield shown
    if shown := unfence.flush():
        yield shown


def _cited(pieces: Iterator[str], citer: Citer | None) -> Iterator[str]:
    """The pieces with citations added to the sentences that lack one (grounding.Citer)."""
    if citer is None:
        yield from pieces
        return
    for piece in pieces:
        if shown := citer.push(piece):
            yield shown
    if tail := citer.flush():
        yield tail


class RespondStage(Stage):
    name = "respond"

    def __init__(self, backend: Backend, persona: str = PERSONA, principles: str = "", guard=None, cite: bool = True):
        self.backend, self.persona, self.principles = backend, persona, principles
        self.cite = cite  # add [n] to the sentences a passage supports when the model wrote none
        self.guard = guard  # parley.pipeline.guard.Guard: takes injected orders out of passages beside the rules

    def process(self, frame: Frame, turn: Turn) -> Iterator[Frame]:
        yield frame
        if not isinstance(frame, UserText):
            return
        if not turn.sources() and any(f.origin == "knowledge" and not f.items for f in turn.all(Passages)):
            # the question asked for the user's documents and nothing relevant was found (nor fetched
            # from the web): say so in a fixed sentence rather than let the model answer from nothing
            turn.note(self.name, "nothing found: fixed answer", grounding="nothing found")
            yield TextDelta(NOTHING_FOUND)
            yield EndOfAnswer()
            return
        messages, evidence = build_messages(turn, self.backend, self.persona, self.principles, frame.text,
                                          self.guard)
        turn.note(self.name, "generating", **evidence)
        dropped = set(evidence.get("passages_dropped", ()))
        given = [p for p in turn.sources() if p.n not in dropped]
        citer = Citer(given) if self.cite and given else None
        text, visible = "", False
        with contextlib.closing(self.backend.stream(messages, turn.overrides, turn.cancel, turn.usage)) as stream:
            for piece in _cited(_unfenced(stream), citer):  # the prompt's passage tags never reach the user
                text += piece
                if visible:
                    turn.drafted(piece)
                    yield TextDelta(piece)
                elif text.strip():  # the answer's first visible text; the blank before it is not shown
                    visible = True
                    turn.drafted(text.lstrip())
                    yield TextDelta(text.lstrip())
                elif len(text) >= BLANK_LIMIT:  # a model that emits only whitespace: stop it now
                    break
        grounding = check_citations(text, given)
        if citer is not None:
            grounding.update(citations_added=citer.added, unsupported_sentences=citer.unsupported)
        turn.note(self.name, "answered" if text.strip() else "empty answer", chars=len(text), **grounding)
        yield EndOfAnswer()
        if not text.strip():  # say so, rather than show nothing
            yield Notice("(the model gave an empty answer; try rephrasing, or a higher temperature)")
