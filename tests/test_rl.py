"""GRPO with a KL penalty (parley/train/rl.py) on a tiny model: a toy reward rises, a large KL
coefficient keeps the policy closer to the reference than none does, a resumed run repeats the
uninterrupted one, and bad input is refused with a clear error."""

import json

import pytest
import torch

from parley.config import load_config
from parley.train.losses import grpo_loss
from parley.train.rl import (Prompts, RLConfig, group_advantages, refusal_labels, refusal_reward, run_rl,
                             token_logprobs)
from tests.align_tiny import make_home


@pytest.fixture
def home(tiny_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    return make_home(tiny_hf_dir, tmp_path / "home")


def digits(prompts, answers):
    """The toy reward: the share of an answer's characters that are digits."""
    return [sum(c.isdigit() for c in a) / max(1, len(a)) for a in answers]


def _prompts(path, count=6):
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Hello there {i}, how are you today?"}]}) + "\n")
    return str(path)


def _cfg(tmp_path, run, steps=12, **extra):
    overrides = [f"prompts={_prompts(tmp_path / 'prompts.jsonl')}", f"run={tmp_path / run}", "base=tiny",
                 "group_size=4", "max_new_tokens=12", f"train.steps={steps}", "train.batch_size=3", "train.seq_len=64",
                 "train.lr=2e-2", "train.warmup_steps=0", "train.schedule=constant", "train.device=cpu",
                 "train.dtype=float32", "train.save_every=6", "train.log_every=1", "lora.rank=0", "register=false"]
    return load_config(RLConfig, None, overrides + [f"{k}={v}" for k, v in extra.items()])


def _train(home, cfg):
    policy, tokenizer, _ = home.load("tiny", dtype=torch.float32)
    final, run = run_rl(cfg, policy, tokenizer, [digits])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return final, [r for r in records if "reward" in r]


def _mean(records, key, part):
    return sum(r[key] for r in part) / len(part)


def test_advantages_are_normalised_within_each_group():
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0]), 3)
    assert adv[:3].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3)
    assert adv[3:].abs().max() < 1e-6  # equal rewards teach nothing


def test_advantages_scaled_by_the_batch_or_not_at_all_let_one_mistake_cost_more():
    """scale_rewards: by its own group's std every group's advantages come out the same size, so a benign
    refusal costing 2 instead of 1 changes nothing; by the batch's std, or unscaled (Dr. GRPO), it does."""
    even, dearer = torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([1.0, -2.0, 1.0, 1.0])
    assert torch.allclose(group_advantages(even, 2), group_advantages(dearer, 2), atol=1e-3)
    assert group_advantages(dearer, 2, "none").tolist() == [1.5, -1.5, 0.0, 0.0]
    assert group_advantages(even, 2, "none").tolist() == [1.0, -1.0, 0.0, 0.0]
    batch = group_advantages(dearer, 2, "batch")
    assert batch.tolist() == pytest.approx((torch.tensor([1.5, -1.5, 0.0, 0.0]) / dearer.std(unbiased=False)).tolist(),
                                           abs=1e-3)
    with pytest.raises(ValueError, match="scale must be one of group, batch, none"):
        group_advantages(even, 2, "prompt")


def test_kl_term_is_zero_at_the_reference_and_its_gradient_pulls_back():
    ref = torch.log_softmax(torch.randn(2, 5), -1)
    logps = (ref + 0.5).requires_grad_()
    mask = torch.ones(2, 5, dtype=torch.bool)
    _, kl = grpo_loss(ref.clone(), ref, torch.zeros(2), mask, 1.0)
    assert kl.abs().max() < 1e-6
    loss, kl = grpo_loss(logps, ref, torch.zeros(2), mask, 1.0)
    loss.backward()
    assert (kl > 0).all() and (logps.grad > 0).all()  # descending lowers logps, back towards ref


def test_reward_rises_and_the_kl_penalty_keeps_the_policy_closer(home, tmp_path, one_thread):
    _, free = _train(home, _cfg(tmp_path, "free", kl_coef=0.0))
    _, held = _train(home, _cfg(tmp_path, "held", kl_coef=1.0))
    first, last = free[:3], free[-3:]
    assert _mean(free, "reward", last) > _mean(free, "reward", first) + 0.1, [r["reward"] for r in free]
    assert _mean(held, "kl", held[-4:]) < _mean(free, "kl", free[-4:]), ([r["kl"] for r in free], [r["kl"] for r in held])
    for key in ("reward", "kl", "length", "refusal_rate", "reward_0"):
        assert key in free[-1]


def test_lora_policy_trains_and_resume_repeats_the_run(home, tmp_path, one_thread):
    whole, _ = _train(home, _cfg(tmp_path, "whole", steps=8, **{"lora.rank": 4}))
    _train(home, _cfg(tmp_path, "parts", steps=6, **{"lora.rank": 4}))
    resumed, records = _train(home, _cfg(tmp_path, "parts", steps=8, resume="true", **{"lora.rank": 4}))
    assert resumed["loss"] == pytest.approx(whole["loss"], abs=1e-5)
    assert resumed["reward"] == pytest.approx(whole["reward"], abs=1e-6)
    assert [r["step"] for r in records] == list(range(1, 9))


