"""The assistant: the pipeline built once from config, shared by every conversation it serves.

    assistant = Assistant.build(AssistantConfig())
    with Store(store_target(cfg.db)) as store:
        turn = Turn(user.id, conversation_id=None, store=store, overrides={"temperature": 0})
        for frame in assistant.say(turn, "Remember that my sister is called Ana"):
            ...                              # Notice / TextDelta / Refusal frames, streamed
        turn.conversation_id, turn.message_id  # the conversation it opened, the answer it saved
        turn.trace_dict()                    # what each stage decided, and how long it took

This is where the parts meet (and the only place that knows all of them): the embedding
model shared by NLU, memory and knowledge, the generation backend (the local engine or an
OpenAI-compatible server), and the stage list, which is a config setting: drop "web" or
"sentiment", reorder, or run only ["nlu", "respond"]. Nothing on an `Assistant` changes once
it is built, so a server's worker threads share one: the store connection, the user, the
conversation and the sampling overrides of a turn all come in its `Turn`. Each finished turn
is saved with its trace and dialogue state in one transaction, so the conversation, and the
memory the turn wrote, are there after a restart. The terminal's per-conversation state (the
current conversation, the last turn) lives in `parley.chat.Session`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from parley.config import setting
from parley.engine.config import EngineConfig
from parley.pipeline.frames import Frame, UserText, shown_text
from parley.pipeline.respond import PERSONA
from parley.pipeline.runner import Pipeline, Stage, Turn
from parley.store import Store

DEFAULT_STAGES = ["safety_in", "nlu", "sentiment", "state", "knowledge", "web", "respond", "safety_out"]


class MessageError(ValueError):
    """A user message the assistant cannot take (empty, too long)."""


@dataclass
class AssistantConfig:
    stages: list[str] = setting(factory=lambda: list(DEFAULT_STAGES),
                                help=f"the pipeline, in order; any of {', '.join(DEFAULT_STAGES)}")
    user: str = setting("local", "whose conversations, memory and documents (created if new)")
    db: str = setting("", "SQLite file or postgresql:// URL of conversations, memory and documents "
                          "('' = PARLEY_HOME/parley.db)")
    model: str = setting("smollm2", "registered model the local backend generates with")
    backend: Literal["local", "openai"] = setting("local", "generate in-process, or with an OpenAI-compatible server")
    url: str = setting("", "the server's base URL when backend=openai, e.g. http://127.0.0.1:8080/v1")
    remote_model: str = setting("", "model name to ask the server for (backend=openai)")
    api_key: str = setting("", "bearer key for the server (backend=openai)")
    persona: str = setting(PERSONA, "who the assistant is (the first line of the system prompt)")
    temperature: float = setting(0.2, "sampling temperature (0 = greedy)")
    top_p: float = setting(0.9, "nucleus sampling mass")
    repetition_penalty: float = setting(1.1, "penalty on tokens already in the context")
    max_tokens: int = setting(384, "longest answer, in tokens")
    seed: int | None = setting(None, "sampling seed, for answers that repeat exactly")
    intent_threshold: float = setting(0.5, "below this confidence the intent is out_of_scope")
    knowledge_min_similarity: float = setting(0.3, "passages less similar to the question than this are not used")
    collection: str = setting("", "answer from this knowledge collection only ('' = all of the user's documents)")
    web_allow_private: bool = setting(False, "let the assistant fetch loopback/private addresses (trusted setups only)")
    web_search_url: str = setting("", "a SearXNG instance for web search, e.g. http://127.0.0.1:8888 ('' = none)")
    self_check: bool = setting(False, "ask the model to check its own answers against the constitution (slower)")
    guard: bool = setting(False, "run the learned guard (parley train guard) beside the safety rules: on the "
                                 "message, on passages (injected orders) and on the answer (off by default: it "
                                 "still refuses some plain messages, see benchmarks/RESULTS.md, Guard)")
    max_message_chars: int = setting(8000, "longest accepted user message")
    mode: Literal["respond", "debate"] = setting(
        "respond", "respond: the model answers; debate: two instances argue opposite answers and a judge picks "
                   "the winner's (parley/pipeline/debate.py; /trace shows the rounds)")
    debate_rounds: int = setting(2, "mode=debate: rounds of answers and rebuttals")
    debate_judge: Literal["model", "reward", "both"] = setting(
        "model", "mode=debate: who picks the winner (reward and both need reward_model)")
    reward_model: str = setting("", "mode=debate: a reward model from `parley train reward` for the judge")
    engine: EngineConfig = field(default_factory=EngineConfig)  # [engine]: how the local backend generates


@dataclass
class Parts:
    """What the stages are built from (each loaded once, shared by the stages that need it)."""

    cfg: AssistantConfig
    embedder: Callable
    backend: object

    @cached_property
    def constitution(self):
        from parley.pipeline.safety import load_constitution

        return load_constitution()

    @cached_property
    def guard(self):
        from parley.pipeline.guard import default_guard

        return default_guard(self.embedder) if self.cfg.guard else None


def _safety_in(p: Parts) -> Stage:
    from parley.pipeline.safety import InputSafetyStage

    return InputSafetyStage(p.constitution, guard=p.guard)


def _nlu(p: Parts) -> Stage:
    from parley.pipeline.nlu import NLUStage, default_classifier

    return NLUStage(default_classifier(p.embedder, threshold=p.cfg.intent_threshold))


def _sentiment(p: Parts) -> Stage:
    from parley.pipeline.sentiment import SentimentStage

    return SentimentStage()


def _state(p: Parts) -> Stage:
    from parley.pipeline.state import StateStage

    return StateStage(p.embedder)


def _knowledge(p: Parts) -> Stage:
    from parley.pipeline.knowledge import KnowledgeConfig, KnowledgeStage

    # questions come under several intents ("when is the festival?" reads as chitchat too): look for
    # all but the commands and small talk; the similarity floor keeps unrelated documents out
    intents = frozenset({"knowledge_question", "out_of_scope", "chitchat", "web_lookup"})
    return KnowledgeStage(p.embedder,
                          KnowledgeConfig(min_similarity=p.cfg.knowledge_min_similarity, intents=intents,
                                          collection=p.cfg.collection or None))


def _web(p: Parts) -> Stage:
    from parley.pipeline.web import Fetcher, SearxngSearch, WebConfig, WebStage

    search = SearxngSearch(p.cfg.web_search_url) if p.cfg.web_search_url else None
    return WebStage(fetcher=Fetcher(WebConfig(allow_private=p.cfg.web_allow_private)), search=search)


def _respond(p: Parts) -> Stage:
    from parley.pipeline.respond import RespondStage

    if p.cfg.mode == "debate":
        from parley.pipeline.debate import DebateStage

        reward_model = None
        if p.cfg.reward_model:
            from parley.train.reward import load_reward_model

            reward_model = load_reward_model(p.cfg.reward_model)
        return DebateStage(p.backend, p.cfg.persona, p.constitution.summary, p.cfg.debate_rounds, p.cfg.debate_judge,
                           reward_model, guard=p.guard)
    return RespondStage(p.backend, persona=p.cfg.persona, principles=p.constitution.summary, guard=p.guard)


def _safety_out(p: Parts) -> Stage:
    from parley.pipeline.safety import OutputSafetyStage

    if p.cfg.self_check and p.backend is None:
        raise ValueError("self_check=true needs the respond stage: the model that answers also judges")
    return OutputSafetyStage(p.constitution, checker=_judge(p.backend) if p.cfg.self_check else None,
                             guard=p.guard)


def _judge(backend) -> Callable[[str], str]:
    """The answering model as a self-check judge: prompt in, reply out."""
    from parley.engine.engine import PromptError
    from parley.pipeline.respond import BackendError

    def judge(prompt: str) -> str:
        try:
            return "".join(backend.stream([{"role": "user", "content": prompt}]))
        except (PromptError, BackendError) as e:  # no opinion, and the trace says why
            return f"self-check could not run: {e}"

    return judge


BUILDERS: dict[str, Callable[[Parts], Stage]] = {  # stage name -> how to build it
    "safety_in": _safety_in, "nlu": _nlu, "sentiment": _sentiment, "state": _state,
    "knowledge": _knowledge, "web": _web, "respond": _respond, "safety_out": _safety_out,
}


def answered_by(cfg: AssistantConfig, registry=None) -> str | None:
    """What writes this assistant's answers, as each saved answer records it: the registered
    model, its version once it has several (`parley learn`) and when it was imported (which copy
    it is), or the remote model and its server; None without a respond stage (the pipeline's own
    stages answer). `registry`: where the model is registered (default: PARLEY_HOME's)."""
    if "respond" not in cfg.stages:
        return None
    if cfg.backend == "openai":
        return f"{cfg.remote_model or cfg.model} at {cfg.url}"
    from parley.registry import Registry

    registry = registry or Registry()
    try:
        meta = {m.name: m.meta for m in registry.list()}.get(cfg.model) or {}
        version = registry.stamp(cfg.model)
    except OSError:  # an unreadable registry must not stop the assistant: the name alone then
        meta, version = {}, None
    name = f"{cfg.model} {version}" if version else cfg.model
    return f"{name}, imported {meta['imported_at']}" if "imported_at" in meta else name


def build_backend(cfg: AssistantConfig, engine=None, tokenizer=None):
    from parley.engine.sampling import SamplingParams
    from parley.pipeline.respond import LocalBackend, OpenAIBackend

    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    if cfg.backend == "openai":
        if not cfg.url:
            raise ValueError("backend=openai needs url=http://HOST:PORT/v1 (an OpenAI-compatible server)")
        return OpenAIBackend(cfg.url, cfg.remote_model or cfg.model, api_key=cfg.api_key or None, params=params)
    if engine is None:  # the terminal's own engine, stepped in the thread that reads the answer
        import torch

        from parley.engine.engine import Engine
        from parley.registry import Registry

        e = cfg.engine
        model, tokenizer, _ = Registry().load(cfg.model, dtype=getattr(torch, e.dtype))
        engine = Engine.from_config(model, e)  # turns reuse the conversation's cached pages
    return LocalBackend(engine, tokenizer, params)


class Assistant:
    """The pipeline and what its turns need besides their `Turn`; built once, never changed."""

    def __init__(self, cfg: AssistantConfig, pipeline: Pipeline, embedder: Callable, registry=None):
        self.cfg, self.pipeline, self.embedder = cfg, pipeline, embedder
        self.answered_by = answered_by(cfg, registry)  # saved with each answer

    @classmethod
    def build(cls, cfg: AssistantConfig, engine=None, tokenizer=None, embedder=None, registry=None) -> Assistant:
        unknown = [s for s in cfg.stages if s not in BUILDERS]
        if unknown:
            raise ValueError(f"unknown pipeline stage(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
        if embedder is None:
            from parley.pipeline.embed import Embedder

            embedder = Embedder.load()
        backend = build_backend(cfg, engine, tokenizer) if "respond" in cfg.stages else None
        parts = Parts(cfg, embedder, backend)
        return cls(cfg, Pipeline([BUILDERS[name](parts) for name in cfg.stages]), embedder, registry)

    def memory(self, store: Store):
        """The long-term memory in `store` (per user: every method takes the user id)."""
        from parley.pipeline.state import Memory

        return Memory(store, self.embedder)

    def check(self, text: str) -> str:
        text = text.strip()
        if not text:
            raise MessageError("the message is empty")
        if len(text) > self.cfg.max_message_chars:
            raise MessageError(f"the message has {len(text)} characters; the limit is {self.cfg.max_message_chars} "
                               "(ingest long text with `parley ingest FILE` and ask about it instead)")
        if "\x00" in text:
            raise MessageError("the message contains a NUL byte; send text, not binary data")
        return text

    def say(self, turn: Turn, text: str) -> Iterator[Frame]:
        """Run one turn, streaming the frames that leave the pipeline; saved once it ends. The
        turn names its store, user and conversation (None: open a new one, whose id is then
        `turn.conversation_id`); once saved, `turn.message_id` is the answer's id."""
        text = self.check(text)
        store = turn.store
        if store is None:
            raise ValueError("a turn of the assistant needs a store: Turn(user_id, store=...)")
        opened = turn.conversation_id is None
        if opened:
            title = text if len(text) <= 60 else text[:57] + "..."
            turn.conversation_id = store.create_conversation(turn.user_id, title, saved=False).id  # until add_exchange
        elif store.get_conversation(turn.user_id, turn.conversation_id) is None:
            raise ValueError(f"unknown conversation {turn.conversation_id}")
        else:
            turn.history = [{"role": m.role, "content": m.content}
                            for m in store.messages(turn.user_id, turn.conversation_id)]
        out: list[Frame] = []
        try:
            for frame in self.pipeline.run(turn, UserText(text)):
                out.append(frame)
                yield frame
        finally:
            answer = shown_text(out)
            if answer and turn.may_write():  # user message, answer, trace and dialogue state: one transaction
                _, saved = store.add_exchange(turn.user_id, turn.conversation_id, text, answer, turn.trace_dict(),
                                              slots=turn.slots, model=self.answered_by)
                turn.message_id = saved.id
            elif opened:  # it failed before saying anything, or was dropped (Turn.tentative): no empty conversation
                store.delete_conversation(turn.user_id, turn.conversation_id)
                turn.conversation_id = None
