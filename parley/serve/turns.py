"""The assistant ("model": "parley") behind the API: blocking pipeline turns bridged to async.

    turns = TurnRunner(settings, generator, tokenizer, embed)
    turn = turns.start(user, conversation_id=None, text="hello", overrides={"temperature": 0})
    async for item in turn.frames:           # TurnStarted, then TextDelta / Notice / Refusal ...
        ...                                  # frames, then TurnDone (saved turn id, token counts)
    turn.stop()                              # the client went away: the pipeline stops generating

Each turn runs on a small pool of threads; every thread builds its own `Assistant` once (its
own SQLite connection, as the store requires) and points it at the requesting user and
conversation before each turn. The respond stage generates through an `EngineView` of the
server's one generator, so pipeline turns and raw completions share one queue.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from parley.model.tokenizer import Tokenizer
from parley.pipeline.assistant import Assistant, AssistantConfig
from parley.store import User
from parley.serve.generation import Channel, EngineView, Generator, Handle, QueueFull


@dataclass
class TurnDone:
    """The last item of a turn's frames: where it was saved and what it cost."""

    conversation_id: int | None
    turn_id: int | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class TurnStarted:
    """The first item of a turn's frames: the conversation it belongs to (new or given)."""

    conversation_id: int


@dataclass
class RunningTurn:
    frames: Channel
    cancel: threading.Event = field(default_factory=threading.Event)
    handles: list[Handle] = field(default_factory=list)  # its generation requests

    def stop(self) -> None:
        """Stop the turn: its generation at once (queued or running), the pipeline at its next frame."""
        self.cancel.set()
        for handle in list(self.handles):
            handle.cancel()


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)  # the pipeline's own torch work (NLU head, MiniLM) stays off OpenMP teams


class TurnRunner:
    def __init__(self, config: AssistantConfig, generator: Generator, tokenizer: Tokenizer,
                 embed, workers: int = 4, max_pending: int = 32, single_threaded: bool = False):
        self.config = config  # what each thread's assistant is built from (its user set per thread)
        self.workers, self.max_pending, self._inflight, self._count = workers, max_pending, 0, threading.Lock()
        self.generator, self.tokenizer, self.embed = generator, tokenizer, embed
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="parley-turn",
                                       initializer=_one_torch_thread if single_threaded else None)
        self._local = threading.local()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _assistant(self, user: User) -> tuple[Assistant, EngineView]:
        if getattr(self._local, "assistant", None) is None:
            view = EngineView(self.generator)
            cfg = dataclasses.replace(self.config, user=user.name)
            self._local.assistant = Assistant.build(cfg, engine=view, tokenizer=self.tokenizer, embedder=self.embed)
            self._local.view = view
        return self._local.assistant, self._local.view

    def start(self, user: User, conversation_id: int | None, text: str, overrides: dict) -> RunningTurn:
        """Queue a turn; QueueFull when `max_pending` turns already wait for a thread."""
        with self._count:
            if self._inflight >= self.workers + self.max_pending:
                raise QueueFull(self._inflight - self.workers, retry_after=1.0)
            self._inflight += 1
        turn = RunningTurn(Channel())
        self.pool.submit(self._run, turn, user, conversation_id, text, overrides)
        return turn

    def _run(self, turn: RunningTurn, user: User, conversation_id: int | None, text: str, overrides: dict) -> None:
        done = TurnDone(conversation_id, None, 0, 0)
        try:
            if turn.cancel.is_set():  # the client left while the turn waited for a thread
                return
            assistant, view = self._assistant(user)
            assistant.user_id, assistant.conversation_id = user.id, conversation_id
            view.overrides, view.prompt_tokens, view.completion_tokens = overrides, 0, 0
            view.handles = turn.handles
            frames = assistant.say(text)
            try:
                for i, frame in enumerate(frames):
                    if turn.cancel.is_set():
                        break
                    if i == 0:  # say() has opened the conversation by now
                        turn.frames.put(TurnStarted(assistant.conversation_id))
                    turn.frames.put(frame)
            finally:
                frames.close()  # closes the respond stage's stream, which cancels its generation
            done.conversation_id = assistant.conversation_id
            saved = assistant.store.turns(user.id, done.conversation_id) if done.conversation_id else []
            done.turn_id = saved[-1].id if saved and saved[-1].role == "assistant" else None
            done.prompt_tokens, done.completion_tokens = view.prompt_tokens, view.completion_tokens
            turn.frames.put(done)
        except Exception as e:  # the turn fails, the thread serves the next one
            turn.frames.put(e)
        finally:
            with self._count:
                self._inflight -= 1
            turn.frames.end()