def test_bad_input_is_refused_with_a_clear_error(home, tmp_path):
    from parley.train.rl import main

    with pytest.raises(FileNotFoundError, match="prompts file .*missing.jsonl not found"):
        main(load_config(RLConfig, None, [f"prompts={tmp_path / 'missing.jsonl'}", f"run={tmp_path / 'r'}"]))
    tokenizer = home.load("tiny")[1]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        Prompts(tmp_path / "empty.jsonl", tokenizer, 64)
    (tmp_path / "bad.jsonl").write_text('{"prompt": [{"role": "assistant", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected"):
        Prompts(tmp_path / "bad.jsonl", tokenizer, 64)
    with pytest.raises(ValueError, match="no prompt of at most 3 tokens"):
        Prompts(_prompts(tmp_path / "p.jsonl"), tokenizer, 3)
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        load_config(RLConfig, None, ["prompts=p", "run=r", "group_size=1"])
    with pytest.raises(ValueError, match="shapes do not fit"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool), 0.1)
    with pytest.raises(ValueError, match="whole groups of 4"):
        group_advantages(torch.zeros(6), 4)


HARMFUL = [{"role": "user", "content": "How do I hurt my neighbour badly?"}]
BENIGN = [{"role": "user", "content": "How do I kill a stuck process on Linux?"}]
DECLINE = "I can't help with that (principle C1: No threats or violence against people)."
HELP = "Run `ps aux` to find its id, then `kill -9 <id>`."


def test_refusal_reward_scores_each_answer_against_its_prompts_label(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": HARMFUL, "chosen": DECLINE, "rejected": "First, find a heavy bat."}) + "\n"
                    + json.dumps({"prompt": BENIGN, "chosen": HELP, "rejected": DECLINE}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "Write me a haiku"}], "refuse": False}) + "\n")
    labels = refusal_labels(path)
    assert sorted(labels.values()) == [False, False, True]
    score = refusal_reward(path, 0.5)
    haiku = [{"role": "user", "content": "Write me a haiku"}]
    dodge = "I'm sorry for any confusion, but I'm here to help."
    got = score([HARMFUL, HARMFUL, BENIGN, BENIGN, BENIGN, haiku], [DECLINE, "Find a bat.", HELP, DECLINE, dodge, "Snow"])
    assert got == [0.5, -0.5, 0.5, -0.5, 0.0, 0.5]
    dearer = refusal_reward(path, 0.5, over_refusal=2.0)  # declining the benign request costs 2, nothing else moves
    assert dearer([HARMFUL, HARMFUL, BENIGN, BENIGN, BENIGN, haiku],
                  [DECLINE, "Find a bat.", HELP, DECLINE, dodge, "Snow"]) == [0.5, -0.5, 0.5, -2.0, 0.0, 0.5]


def test_refusal_reward_refuses_prompts_it_cannot_label_before_the_model_loads(home, tmp_path):
    from parley.train.rl import main

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": BENIGN, "chosen": HELP, "rejected": "Use top."}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: refusal_reward needs to know whether this prompt should be declined"):
        main(load_config(RLConfig, None, [f"prompts={path}", f"run={tmp_path / 'r'}", "refusal_reward=1",
                                          "base=does-not-exist", "register=false"]))
    path.write_text(json.dumps({"prompt": BENIGN, "refuse": False}) + "\n" + json.dumps({"prompt": BENIGN, "refuse": True}))
    with pytest.raises(ValueError, match="p.jsonl:2: this prompt is labelled both"):
        refusal_labels(path)
    path.write_text(json.dumps({"prompt": BENIGN, "refuse": "yes"}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1: refusal_reward needs"):
        refusal_labels(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="p.jsonl:1: not valid JSON"):
        refusal_labels(path)
    with pytest.raises(ValueError, match="refusal_reward must be >= 0"):
        load_config(RLConfig, None, ["prompts=p", "run=r", "refusal_reward=-1"])
    with pytest.raises(ValueError, match="over_refusal_cost applies to refusal_reward"):
        load_config(RLConfig, None, ["prompts=p", "run=r", "over_refusal_cost=2"])
    with pytest.raises(ValueError, match="scale_rewards"):
        load_config(RLConfig, None, ["prompts=p", "run=r", "scale_rewards=prompt"])


def test_token_logprobs_of_the_answer_positions_alone_equal_the_full_ones(home):
    """GRPO computes log-probs only where the answers are (the output layer skips the prompts): the same
    figures there as the full computation, zeros elsewhere, and gradients through them."""
    model = home.load("tiny", dtype=torch.float32)[0]
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, 4:9], mask[1, 2:11], mask[2, 7:8] = True, True, True
    logits = model(ids[:, :-1]).float()  # every position, the computation the mask spares
    full = logits.gather(-1, ids[:, 1:, None])[..., 0] - logits.logsumexp(-1)
    part = token_logprobs(model, ids, mask)
    assert torch.allclose(part[mask], full[mask], atol=1e-5) and (part[~mask] == 0).all()
    part.sum().backward()
    assert next(p for p in model.parameters() if p.grad is not None).grad.abs().sum() > 0
