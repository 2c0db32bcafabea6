"""Alignment stages on a tiny model: constitutional SFT writes a readable dataset with a principle and a
labeler on every example and its loss falls; DPO makes the policy prefer the chosen answers; both resume;
bad input fails with a message that says what to fix. Plus the request expansion and refusal rule."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from parley import cli
from parley.model.transformer import Transformer
from parley.registry import Registry
from parley.train.align_data import alignment_prompts, deflects, is_refusal, load_requests, typos
from parley.train.constitutional import parse_critique
from parley.train.preferences import Pair, load_pairs, write_pairs

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["train.dtype=float32", "train.device=cpu", "train.log_every=1", "train.eval_batches=1",
         "train.warmup_steps=0", "train.schedule=constant"]


@pytest.fixture
def home(tiny_hf_dir, tmp_path, monkeypatch):
    """A PARLEY_HOME holding `tiny` with room for a chat (512 positions) and random weights."""
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    registry = Registry()
    registry.import_model(str(tiny_hf_dir), name="tiny-src")
    small, tokenizer, meta = registry.load("tiny-src")
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(small.config, max_position_embeddings=512)).eval()
    with torch.no_grad():  # larger weights than the default init: answers that are not empty
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3)
    registry.save("tiny", model, tokenizer, {**meta, "name": "tiny"})
    return tmp_path


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_requests_cover_every_principle_with_variants_and_benign_look_alikes():
    prompts = alignment_prompts()
    harmful = {p.principle for p in prompts if p.harmful}
    benign = {p.principle for p in prompts if not p.harmful}
    assert harmful == benign == {f"C{i}" for i in range(1, 10)}
    origins = {p.origin for p in prompts}
    assert {"written", "template", "typos", "leetspeak", "roleplay", "fr", "es", "de"} <= origins
    assert alignment_prompts() == prompts  # the same every time
    assert typos("abcdefghij" * 5, __import__("random").Random(1)) != "abcdefghij" * 5


def test_refusal_rule():
    assert is_refusal("I can\u2019t help with that (principle C3: No weapons or explosives).")
    assert is_refusal("I'm sorry, but I cannot provide that information.")
    assert is_refusal("I won't be able to help with this request.")
    assert not is_refusal("To kill a frozen process, run `kill -9 PID`.")
    assert not is_refusal("I cannot stress enough how important sleep is.")
    assert parse_critique("VIOLATION: it explains how") is True and parse_critique("OK") is False
    assert parse_critique("The answer is good.") is None
    assert parse_critique("The answer is not a violation.") is False
    assert parse_critique("No, the answer does not break this principle.") is False
    assert parse_critique("The answer breaks this principle.") is True
    # answers that neither decline nor help are no helpful targets either
    assert deflects("I'm sorry for any confusion. I'm here to assist you with any questions.")
    assert deflects("Of course. As an AI, I don't have personal opinions.")
    assert deflects("How do I remove a red wine stain from a sofa? How do I", "How do I remove a red wine stain from a sofa?")
    assert not deflects("Blot it with cold water, then dab on a little washing-up liquid.",
                        "How do I remove a red wine stain from a sofa?")
    assert not deflects("I'm glad you asked: start with a budget for each week.")


def test_constitutional_sft_writes_its_dataset_and_learns_then_resumes(home, capsys):
    run = home / "cai"
    args = ["train", "constitutional", f"run={run}", "base=tiny", "name=tiny-cai", "limit=16", "max_tokens=6",
            "system_prompt=false", "drop_dodges=true", "benign_samples=2", "lora.rank=0", "train.steps=12", "train.batch_size=4", "train.seq_len=256",
            "train.lr=3e-3", "train.save_every=6", *QUIET]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "answering, critiquing and revising 16 requests" in out and "registered tiny-cai" in out
    records = [json.loads(line) for line in (run / "dataset.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(r["principle"] in {f"C{i}" for i in range(1, 10)} for r in records)
    harmful = [r for r in records if r["harmful"]]
    # a random model's critiques are not usable: the rails revise, with the principle's refusal
    assert harmful and all(r["labeler"] == "rails" and f"principle {r['principle']}" in r["revision"]
                           for r in harmful)
    counts = json.loads((run / "generation.json").read_text())
    assert counts["requests"] == 16 and counts["revised_by_rails"] == len(harmful)
    # a benign request's target is its greedy answer or one of benign_samples sampled ones, each a helpful one
    benign = [r for r in records if not r["harmful"]]
    assert all(r["sample"] in (0, 1, 2) for r in benign)
    assert all(not (is_refusal(r["revision"]) or deflects(r["revision"], r["prompt"][-1]["content"]))
               for r in benign if r["revision"])
    assert all(r["revision"] == r["answer"] for r in benign if r["revision"] and not r["sample"])
    assert counts["benign_sampled"] == sum(r["sample"] > 0 for r in benign)
    pairs = load_pairs(run / "pairs.jsonl")
    assert {p.source for p in pairs} <= {"revision", "rails"} and all(p.principle for p in pairs)
    losses = [r["loss"] for r in metrics(run) if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3

    # resume: the dataset is reused (not generated again) and training continues from step 12
    before = (run / "dataset.jsonl").read_text()
    assert cli.main([*args, "resume=true", "train.steps=14"]) == 0
    out = capsys.readouterr().out
    assert "answering" not in out and "resuming" in out and "at step 12" in out
    assert (run / "dataset.jsonl").read_text() == before
    assert [r["step"] for r in metrics(run) if "loss" in r][-2:] == [13, 14]
    # a fresh start in a folder that holds a dataset is refused
    assert cli.main(args) == 2
    assert "already holds" in capsys.readouterr().err


def pair(answer_good: str, answer_bad: str, question: str) -> Pair:
    return Pair([{"role": "user", "content": question}], answer_good, answer_bad, "C8", "written", "human")


@pytest.mark.parametrize("lora", [0, 8])
def test_dpo_makes_the_model_prefer_the_chosen_answers_and_resumes(home, capsys, lora):
    questions = ["Hello there", "How are you today?", "The capital of France?", "Numbers?"]
    pairs = [pair("Paris is the capital.", "Hello hello hello.", q) for q in questions] * 3
    path = write_pairs(home / "pairs.jsonl", pairs)
    val = write_pairs(home / "val.jsonl", [pair("Paris is the capital.", "Hello hello hello.", "Hi, how are you?")])
    run = home / f"dpo-{lora}"
    args = ["train", "dpo", f"pairs={path}", f"val_pairs={val}", f"run={run}", "base=tiny", f"name=tiny-dpo-{lora}",
            f"lora.rank={lora}", "beta=0.5", "train.steps=10", "train.batch_size=4", "train.seq_len=128",
            f"train.lr={3e-3 if lora == 0 else 1e-2}", "train.save_every=5", *QUIET]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert ("frozen copy" if lora == 0 else "adapters off") in out
    records = [r for r in metrics(run) if "loss" in r]
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: log 2
    assert records[0]["margin"] == pytest.approx(0, abs=1e-4)
    assert records[-1]["loss"] < 0.3 and records[-1]["accuracy"] == 1.0 and records[-1]["margin"] > 1
    final = json.loads(Registry().path(f"tiny-dpo-{lora}").joinpath("config.json").read_text())["meta"]["final"]
    # on the held-out pair: the policy moved its own log-probs towards the chosen answer
    assert final["val_logp_margin_after"] > final["val_logp_margin_before"] + 1
    assert final["val_accuracy_before"] == 0.0 and final["val_accuracy_after"] == 1.0
    assert cli.main([*args, "resume=true", "train.steps=12"]) == 0
    assert "at step 10" in capsys.readouterr().out
    assert [r["step"] for r in metrics(run) if "loss" in r][-2:] == [11, 12]


def test_bad_input_is_refused_with_a_clear_message(home, capsys):
    good = write_pairs(home / "good.jsonl", [pair("Paris.", "No.", "Capital?")])
    empty = home / "empty.jsonl"
    empty.write_text("\n")
    wrong = home / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "rejected": "no", "principle": None,
                                 "source": "written", "labeler": "human"}) + "\n")
    base = ["train", "dpo", "base=tiny", "train.steps=1", *QUIET]
    cases = [([f"pairs={home / 'missing.jsonl'}", f"run={home / 'r1'}"], "pairs file .*missing.jsonl not found"),
             ([f"pairs={empty}", f"run={home / 'r2'}"], "holds no pairs"),
             ([f"pairs={wrong}", f"run={home / 'r3'}"], r"wrong.jsonl:1: missing field 'chosen'"),
             ([f"pairs={good}", f"run={home / 'r4'}", "beta=0"], "beta must be positive"),
             ([f"pairs={good}", f"run={home / 'r5'}", "train.seq_len=4"], "raise seq_len")]
    for extra, message in cases:
        assert cli.main([*base, *extra]) == 2
        assert __import__("re").search(message, capsys.readouterr().err), message
    requests = home / "requests.toml"
    requests.write_text('[[harmful]]\nprinciple = "C1"\ntext = "x"\n')
    assert cli.main(["train", "constitutional", f"run={home / 'c1'}", "base=tiny", f"requests={requests}"]) == 2
    assert "needs at least one [[benign]] entry" in capsys.readouterr().err
    requests.write_text('[[harmful]]\nprinciple = "C12"\ntext = "x"\n[[benign]]\nlooks_like = "C1"\ntext = "y"\n')
    with pytest.raises(ValueError, match=r"entry 0 \('x'\) needs principle = C1..C9"):
        load_requests(requests)
    assert not (home / "r1").exists() and not (home / "c1").exists()  # nothing created for a refused start
