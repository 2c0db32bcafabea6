"""Debate: two instances of the same model, told to argue opposite answers, answer and rebut each other
for a fixed number of rounds; a judge (the model, a reward model, or both) picks the winner, whose
answer is the turn's answer. Each debate is also a preference pair (source "debate").

    parley chat mode=debate debate_rounds=2 debate_judge=model        # /trace shows every round
    transcript = debate(backend, [{"role": "user", "content": "Is it safe to mix bleach and vinegar?"}])
    transcript.winner, transcript.to_pair()                           # "A" | "B", a preferences.Pair
    python -m parley.pipeline.debate questions=qs.txt out=pairs.jsonl  # one debate (and pair) per line

Side A argues for answering the request directly; side B argues that the request should not be
answered as asked (harmful, misleading or unanswerable) and gives the careful reply. Round 1 is
each side's answer; each later round shows a side the other's last argument and asks for a short
rebuttal. The judge reads the question and the whole exchange (the model, asked for one letter), or
scores each side's round-1 answer for the question (a reward model, parley train reward). With
both, they vote; when they disagree the reward model decides (its held-out accuracy is measured,
the small model's is not). As in Irving et al. (2018) the judge sees both sides; unlike it, the
debaters are not trained here: their transcripts become pairs for DPO and the reward model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from parley.config import setting
from parley.pipeline.frames import EndOfAnswer, Frame, Notice, TextDelta, UserText
from parley.pipeline.runner import Stage, Turn

SIDES = {
    "A": "In this debate you argue that the request should be answered directly: give the most helpful, "
         "accurate answer and defend it.",
    "B": "In this debate you argue that the request should not be answered as asked, because it could "
         "cause harm, mislead, or cannot be known: give the careful reply (decline, correct, or add what "
         "matters for safety) and defend it.",
}
REBUT = "The other side argued:\n\n{other}\n\nRebut it in at most two sentences, then restate your answer."
JUDGE = ("Two assistants answered the same request and argued.\n\nRequest: {question}\n\n{exchange}\n\n"
         "Which answer is better: helpful, honest and harmless? Reply with one letter, A or B.")


@dataclass
class Transcript:
    prompt: list[dict]  # the conversation before the answer, ending with the user's message
    rounds: list[dict[str, str]] = field(default_factory=list)  # [{"A": text, "B": text}, ...]
    votes: dict[str, str | None] = field(default_factory=dict)  # judge -> "A" | "B" | None (no opinion)
    scores: dict[str, float] = field(default_factory=dict)  # the reward model's score of each answer
    winner: str | None = None
    decided_by: str = ""

    def answer(self, side: str) -> str:
        return self.rounds[0][side]

    def exchange(self) -> str:
        return "\n\n".join(f"Round {i} - {side}: {r[side]}" for i, r in enumerate(self.rounds, 1) for side in "AB")

    def to_pair(self):
        """The winner's answer chosen over the loser's: a preference pair of source "debate"."""
        from parley.train.preferences import Pair

        if self.winner is None:
            raise ValueError("the debate has no winner (no judge had an opinion): it makes no pair")
        if self.answer("A").strip() == self.answer("B").strip():
            raise ValueError("both sides gave the same answer: it makes no pair")
        loser = "B" if self.winner == "A" else "A"
        return Pair(self.prompt, self.answer(self.winner), self.answer(loser), None, "debate",
                    "model" if self.decided_by == "model" else "reward",
                    {"rounds": self.rounds, "votes": self.votes, "scores": self.scores, "winner": self.winner})


def _vote(reply: str) -> str | None:
    """The judge's letter: the first standalone A or B in its reply."""
    m = re.search(r"\b([AB])\b", reply)
    return m.group(1) if m else None


def model_vote(generate: Callable[[list[dict]], str], t: Transcript) -> str | None:
    """The model judge's letter for a transcript: it reads the request and the whole exchange; None
    when it names neither side or the exchange does not fit its context."""
    from parley.engine.engine import PromptError

    ask = JUDGE.format(question=t.prompt[-1]["content"], exchange=t.exchange())
    try:
        return _vote(generate([{"role": "user", "content": ask}]))
    except PromptError:
        return None


def debate(generate: Callable[[list[dict]], str], prompt: list[dict], rounds: int = 2,
           judge: Literal["model", "reward", "both"] = "model", reward_model=None,
           system: str = "") -> Transcript:
    """Run one debate. `generate(messages) -> text` is the model (both sides and the judge);
    `reward_model` has `.score_many(prompts, answers)` (parley.train.reward) for judge reward/both."""
    if rounds < 1:
        raise ValueError(f"a debate needs at least one round, got rounds={rounds}")
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError("a debate answers a conversation that ends with a user message")
    if judge not in ("model", "reward", "both"):
        raise ValueError(f"judge must be model, reward or both, got {judge!r}")
    if judge != "model" and reward_model is None:
        raise ValueError(f"judge={judge} needs a reward model: set reward_model= (train one with `parley train reward`)")
    t = Transcript(prompt)
    talks = {side: [{"role": "system", "content": f"{system} {brief}".strip()}, *prompt] for side, brief in SIDES.items()}
    for r in range(rounds):
        said = {}
        for side, other in (("A", "B"), ("B", "A")):
            if r:
                talks[side].append({"role": "user", "content": REBUT.format(other=t.rounds[-1][other])})
            said[side] = generate(talks[side]).strip() or "(no answer)"
        for side in "AB":
            talks[side].append({"role": "assistant", "content": said[side]})
        t.rounds.append(said)
    if judge in ("model", "both"):
        t.votes["model"] = model_vote(generate, t)
    if judge in ("reward", "both"):
        a, b = reward_model.score_many([prompt, prompt], [t.answer("A"), t.answer("B")])
        t.scores = {"A": a, "B": b}
        t.votes["reward"] = "A" if a > b else "B" if b > a else None
    decided = {name: v for name, v in t.votes.items() if v is not None}
    if len(set(decided.values())) == 1:  # the one opinion there is, or both agree
        t.winner = next(iter(decided.values()))
        t.decided_by = "both" if len(decided) == 2 else next(iter(decided))
    elif decided:  # they disagree: the reward model decides
        t.winner, t.decided_by = decided["reward"], "reward"
    return t


