"""The reward model (parley/train/reward.py): it learns to rank held-out pairs above chance on a tiny
model, registers itself so load_reward_model scores (prompt, answer), resumes, and refuses bad input."""

import pytest
import torch

from parley.config import load_config
from parley.train.losses import reward_loss
from parley.train.reward import PairRows, RewardConfig, RewardModel, load_reward_model, main
from tests.align_tiny import make_home, write_pairs


@pytest.fixture
def home(tiny_hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    return make_home(tiny_hf_dir, tmp_path / "home")


def _cfg(tmp_path, steps=30, **extra):
    pairs, heldout = write_pairs(tmp_path / "pairs.jsonl", 0, 24), write_pairs(tmp_path / "heldout.jsonl", 100, 12)
    overrides = [f"pairs={pairs}", f"heldout={heldout}", f"run={tmp_path / 'run'}", "base=tiny", "name=tiny-reward",
                 f"train.steps={steps}", "train.batch_size=4", "train.seq_len=64", "train.lr=3e-3",
                 "train.warmup_steps=2", "train.device=cpu", "train.dtype=float32", "train.eval_every=0",
                 "train.save_every=10", "train.log_every=10", "lora.rank=0"]
    return load_config(RewardConfig, None, overrides + [f"{k}={v}" for k, v in extra.items()])


def test_bradley_terry_loss():
    assert reward_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(0.6931, abs=1e-4)
    assert reward_loss(torch.tensor([5.0]), torch.tensor([-5.0])) < reward_loss(torch.tensor([-5.0]), torch.tensor([5.0]))


def test_ranks_heldout_pairs_above_chance_and_scores_after_loading(home, tmp_path, one_thread):
    final = main(_cfg(tmp_path))
    assert final["loss"] < 0.69  # below chance's log 2
    assert final["heldout_accuracy"] >= 0.9, final
    rm = load_reward_model("tiny-reward")
    prompt = [{"role": "user", "content": "question 500: how are you today?"}]
    good, bad = rm.score_many([prompt, prompt], ["Paris is the capital of France.", "café 0123 東京"])
    assert good > bad
    assert rm.score(prompt, "Paris is the capital of France.") == pytest.approx(good, abs=1e-5)
    answers = ["Paris.", "café 0123 東京 and a longer answer than the others", "Paris is the capital of France."]
    assert rm.score_many([prompt] * 3, answers, batch_size=2) == pytest.approx(rm.score_many([prompt] * 3, answers),
                                                                               abs=1e-5)  # batches agree
    assert (tmp_path / "run" / "reward.json").is_file()


def test_lora_reward_model_trains_adapters_and_head(home, tmp_path, one_thread):
    final = main(_cfg(tmp_path, steps=20, **{"lora.rank": 4, "train.lr": 1e-2}))
    assert final["heldout_accuracy"] > 0.5
    rm = load_reward_model("tiny-reward")
    assert not any("lora" in name for name, _ in rm.named_parameters())  # merged before saving


def test_resume_repeats_the_uninterrupted_run(home, tmp_path, one_thread):
    constant = {"train.schedule": "constant"}  # the first part's schedule is then the whole run's
    (tmp_path / "a").mkdir()
    whole = main(_cfg(tmp_path / "a", steps=20, **constant))
    (tmp_path / "b").mkdir()
    main(_cfg(tmp_path / "b", steps=10, **constant))
    resumed = main(_cfg(tmp_path / "b", steps=20, resume="true", **constant))
    assert resumed["loss"] == pytest.approx(whole["loss"], abs=1e-5)
    assert resumed["heldout_accuracy"] == whole["heldout_accuracy"]


def test_bad_input_is_refused_with_a_clear_error(home, tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(FileNotFoundError, match="pairs file .*missing.jsonl not found"):
        main(load_config(RewardConfig, None, [f"pairs={tmp_path / 'missing.jsonl'}", f"heldout={cfg.heldout}",
                                              f"run={tmp_path / 'r'}"]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no pairs"):
        PairRows(tmp_path / "empty.jsonl", tokenizer_of(home), 64)
    (tmp_path / "same.jsonl").write_text('{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", '
                                         '"rejected": "a", "principle": null, "source": "written", "labeler": "human"}\n')
    with pytest.raises(ValueError, match="same.jsonl:1: .*same answer"):
        PairRows(tmp_path / "same.jsonl", tokenizer_of(home), 64)
    with pytest.raises(ValueError, match="longer than train.seq_len=4"):
        PairRows(cfg.pairs, tokenizer_of(home), 4)
    with pytest.raises(FileNotFoundError, match="more_pairs file .*gone.jsonl not found"):
        main(load_config(RewardConfig, None, [f"pairs={cfg.pairs}", f"heldout={cfg.heldout}", f"run={tmp_path / 'r'}",
                                              f"more_pairs={tmp_path / 'gone.jsonl'}"]))
    both = PairRows([cfg.pairs, cfg.heldout], tokenizer_of(home), 64)  # more_pairs: read after `pairs`
    assert len(both) == len(PairRows(cfg.pairs, tokenizer_of(home), 64)) + len(PairRows(cfg.heldout, tokenizer_of(home), 64))
    with pytest.raises(LookupError, match="no reward model named 'nope'.*parley train reward"):
        load_reward_model("nope")
    model, tokenizer, _ = home.load("tiny")
    with pytest.raises(ValueError, match="1 prompts but 2 answers"):
        RewardModel(model, tokenizer).score_many([[{"role": "user", "content": "hi"}]], ["a", "b"])


def tokenizer_of(home):
    return home.load("tiny")[1]


def test_the_heldout_pairs_are_frozen():
    """benchmarks/data/reward_pairs/heldout.jsonl as written before any reward model was trained
    (its README says how); never change the digest to make this pass."""
    import hashlib
    from pathlib import Path

    from parley.train.preferences import load_pairs

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "reward_pairs" / "heldout.jsonl"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        "8da8b954f394d92d4abfcebf0e8c83c1a3f7c2957015fd7e683813d908754e6d"
    pairs = load_pairs(path)
    train = {p.prompt[0]["content"] for p in load_pairs(path.with_name("train.jsonl"))}
    assert len(pairs) == 50 and not train & {p.prompt[0]["content"] for p in pairs}
