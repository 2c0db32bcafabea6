"""Debate (parley/pipeline/debate.py) on a tiny model: a transcript of every round, a judge's
decision, a preference pair of source "debate", and `mode=debate` in the terminal with the rounds
in the trace."""

import io

import pytest
import torch

from parley.chat import Session, run
from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.engine.text import TextStream
from parley.pipeline.assistant import Assistant, AssistantConfig
from parley.pipeline.debate import _vote, debate, debate_pairs
from parley.train.preferences import load_pairs, write_pairs
from parley.train.reward import RewardModel

QUESTION = [{"role": "user", "content": "Hello there, how are you today?"}]


@pytest.fixture(scope="module")
def tiny(tiny768_registry):
    """A tiny model with large random weights (its answers differ from prompt to prompt) and a context
    long enough for two rounds under the assistant's system prompt (the tiny tokenizer's tokens are short)."""
    import dataclasses

    from parley.model.transformer import Transformer

    small, tokenizer, _ = tiny768_registry.load("tiny768", dtype=torch.float32)
    model = Transformer(dataclasses.replace(small.config, max_position_embeddings=4096))
    model.load_state_dict(small.state_dict())
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def generate(tiny):
    model, tokenizer = tiny
    engine, params = Engine(model), SamplingParams(max_tokens=6, stop_ids=tokenizer.stop_ids)
    return lambda messages: "".join(TextStream(engine, tokenizer, tokenizer.encode_chat(messages), params))


@pytest.fixture(scope="module")
def reward_model(tiny):
    import copy

    model, tokenizer = tiny
    torch.manual_seed(1)
    return RewardModel(copy.deepcopy(model), tokenizer).eval()


def test_a_debate_on_a_tiny_model_is_a_transcript_and_a_pair(generate, reward_model, tmp_path):
    t = debate(generate, QUESTION, rounds=3, judge="both", reward_model=reward_model)
    assert len(t.rounds) == 3 and all(set(r) == {"A", "B"} and all(r.values()) for r in t.rounds)
    assert t.answer("A") != t.answer("B")
    assert set(t.votes) == {"model", "reward"} and set(t.scores) == {"A", "B"}
    assert t.winner == ("A" if t.scores["A"] > t.scores["B"] else "B")  # agreement, or the reward model decides
    pair = t.to_pair()
    assert pair.source == "debate" and pair.labeler == "reward" and pair.prompt == QUESTION
    assert pair.chosen == t.answer(t.winner) and pair.meta["rounds"] == t.rounds
    write_pairs(tmp_path / "debate.jsonl", debate_pairs(generate, [QUESTION] * 2, 1, "reward", reward_model))
    assert [p.source for p in load_pairs(tmp_path / "debate.jsonl")] == ["debate", "debate"]


def test_the_judges_vote_and_who_decides():
    assert [_vote("B, because it is safer."), _vote("Answer: A."), _vote("Both are fine")] == ["B", "A", None]

    class Fixed:  # a reward model that prefers B, for the rule of who decides
        def score_many(self, prompts, answers):
            return [0.0, 1.0]

    def says_a(messages):  # each side answers in its own words; as the judge, says A
        return "A" if "Which answer is better" in messages[-1]["content"] else messages[0]["content"][-20:]

    t = debate(says_a, QUESTION, rounds=1, judge="both", reward_model=Fixed())
    assert t.votes == {"model": "A", "reward": "B"} and (t.winner, t.decided_by) == ("B", "reward")
    t = debate(says_a, QUESTION, rounds=1, judge="model")
    assert (t.winner, t.decided_by, t.to_pair().labeler) == ("A", "model", "model")
    silent = debate(lambda m: "no idea", QUESTION, rounds=1)
    assert silent.winner is None
    with pytest.raises(ValueError, match="no winner"):
        silent.to_pair()


def test_bad_settings_are_refused(generate):
    with pytest.raises(ValueError, match="at least one round"):
        debate(generate, QUESTION, rounds=0)
    with pytest.raises(ValueError, match="judge=reward needs a reward model"):
        debate(generate, QUESTION, judge="reward")
    with pytest.raises(ValueError, match="ends with a user message"):
        debate(generate, [{"role": "assistant", "content": "hi"}])


def test_chat_mode_debate_answers_with_the_winner_and_traces_the_rounds(tiny, embedder, tmp_path):
    model, tokenizer = tiny
    cfg = AssistantConfig(stages=["safety_in", "respond", "safety_out"], db=str(tmp_path / "p.db"), max_tokens=6,
                          temperature=0, mode="debate", debate_rounds=2)
    session = Session(Assistant.build(cfg, engine=Engine(model), tokenizer=tokenizer, embedder=embedder))
    out = io.StringIO()
    run(session, io.StringIO("hello there\n/trace\n"), out)
    session.close()
    text = out.getvalue()
    assert "debate" in text and "winner" in text and "A1=" in text and "B2=" in text, text
    entry = next(s for s in session.last.trace_dict()["stages"] if s["stage"] == "debate")
    winner = entry["decision"].split()[1]
    assert text.startswith(entry["evidence"][f"{winner}1"].strip())  # the winner's answer is the answer
    with pytest.raises(ValueError, match="debate_judge=reward needs reward_model"):
        Assistant.build(AssistantConfig(stages=["respond"], db=str(tmp_path / "p.db"), mode="debate",
                                        debate_judge="reward"), engine=Engine(model), tokenizer=tokenizer,
                        embedder=embedder)
