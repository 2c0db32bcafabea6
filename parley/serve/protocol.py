"""What goes over the wire: OpenAI's request and response shapes, and Parley's own.

    req = ChatRequest.model_validate({"model": "parley", "messages": [{"role": "user", "content": "hi"}]})
    req.sampling(context=2048, prompt_tokens=12)   # SamplingParams, or ValueError saying what is wrong

Requests are validated here (ranges, types, what Parley does not support, such as n > 1), so
a route only sees sensible values; the error mapper turns a failed validation into a 400.
Unknown fields are ignored, as OpenAI's own server does, so newer SDKs keep working; but an
option OpenAI defines that Parley does not implement (logprobs, tools, `PLAIN`'s) is a 400
naming it, unless its value asks for nothing special (response_format text, best_of 1 ...):
a client relying on it must not get an answer that quietly ignored it. `stop` takes at most 4
strings of at most 256 characters (engine/text.py's MAX_STOP_CHARS): text that could be the
start of one is held back from a stream. Every string of every request must be Unicode that
UTF-8 can encode: JSON's "\\ud800" escape decodes to a lone surrogate, which the tokenizer and
SQLite refuse, so it is a 400 here, naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from parley.engine.sampling import SamplingParams
from parley.engine.text import check_stops

Role = Literal["system", "developer", "user", "assistant", "tool"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="before")  # before: a union's error would hide this one
    @classmethod
    def _encodable(cls, value, info):
        _check_text(value, info.field_name)
        return value


def _check_text(value, where: str) -> None:
    """ValueError if a string in value (a string, or lists and dicts of them) is not valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # the message must not hold the bad character: it could not be sent
            raise ValueError(f"{where} holds a lone surrogate (U+{ord(value[e.start]):04X} at character {e.start}), "
                             "which is not Unicode text; send the text as valid UTF-8") from None
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, f"a key of {where}")
            _check_text(item, f"{where}.{key}")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Role
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Request):
    include_usage: bool = False


MAX_STOPS = 4  # as OpenAI

# Options OpenAI defines that this server does not implement: each accepts the values that ask for
# nothing special (SDKs and tools send some by default), and refuses any other with what is supported.
PLAIN = {
    "suffix": (lambda v: v == "", "leave it out (or send null or \"\"): a completion only follows its prompt"),
    "best_of": (lambda v: v == 1, "it may only be 1, as n: one completion is made per request"),
    "top_logprobs": (lambda v: v == 0, "leave it out (or send 0): log probabilities are not returned"),
    "tool_choice": (lambda v: v in ("none", "auto"), "only 'none' or 'auto', as tools are not supported"),
    "response_format": (lambda v: v.get("type") == "text",
                        "only {'type': 'text'}: JSON mode and JSON schemas are not"),
    "frequency_penalty": (lambda v: v == 0, "leave it out (or send 0): repetition penalties are not applied"),
    "presence_penalty": (lambda v: v == 0, "leave it out (or send 0): repetition penalties are not applied"),
    "logit_bias": (lambda v: not v, "leave it out (or send {}): token biases are not applied"),
    "functions": (lambda v: not v, "leave it out (or send []): function calling is not supported"),
    "function_call": (lambda v: v in ("none", "auto"), "only 'none' or 'auto', as function calling is not supported"),
    "modalities": (lambda v: v == ["text"], "only [\"text\"]: answers are text (speech: /v1/audio/speech)"),
    "audio": (lambda v: False, "leave it out: answers are text (speech: /v1/audio/speech)"),
    "prediction": (lambda v: False, "leave it out (or send null): predicted outputs are not used"),
}