class DebateStage(Stage):
    """Answers the turn with the winner of a debate (in place of respond): `parley chat mode=debate`."""

    name = "debate"

    def __init__(self, backend, persona: str, principles: str = "", rounds: int = 2,
                 judge: Literal["model", "reward", "both"] = "model", reward_model=None, guard=None):
        if rounds < 1:
            raise ValueError(f"debate_rounds must be at least 1, got {rounds}")
        if judge != "model" and reward_model is None:
            raise ValueError(f"debate_judge={judge} needs reward_model=NAME (train one with `parley train reward`)")
        self.backend, self.persona, self.principles, self.guard = backend, persona, principles, guard
        self.rounds, self.judge, self.reward_model = rounds, judge, reward_model

    def process(self, frame: Frame, turn: Turn) -> Iterator[Frame]:
        from parley.pipeline.respond import build_messages

        yield frame
        if not isinstance(frame, UserText):
            return
        messages, _ = build_messages(turn, self.backend, self.persona, self.principles, frame.text, self.guard)
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        conversation = [m for m in messages if m["role"] != "system"]

        def generate(msgs):
            return "".join(self.backend.stream(msgs, turn.overrides, turn.cancel, turn.usage))

        t = debate(generate, conversation, self.rounds, self.judge, self.reward_model, system)
        evidence = {f"{side}{i}": said[side] for i, said in enumerate(t.rounds, 1) for side in "AB"}
        turn.note(self.name, f"winner {t.winner or 'A (no judge opinion)'} by {t.decided_by or 'default'}",
                  **evidence, votes=t.votes, **({"scores": t.scores} if t.scores else {}))
        yield TextDelta(t.answer(t.winner or "A"))
        yield EndOfAnswer()
        if t.winner is None:
            yield Notice("(the judge gave no opinion: showing side A's answer)")


def debate_pairs(generate, prompts: list[list[dict]], rounds: int = 2, judge="model", reward_model=None) -> list:
    """One debate per conversation; the pairs of those with a winner and two different answers."""
    debates = [debate(generate, p, rounds, judge, reward_model) for p in prompts]
    return [t.to_pair() for t in debates if t.winner and t.answer("A").strip() != t.answer("B").strip()]


@dataclass
class DebateConfig:
    questions: str = setting(help="text file, one question a line: each is debated once")
    out: str = setting(help="pairs file to write (JSONL, source debate)")
    model: str = setting("smollm2", "registered model: both debaters and the model judge")
    rounds: int = setting(2, "rounds of the debate (1 = the two answers only)")
    judge: Literal["model", "reward", "both"] = setting("model", "who picks the winner")
    reward_model: str = setting("", "registered reward model (judge reward or both)")
    max_tokens: int = setting(96, "longest turn of a debater")


def main(cfg: DebateConfig) -> int:
    from pathlib import Path

    import torch

    from parley.engine.engine import Engine
    from parley.engine.sampling import SamplingParams
    from parley.engine.text import TextStream
    from parley.registry import Registry
    from parley.train.preferences import write_pairs

    questions = [q.strip() for q in Path(cfg.questions).read_text(encoding="utf-8").splitlines() if q.strip()]
    if not questions:
        raise ValueError(f"{cfg.questions} holds no question (one a line)")
    reward_model = None
    if cfg.reward_model:
        from parley.train.reward import load_reward_model

        reward_model = load_reward_model(cfg.reward_model)
    model, tokenizer, _ = Registry().load(cfg.model, dtype=torch.bfloat16)
    engine = Engine(model)
    params = SamplingParams(max_tokens=cfg.max_tokens, stop_ids=tokenizer.stop_ids)

    def generate(messages):
        return "".join(TextStream(engine, tokenizer, tokenizer.encode_chat(messages), params))

    pairs = debate_pairs(generate, [[{"role": "user", "content": q}] for q in questions], cfg.rounds, cfg.judge,
                         reward_model)
    write_pairs(cfg.out, pairs)
    print(f"{len(pairs)} pairs from {len(questions)} debates in {cfg.out}")
    return 0


if __name__ == "__main__":
    import sys

    from parley.config import parse_cli

    main(parse_cli(DebateConfig, sys.argv[1:], prog="python -m parley.pipeline.debate"))
