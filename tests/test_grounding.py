"""Answers that hold to their sources: passages fitted to the context weakest-out, citations
checked against the passages they cite, and a fixed answer when the documents hold nothing
relevant. Real MiniLM embedder, real SQLite, a tiny real model, and a real HTTP server speaking
the chat-completions protocol where a test needs a known answer."""

import hashlib
from pathlib import Path

import pytest
import yaml
from test_knowledge import FixedIntent
from test_respond import openai_server

from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.pipeline.frames import Passage, Passages, TextDelta, UserText
from parley.pipeline.grounding import NOTHING_FOUND, Citer, check_citations, content_words, fit_passages
from parley.pipeline.knowledge import KnowledgeConfig, KnowledgeStage, ingest
from parley.pipeline.respond import LocalBackend, OpenAIBackend, RespondStage, build_messages
from parley.pipeline.runner import Pipeline, Turn
from parley.store import Store

ROOT = Path(__file__).resolve().parents[1]
ANSWERS = ROOT / "benchmarks" / "data" / "python_docs_answers.yml"
ANSWERS_SHA256 = "6f61c8283585cf1d5028f4a8426edfc5914e28ee06f826b51d392344b94312df"

RENT = Passage(1, "money.txt", "chunk 1", "Rent is due on the first working day of each month, paid by bank "
               "transfer to the landlord.", score=0.03)
TYRES = Passage(2, "car.txt", "chunk 1", "Check the tyre pressure once a month. The spare wheel is under the "
                "floor of the boot.", score=0.02)


def test_the_end_to_end_set_is_frozen():
    """Written by hand before any run; changing it needs a new pin and a note in RESULTS.md."""
    assert hashlib.sha256(ANSWERS.read_bytes()).hexdigest() == ANSWERS_SHA256
    items = yaml.safe_load(ANSWERS.read_text())["questions"]
    assert len(items) >= 40 and len({q["id"] for q in items}) == len(items)
    assert all(q["question"].endswith("?") and q["answers"] and q["page"].endswith(".html") for q in items)


def test_citations_are_checked_against_the_passage_they_cite():
    ok = check_citations("Rent is due on the first working day of the month [1]. Pay by transfer [1].", [RENT, TYRES])
    assert ok["grounding"] == "supported" and [c["verdict"] for c in ok["citations"]] == ["supported"] * 2
    wrong = check_citations("The rent is due on the first working day [2].", [RENT, TYRES])
    assert wrong["grounding"] == "unsupported" and wrong["unsupported"] == [2]
    assert wrong["citations"][0]["overlap"] < 0.5
    ghost = check_citations("Check the tyres monthly [2]. The boot holds the spare [7].", [RENT, TYRES])
    assert ghost["grounding"] == "unsupported" and ghost["missing"] == [7] and ghost["unsupported"] == []
    assert check_citations("Rent is due on the first.", [RENT])["grounding"] == "uncited"
    assert check_citations("Hello there!", [])["grounding"] == "no sources"
    assert content_words("The deques of asyncio.gather") == {"deque", "asyncio.gather", "asyncio", "gather"}


def test_uncited_sentences_get_the_passage_that_supports_them_as_they_stream():
    answer = ("Rent is due on the first working day of each month. Check the tyre pressure once a month!\n"
              "Cats are lovely animals. Pay by bank transfer [1].")
    cited = ("Rent is due on the first working day of each month [1]. Check the tyre pressure once a month [2]!\n"
             "Cats are lovely animals. Pay by bank transfer [1].")
    for size in (1, 3, 7, len(answer)):  # pieces cut anywhere, a sentence end split from its space
        citer = Citer([RENT, TYRES])
        shown = "".join(citer.push(answer[i : i + size]) for i in range(0, len(answer), size)) + citer.flush()
        assert shown == cited, size
        assert [a["n"] for a in citer.added] == [1, 2] and citer.unsupported == ["Cats are lovely animals"]
    assert check_citations(cited, [RENT, TYRES])["grounding"] == "supported"
    last = Citer([RENT, TYRES])  # the last sentence is cited when the answer ends, not before
    assert last.push("The spare wheel is under the boot floor") == "The spare wheel is under the boot floor"
    assert last.push(".") == "" and last.flush() == " [2]."
    assert Citer([]).push("No sources. None.") == "No sources. None"


def test_respond_adds_citations_and_the_trace_says_which(rent_store, embedder):
    store, user = rent_store
    said = "Rent is due on the first working day of each month. I like cats."
    with openai_server(said) as (url, _):
        answer, stages = _ask(store, user, embedder, OpenAIBackend(url, model="m"), "when is the rent due?")
        evidence = _respond(stages)["evidence"]
        assert answer == "Rent is due on the first working day of each month [1]. I like cats."
        assert evidence["citations_added"] == [{"n": 1, "sentence": said.split(". ")[0]}]
        assert evidence["unsupported_sentences"] == ["I like cats"] and evidence["grounding"] == "supported"
        turn = Turn(user_id=user, store=store)  # cite=False: the model's text as written
        stages = [FixedIntent("knowledge_question"), KnowledgeStage(embedder), RespondStage(OpenAIBackend(url, model="m"),
                                                                                            cite=False)]
        frames = list(Pipeline(stages).run(turn, UserText("when is the rent due?")))
        assert "".join(f.text for f in frames if isinstance(f, TextDelta)) == said