class _Sampling(_Request):
    """The sampling fields chat and text completions share."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None  # at most MAX_STOPS strings of at most MAX_STOP_CHARS characters
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int | None = 1
    echo: bool = False  # /v1/completions: the prompt, then its completion (refused on chat)
    logprobs: bool | int | None = None  # chat's is a bool, /v1/completions' a count: either is refused
    tools: list | None = None
    # true or false asks for nothing while tools are refused (OpenAI's SDKs send a boolean, and only when told to);
    # strict: "yes" or 1 is a 400 naming it, not read as true
    parallel_tool_calls: bool | None = Field(None, strict=True)
    # not implemented: only the values in PLAIN (which ask for nothing special) are accepted
    suffix: str | None = None
    best_of: int | None = None
    top_logprobs: int | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    modalities: list | None = None
    audio: dict | None = None
    prediction: dict | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError(f"only n=1 is supported (got {n}); send separate requests for more choices")
        return n

    @field_validator("temperature", "top_p")
    @classmethod
    def _representable(cls, value: float | None, info) -> float | None:
        # the sampler works in float32: logits divided by so small a temperature overflow, and
        # so small a top_p rounds to 0 and filters out every token. Both mean "the likeliest token".
        if value is None:
            return None
        if info.field_name == "temperature":
            return 0.0 if value < 1e-4 else value
        return max(value, 1e-6)

    @field_validator("logprobs", "tools")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server; leave it out")
        return value

    @field_validator(*PLAIN)
    @classmethod
    def _plain(cls, value, info):
        plain, supported = PLAIN[info.field_name]
        if value is not None and not plain(value):
            raise ValueError(f"{info.field_name} {value!r:.60} is not supported by this server; {supported}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"give at most {MAX_STOPS} stop strings (got {len(stops)})")
        check_stops(stops)
        return stop

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def answer_tokens(self, context: int, prompt_tokens: int | None = None) -> int | None:
        """The longest answer asked for (None: not said); ValueError if it cannot fit in the context
        with the prompt (prompt_tokens None: not known yet, and at least one token)."""
        asked = getattr(self, "max_completion_tokens", None) or self.max_tokens
        if asked is None or asked <= context - (1 if prompt_tokens is None else prompt_tokens):
            return asked
        if prompt_tokens is None:
            raise ValueError(f"this model's context is {context} tokens, so an answer of {asked} leaves no room "
                             f"for the prompt; lower max_tokens (below {context})")
        raise ValueError(f"this model's context is {context} tokens, but {prompt_tokens + asked} were asked "
                         f"for ({prompt_tokens} in the prompt, {asked} for the completion); "
                         "shorten the prompt or lower max_tokens")

    def sampling(self, context: int, prompt_tokens: int, stop_ids: set[int] = frozenset(),
                 default_max: int = 512) -> SamplingParams:
        """The engine's parameters; ValueError if the prompt plus the answer would not fit."""
        room = context - prompt_tokens
        asked = self.answer_tokens(context, prompt_tokens)
        return SamplingParams(max_tokens=max(1, asked or min(default_max, room)),
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, stop_ids=frozenset(stop_ids),
                              seed=self.seed)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported on /v1/chat/completions; leave it out (on /v1/completions "
                             "it sends the prompt back before its completion)")
        return echo


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("give one prompt (a string, or a list of one string)")
        return prompt

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"

    @field_validator("input")
    @classmethod
    def _texts(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > 2048 or any(not t.strip() for t in texts):
            raise ValueError("give 1 to 2048 non-empty strings")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class MemoryRequest(_Request):
    text: str = Field(min_length=1, max_length=500)


class FeedbackRequest(_Request):
    rating: Literal[1, -1]
    edited_text: str | None = Field(None, min_length=1, max_length=100_000)


class RenameRequest(_Request):
    title: str = Field(min_length=1, max_length=200, pattern=r"\S")


class WithdrawRequest(_Request):
    """Before a question is sent again: "regenerate" an answer (kept as a rejected alternative)
    or "edit" (a question, or an answer's question). The exchange and all after it leave the
    conversation's history."""

    reason: Literal["regenerate", "edit"]


# --- responses ---------------------------------------------------------------------------------


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_completion(rid: str, model: str, text: str, finish: str | None, prompt: int, completion: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage(prompt, completion)}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def text_completion(rid: str, model: str, text: str, finish: str | None, counts: dict | None = None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
    if counts is not None:
        out["usage"] = counts
    return out


def usage_chunk(rid: str, model: str, obj: str, counts: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": counts}


def model_card(name: str, created: int = 0, **extra) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "parley", **extra}
