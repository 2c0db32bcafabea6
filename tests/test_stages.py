"""The training stages end to end on a tiny synthetic corpus: prepare -> tokenizer ->
tokenize -> pretrain (dense and MoE) -> chat with the result -> SFT with LoRA, and the
clear errors each stage gives for bad recipes, data and run folders."""

import json
import os
import subprocess
import sys

import pytest
import torch

from parley.config import ConfigError, load_config
from parley.registry import Registry
from parley.train import bpe, corpus, pretrain, sft

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly "
         "boxing frogs near the river bank at dawn and dusk").split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A corpus folder as `parley data prepare` writes it, from synthetic fortunes and chats."""
    root = tmp_path_factory.mktemp("stages")
    rng = torch.Generator().manual_seed(0)
    pick = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng))
    (root / "fortunes").mkdir()
    (root / "fortunes" / "synthetic").write_text("".join(f"{pick(25).capitalize()}.\n%\n" for _ in range(120)))
    chats = {f"c{i}": {"messages": [[{"text": f"Do you like the {pick(2)}?", "sender": "a"}],
                                    [{"text": f"Yes, the {pick(6)}.", "sender": "b"}]]} for i in range(60)}
    (root / "chitchat.json").write_text(json.dumps(chats))
    out = root / "corpus"
    corpus.prepare(out, sources=["fortunes", "chitchat"], val_fraction=0.2,
                   locations={"fortunes": root / "fortunes", "chitchat": root / "chitchat.json"})
    bpe.main(bpe.TokenizerConfig(data=str(out), out=str(root / "tok"), vocab_size=300))
    corpus.tokenize(out, str(root / "tok"), val_fraction=0.2)
    return out, root / "tok"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    return tmp_path


def pretrain_config(data, tmp_path, *extra):
    corpus_dir, tok = data
    return load_config(pretrain.PretrainConfig, None, [
        f"data={corpus_dir}", f"tokenizer={tok}", f"run={tmp_path / 'run'}", "name=tiny-pt", "model.depth=1",
        "model.context=64", "train.steps=6", "train.batch_size=4", "train.seq_len=32", "train.eval_every=3",
        "train.eval_batches=2", "train.save_every=3", "train.log_every=1", "train.warmup_steps=1", *extra])


@pytest.mark.parametrize("experts", [0, 2])
def test_pretrain_registers_a_model_that_chats(data, home, experts):
    final = pretrain.main(pretrain_config(data, home, f"model.experts={experts}"))
    records = [json.loads(line) for line in (home / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert any("val_loss" in r for r in records) and (home / "run" / "loss.png").exists()
    assert (home / "run" / "config.toml").exists() and final["model"] == "tiny-pt"
    model, tok, meta = Registry().load("tiny-pt")
    assert meta["stage"] == "pretrain" and model.config.num_local_experts == experts
    from parley.engine.engine import Engine
    from parley.engine.sampling import SamplingParams
    [out] = Engine(model).generate([tok.encode("the quick")], SamplingParams(max_tokens=5))
    assert len(out.tokens) >= 1


def test_sft_with_lora_measures_before_and_after_and_merges(data, home):
    pretrain.main(pretrain_config(data, home))
    corpus_dir, _ = data
    cfg = load_config(sft.SFTConfig, None, [
        f"data={corpus_dir}", f"run={home / 'sft'}", "base=tiny-pt", "name=tiny-chat", "lora.rank=4",
        "train.steps=4", "train.batch_size=4", "train.seq_len=48", "train.eval_every=0", "train.eval_batches=2",
        "train.save_every=0", "train.log_every=1", "train.lr=1e-2", "train.warmup_steps=1"])
    final = sft.main(cfg)
    assert "val_loss_before" in final and "val_loss" in final
    assert (home / "sft" / "adapter.safetensors").exists()
    base, _, _ = Registry().load("tiny-pt")
    tuned, _, meta = Registry().load("tiny-chat")
    assert meta["stage"] == "sft" and set(tuned.state_dict()) == set(base.state_dict())  # merged: plain layout
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only adapted layers moved


def test_stage_errors_are_clear(data, home):
    corpus_dir, tok = data
    with pytest.raises(ConfigError, match="train.stpes"):
        pretrain_config(data, home, "train.stpes=3")
    with pytest.raises(ConfigError, match="train.lr"):
        pretrain_config(data, home, "train.lr=fast")
    with pytest.raises(FileNotFoundError, match="not found"):
        pretrain.main(pretrain_config(data, home, f"data={home / 'nowhere'}"))
    pretrain.main(pretrain_config(data, home))
    with pytest.raises(FileExistsError, match="already holds a trained run: pass resume=true"):
        pretrain.main(pretrain_config(data, home))
    with pytest.raises(ValueError, match="is of a different model"):
        pretrain.main(pretrain_config(data, home, "model.depth=2", "resume=true", "train.steps=8"))
    empty = home / "empty"
    empty.mkdir()
    (empty / "dialogs-train.jsonl").write_text("")
    (empty / "dialogs-val.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        sft.main(load_config(sft.SFTConfig, None, [f"data={empty}", f"run={home / 's'}", "base=tiny-pt",
                                                  "train.seq_len=32"]))


def test_cli_reports_recipe_mistakes_in_one_line(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('data = "x"\ntokenizer = "y"\nrun = "z"\n[train]\nsteps = "many"\n')
    result = subprocess.run([sys.executable, "-m", "parley", "train", "pretrain", str(recipe)], capture_output=True,
                            text=True, env={**os.environ, "PARLEY_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "train.steps" in result.stderr, result.stderr


def test_every_shipped_recipe_loads():
    from pathlib import Path

    from parley.train import asr, constitutional, dpo, reward, rl

    stages = {"sft": sft.SFTConfig, "pretrain": pretrain.PretrainConfig, "reward": reward.RewardConfig,
              "rl": rl.RLConfig, "align-constitutional": constitutional.ConstitutionalConfig, "align-dpo": dpo.DPOConfig,
              "align-rl": rl.RLConfig, "align-sft": sft.SFTConfig,
              "asr": asr.ASRConfig}
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
    assert len(recipes) >= 8
    for recipe in recipes:
        [cls] = [cls for prefix, cls in stages.items() if recipe.stem.startswith(prefix)]  # a new stage: add it
        cfg = load_config(cls, recipe)
        assert cfg.train.steps > 0 and cfg.run.startswith("runs/")
