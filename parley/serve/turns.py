"""The assistant ("model": "parley") behind the API: blocking pipeline turns bridged to async.

    turns = TurnRunner(AssistantConfig(stages=...), server.store, engine, tokenizer, embed)
    turn = turns.start(user, conversation_id=None, text="hello", overrides={"temperature": 0})
    async for item in turn.frames():         # TurnStarted, then TextDelta / Notice / Refusal ...
        ...                                  # frames, then TurnDone (saved message id, token counts)
    turn.stop()                              # the client went away: generation stops at once
    turn.interrupt("barge-in")               # the user spoke over the answer: it stops at once,
                                             # is saved marked [interrupted], with barge-in feedback

Each turn runs on a small pool of threads. They share one `Assistant`, built on the first turn
and never changed after: everything a turn owns (this thread's store connection, the user,
the conversation, the request's sampling overrides, its cancellation and token counts) is in
its pipeline `Turn`. The respond stage submits to the server's one engine, so pipeline turns
and raw completions share one queue. A turn's frames reach the route's event loop through a
`Channel` (engine/channel.py), the bridge the engine's requests use too.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from parley.engine.channel import Channel
from parley.engine.engine import Engine, QueueFull
from parley.learn.personal import adapter_for
from parley.model.tokenizer import Tokenizer
from parley.pipeline.assistant import Assistant, AssistantConfig
from parley.pipeline.runner import Cancel, Tentative, Turn
from parley.store import Store, User

_END = object()  # a turn's last item


@dataclass
class TurnDone:
    """The last item of a turn's frames: where it was saved and what it cost."""

    conversation_id: int | None
    message_id: int | None  # the saved answer (the API calls it the turn id)
    prompt_tokens: int
    completion_tokens: int
    answered_by: str | None = None  # the model (and version) the answer was saved with
    adapter: bool = False  # the user's own adapter answered
    finish_reason: str = "stop"  # "length" where the answer was cut at max_tokens


@dataclass
class TurnStarted:
    """The first item of a turn's frames: the conversation it belongs to (new or given)."""

    conversation_id: int


@dataclass
class RunningTurn:
    channel: Channel = field(default_factory=Channel)  # from the turn's thread to the route
    cancel: Cancel = field(default_factory=Cancel)  # the pipeline turn's own
    interrupted: str | None = None  # why `interrupt` stopped it ("barge-in"), None for `stop`
    tentative: Tentative | None = None  # started on a guess (TurnRunner.start): `keep` or `drop` decides

    async def frames(self) -> AsyncIterator:
        """TurnStarted, the pipeline's frames, TurnDone; the turn's exception if it failed."""
        while (item := await self.channel.aget()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        """Stop the turn: its generation at once (queued or running), the pipeline at its next frame."""
        self.cancel.set()

    def keep(self) -> None:
        """A turn started tentative is wanted after all: its writes go ahead."""
        if self.tentative is not None:
            self.tentative.keep()

    def drop(self) -> None:
        """A turn started tentative is not wanted: stopped as `stop` does, and nothing of it is saved."""
        if self.tentative is not None:
            self.tentative.drop()
        self.cancel.set()

    def interrupt(self, reason: str = "barge-in") -> None:
        """Stop the turn as `stop` does (the engine's request is cancelled now, so at most the step
        under way finishes), but let the pipeline end it: the answer so far is saved marked
        interrupted, and a "barge-in" is recorded as -1 feedback of that kind on it."""
        self.interrupted = reason
        self.cancel.set()


def user_salt(user: User) -> str:
    """The engine's cache salt for a user's requests (engine/sampling.py): user ids are never
    reused (store migration 4), so a deleted user's cached pages can serve no one else."""
    return f"user-{user.id}"


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)  # the pipeline's own torch work (NLU head, MiniLM) stays off OpenMP teams


class TurnRunner:
    def __init__(self, cfg: AssistantConfig, store: Callable[[], Store], engine: Engine, tokenizer: Tokenizer,
                 embed, workers: int = 4, max_pending: int = 32, single_threaded: bool = False, registry=None):
        self.cfg, self.store, self.registry = cfg, store, registry
        self.workers, self.max_pending, self._inflight, self._count = workers, max_pending, 0, threading.Lock()
        self.engine, self.tokenizer, self.embed = engine, tokenizer, embed
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="parley-turn",
                                       initializer=_one_torch_thread if single_threaded else None)
        self._assistant: Assistant | None = None
        self._building = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def assistant(self) -> Assistant:
        """The one assistant every turn shares, built on first use (the NLU model loads then)."""
        with self._building:
            if self._assistant is None:
                self._assistant = Assistant.build(self.cfg, engine=self.engine, tokenizer=self.tokenizer,
                                                  embedder=self.embed, registry=self.registry)
            return self._assistant

    def start(self, user: User, conversation_id: int | None, text: str, overrides: dict,
              tentative: bool = False, draft: Callable[[str], None] | None = None) -> RunningTurn:
        """Queue a turn; QueueFull when `max_pending` turns already wait for a thread. A `tentative`
        turn (started on a guess of what the user said) generates at once but writes nothing until
        `RunningTurn.keep`; `RunningTurn.drop` stops it unsaved. `draft` is given each piece of the
        answer as the model writes it, before the stages after respond have checked it (Turn.draft)."""
        with self._count:
            if self._inflight >= self.workers + self.max_pending:
                raise QueueFull(self._inflight - self.workers, retry_after=1.0)
            self._inflight += 1
        running = RunningTurn(tentative=Tentative() if tentative else None)
        self.pool.submit(self._run, running, user, conversation_id, text, dict(overrides), draft)
        return running

    def _run(self, running: RunningTurn, user: User, conversation_id: int | None, text: str, overrides: dict,
             draft: Callable[[str], None] | None = None) -> None:
        try:
            if running.cancel.is_set():  # the client left while the turn waited for a thread
                return
            store = self.store()
            overrides = {**overrides, "cache_salt": user_salt(user)}  # cached prompt pages: this user's alone
            adapter = adapter_for(self.engine, store, user.id)
            if adapter:  # their own adapter (parley learn user=NAME), unless they opted out
                overrides["adapter"] = adapter
            turn = Turn(user.id, conversation_id, store=store, overrides=overrides, cancel=running.cancel,
                        tentative=running.tentative, draft=draft)
            # registered before respond registers its request's cancel, so it runs first: the
            # pipeline then ends the turn with an Interrupt frame, which the saved answer shows
            running.cancel.on_set(lambda: running.interrupted and turn.interrupt(running.interrupted))
            frames = self.assistant().say(turn, text)
            try:
                for i, frame in enumerate(frames):
                    if running.cancel.is_set() and not running.interrupted:
                        break
                    if i == 0:  # say() has opened the conversation by now
                        running.channel.put(TurnStarted(turn.conversation_id))
                    running.channel.put(frame)
            finally:
                frames.close()  # closes the respond stage's stream, which cancels its generation
            if running.interrupted == "barge-in" and turn.message_id is not None:
                turn.store.add_feedback(user.id, turn.message_id, -1, kind="barge-in")
            running.channel.put(TurnDone(turn.conversation_id, turn.message_id, turn.usage.prompt_tokens,
                                        turn.usage.completion_tokens, self.assistant().answered_by, bool(adapter),
                                        turn.usage.finish_reason or "stop"))
        except Exception as e:  # the turn fails, the thread serves the next one
            running.channel.put(e)
        finally:
            with self._count:
                self._inflight -= 1
            running.channel.put(_END)