def test_weakest_passages_give_way_to_the_context(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    backend = LocalBackend(Engine(model), tokenizer, SamplingParams(max_tokens=8, temperature=0))
    filler = " ".join(f"word{i}" for i in range(120))
    passages = [Passage(n, f"doc{n}.txt", "chunk 1", f"Passage {n}. {filler}", score=s)
                for n, s in ((1, 0.05), (2, 0.01), (3, 0.04), (4, 0.03), (5, 0.02))]
    limit = backend.context_length - backend.answer_room
    one = backend.count_tokens([{"role": "user", "content": f"Passage 1. {filler}"}])
    assert 5 * one > limit > 2 * one, "the tiny model's context must hold some passages, not all"
    turn = Turn(user_id=1, frames=[Passages(tuple(passages), origin="knowledge")])
    messages, evidence = build_messages(turn, backend, text="which passage?")
    assert backend.count_tokens(messages) <= limit
    kept = [int(line[1]) for line in evidence["passages"]]
    dropped = evidence["passages_dropped"]
    assert sorted(kept + dropped) == [1, 2, 3, 4, 5] and kept == sorted(kept)  # numbers kept as the user sees them
    weakest_kept = min(p.score for p in passages if p.n in kept)
    assert all(p.score <= weakest_kept for p in passages if p.n in dropped)  # the weakest went first
    assert 2 in dropped and 1 in kept
    assert fit_passages(passages, lambda ps: False) == ([], sorted(passages, key=lambda p: p.score))




@pytest.fixture
def rent_store(tmp_path, embedder):
    (tmp_path / "money.txt").write_text(RENT.text)
    (tmp_path / "car.txt").write_text(TYRES.text)
    store = Store(tmp_path / "kb.db")
    user = store.add_user("ann").id
    ingest(store, embedder, user, [tmp_path / "money.txt", tmp_path / "car.txt"])
    yield store, user
    store.close()


def _ask(store, user, embedder, backend, text, intent="knowledge_question", grounded=frozenset({"knowledge_question"})):
    turn = Turn(user_id=user, store=store)
    knowledge = KnowledgeStage(embedder, KnowledgeConfig(grounded_intents=grounded))
    stages = [FixedIntent(intent), knowledge, RespondStage(backend)]
    frames = list(Pipeline(stages).run(turn, UserText(text)))
    answer = "".join(f.text for f in frames if isinstance(f, TextDelta))
    return answer, turn.trace_dict()["stages"]


def _respond(stages):
    return next(s for s in stages if s["stage"] == "respond")


def test_the_trace_says_whether_the_answer_holds_to_its_sources(rent_store, embedder):
    store, user = rent_store
    with openai_server("Rent is due on the first working day of each month [1].") as (url, seen):
        answer, stages = _ask(store, user, embedder, OpenAIBackend(url, model="m"), "when is the rent due?")
    assert answer.endswith("[1].") and len(seen) == 1
    respond = _respond(stages)
    assert respond["decision"] == "answered" and respond["evidence"]["grounding"] == "supported"
    assert "[1] money.txt" in respond["evidence"]["passages"][0]

    with openai_server("Rent is due when the boot is full of spare wheels [1].") as (url, _):
        _, stages = _ask(store, user, embedder, OpenAIBackend(url, model="m"), "when is the rent due?")
    evidence = _respond(stages)["evidence"]
    assert evidence["grounding"] == "unsupported" and evidence["unsupported"] == [1]
    assert evidence["citations"][0]["verdict"] == "unsupported"


def test_nothing_relevant_gets_a_fixed_answer_not_a_guess(rent_store, embedder):
    store, user = rent_store
    with openai_server("The capital of Australia is Sydney.") as (url, seen):
        answer, stages = _ask(store, user, embedder, OpenAIBackend(url, model="m"),
                              "what is the boiling point of liquid nitrogen?")
        assert answer == NOTHING_FOUND and seen == []  # the model was never asked
        assert _respond(stages)["evidence"]["grounding"] == "nothing found"
        assert next(s for s in stages if s["stage"] == "knowledge")["decision"] == "nothing relevant"
        # small talk that found nothing is answered by the model as before
        answer, _ = _ask(store, user, embedder, OpenAIBackend(url, model="m"), "tell me a joke", intent="out_of_scope")
        assert answer == "The capital of Australia is Sydney." and len(seen) == 1
        # by default (an assistant that also answers general questions) the model answers
        answer, _ = _ask(store, user, embedder, OpenAIBackend(url, model="m"),
                         "what is the boiling point of liquid nitrogen?", grounded=frozenset())
        assert answer == "The capital of Australia is Sydney." and len(seen) == 2


def test_a_real_model_answer_is_checked_too(rent_store, embedder, tiny_chat_model):
    store, user = rent_store
    model, tokenizer = tiny_chat_model
    backend = LocalBackend(Engine(model), tokenizer, SamplingParams(max_tokens=12, temperature=0))
    _, stages = _ask(store, user, embedder, backend, "when is the rent due?")
    evidence = _respond(stages)["evidence"]
    assert evidence["grounding"] in {"supported", "unsupported", "uncited"}  # a random tiny model: any verdict
    assert evidence["min_overlap"] == 0.5 and evidence["passages"]
