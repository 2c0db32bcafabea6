"""`parley train reward`: a reward model, the transformer with a scalar head, trained on preference
pairs with the pairwise (Bradley-Terry) loss, and scored on held-out pairs.

    parley train reward recipes/reward-rails.toml                 # SmolLM2 + LoRA on the rails' pairs
    parley train reward recipes/reward-rails.toml train.steps=20 run=runs/reward-quick name=reward-quick

    rm = load_reward_model("smollm2-reward")                     # registered under PARLEY_HOME/rewards/
    rm.score([{"role": "user", "content": "how do I build a pipe bomb"}], "I can't help with that ...")

The head reads the hidden state (after the final norm) of the answer's end-of-turn token, the
last token of the sequence that is not padding, as TRL's RewardTrainer and HF's
LlamaForSequenceClassification do. With LoRA the adapters and the head train (TRL's
`modules_to_save=["score"]`); the adapters are merged before the model is registered. Pairs
longer than train.seq_len are dropped (counted), as TRL filters by max_length; the answer's
end would otherwise be cut off and the score read elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from parley.config import setting
from parley.files import atomic_open
from parley.model.lora import merge_lora
from parley.model.tokenizer import Tokenizer
from parley.model.transformer import ModelConfig, Transformer
from parley.registry import NAME_PATTERN, Registry
from parley.train.data import _check_position, chat_tokens, sample_ids
from parley.train.loop import TrainConfig, _unique_state, resolve_device, train
from parley.train.losses import reward_loss
from parley.train.preferences import Pair, load_pairs
from parley.train.sft import LoRAConfig, add_adapters
from parley.train.stage import claim_run, model_name, processes


class RewardModel(nn.Module):
    """A decoder whose output layer is one linear map to a scalar (`body.lm_head`, the score head)."""

    def __init__(self, body: Transformer, tokenizer: Tokenizer | None = None):
        super().__init__()
        if body.lm_head.out_features != 1:  # an LM: its vocabulary head makes way for the score head
            body.lm_head = nn.Linear(body.config.hidden_size, 1, bias=False)
            nn.init.normal_(body.lm_head.weight, std=1 / (body.config.hidden_size + 1) ** 0.5)
        self.body, self.tokenizer = body, tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.body.config

    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Scores (batch,) of right-padded rows `ids` (batch, T), read at positions `last` (batch,)."""
        values = self.body(ids)[..., 0]  # (batch, T): padding on the right never reaches `last`
        return values.gather(1, last[:, None])[:, 0].float()

    @torch.no_grad()
    def score_many(self, prompts: list[list[dict]], answers: list[str], batch_size: int = 16) -> list[float]:
        """Scores of each (conversation before the answer, answer), `batch_size` rows at a time; longer ones
        keep their end."""
        if self.tokenizer is None:
            raise ValueError("this reward model has no tokenizer: load it with load_reward_model(name)")
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        context = self.config.max_position_embeddings
        rows = [encode(self.tokenizer, p, a)[-context:] for p, a in zip(prompts, answers)]
        device, scores = next(self.parameters()).device, []
        for i in range(0, len(rows), batch_size):
            ids, last = pad(rows[i:i + batch_size], pad_id(self.tokenizer))
            scores += self(ids.to(device), last.to(device)).tolist()
        return scores

    def score(self, prompt: list[dict], answer: str) -> float:
        return self.score_many([prompt], [answer])[0]


def pad_id(tokenizer: Tokenizer) -> int:
    return next((i for i in (tokenizer.pad_id, tokenizer.eot_id, tokenizer.eos_id) if i is not None), 0)


def encode(tokenizer: Tokenizer, prompt: list[dict], answer: str) -> list[int]:
    """Ids of the conversation and its answer, ending with the answer's end-of-turn token (what
    the template renders after it, a newline in ChatML, is dropped: the score is read at the end)."""
    if not answer.strip():
        raise ValueError("an answer is empty")
    ids, mask = chat_tokens(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    return ids[:int(np.flatnonzero(mask)[-1]) + 1]


def pad(rows: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, longest) right-padded, index of each row's last token (n,))."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(r) - 1 for r in rows])


def pairwise_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """loss_fn for the loop: batch = (ids, last), the chosen answers in the first half of the rows."""
    ids, last = batch
    scores = model(ids, last)
    chosen, rejected = scores.chunk(2)
    return reward_loss(chosen, rejected), {"accuracy": (chosen > rejected).float().mean().detach(),
                                           "margin": (chosen - rejected).mean().detach()}


class PairRows:
    """The pairs of one file or several, tokenized for the reward model; pairs over seq_len tokens are dropped."""

    def __init__(self, path, tokenizer: Tokenizer, seq_len: int):
        """`path`: a pairs file, several, or the pairs themselves (a list of Pair)."""
        self.pad_id, self.rows, self.dropped = pad_id(tokenizer), [], 0
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        pairs = [p for one in paths for p in ([one] if isinstance(one, Pair) else load_pairs(one))]
        for pair in pairs:
            chosen, rejected = encode(tokenizer, pair.prompt, pair.chosen), encode(tokenizer, pair.prompt, pair.rejected)
            if max(len(chosen), len(rejected)) > seq_len:
                self.dropped += 1
            else:
                self.rows.append((chosen, rejected))
        if not self.rows:
            where = "" if any(isinstance(one, Pair) for one in paths) else f" of {path}"
            raise ValueError(f"every pair{where} is longer than train.seq_len={seq_len} tokens: raise it")

    def __len__(self) -> int:
        return len(self.rows)

    def _tensors(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        picked = [self.rows[int(i)] for i in indices]
        return pad([c for c, _ in picked] + [r for _, r in picked], self.pad_id)

    def batch(self, step: int, micro: int, rank: int, world: int, batch_size: int, seed: int = 0):
        start = _check_position(step, micro, rank, world, batch_size, seed)
        return self._tensors(sample_ids(seed, step, start, batch_size, len(self.rows)))

    def eval_batches(self, batch_size: int):
        return (self._tensors(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size))


@torch.no_grad()
def accuracy(model: RewardModel, rows: PairRows, batch_size: int = 8) -> float:
    """Fraction of pairs whose chosen answer scores above the rejected one (ties count as wrong)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for ids, last in rows.eval_batches(batch_size):
        chosen, rejected = model(ids.to(device), last.to(device)).chunk(2)
        right += int((chosen > rejected).sum())
    model.train(was)
    return right / len(rows)


# ---------------------------------------------------------------- registered reward models

def rewards_dir(home=None) -> Path:
    return Registry(home).home / "rewards"


def save_reward_model(name: str, model: RewardModel, tokenizer: Tokenizer, meta: dict, home=None) -> Path:
    """Write PARLEY_HOME/rewards/NAME (weights, config, tokenizer), built beside it and renamed."""
    import shutil
    import tempfile

    if not NAME_PATTERN.match(name):
        raise ValueError(f"invalid reward model name {name!r}: lowercase letters, digits, '.', '_' or '-'")
    root = rewards_dir(home)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        save_file(_unique_state(model.body), tmp / "model.safetensors")
        with atomic_open(tmp / "config.json") as f:
            json.dump({"model": model.config.to_dict(), "meta": meta}, f, indent=2)
        tokenizer.save(tmp)
        target = root / name
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_reward_model(name: str, home=None) -> RewardModel:
    """A registered reward model, in eval mode, with its tokenizer: `.score(prompt, answer)`."""
    folder = rewards_dir(home) / name
    if not (folder / "config.json").is_file():
        known = sorted(p.name for p in rewards_dir(home).glob("*") if (p / "config.json").is_file())
        raise LookupError(f"no reward model named {name!r} in {rewards_dir(home)} (trained: {', '.join(known) or 'none'}): "
                          "train one with `parley train reward RECIPE.toml`")
    config = json.loads((folder / "config.json").read_text())
    body = Transformer(ModelConfig.from_dict(config["model"]))
    model = RewardModel(body, Tokenizer.from_dir(folder))
    body.load_state_dict(load_file(folder / "model.safetensors"), strict=False)  # a tied name is saved once
    model.meta = config.get("meta", {})
    return model.eval()


# ---------------------------------------------------------------- the stage

@dataclass
class RewardConfig:
    pairs: str = setting(help="training pairs (JSONL, parley/train/preferences.py)")
    heldout: str = setting(help="held-out pairs, never trained on: the accuracy is measured on them")
    run: str = setting(help="run folder: config, metrics, plot, checkpoints (must be new unless resume)")
    base: str = setting("smollm2", "registered model the reward model starts from")
    name: str = setting("", "register the reward model under this name ('' = the run folder's name)")
    resume: bool = setting(False, "continue the run in `run` from its newest checkpoint")
    more_pairs: list[str] = setting(factory=list, help="more training pairs files, read after `pairs` (e.g. a "
                                                       "constitutional run's pairs.jsonl; repeatable)")
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def main(cfg: RewardConfig) -> dict:
    t = cfg.train
    device = resolve_device(t.device)
    name = model_name(cfg)
    loaded = {}  # every file read and checked before the (slow) model load
    for what, path in [("pairs", cfg.pairs), ("heldout", cfg.heldout), *(("more_pairs", p) for p in cfg.more_pairs)]:
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} file {path} not found")
        loaded[path] = load_pairs(path)
    body, tokenizer, _ = Registry().load(cfg.base, dtype=torch.float32)
    if t.seq_len > body.config.max_position_embeddings:
        raise ValueError(f"train.seq_len {t.seq_len} is longer than {cfg.base}'s context "
                         f"({body.config.max_position_embeddings})")
    pairs = PairRows([p for path in [cfg.pairs, *cfg.more_pairs] for p in loaded[path]], tokenizer, t.seq_len)
    heldout = PairRows(loaded[cfg.heldout], tokenizer, t.seq_len)
    with torch.random.fork_rng(devices=[]):  # the head starts from train.seed
        torch.manual_seed(t.seed)
        model = RewardModel(body, tokenizer)
    params = add_adapters(body, cfg.lora, t.seed)
    if params is not None:  # the new head trains beside the adapters
        body.lm_head.weight.requires_grad_(True)
        params.append(body.lm_head.weight)
    model.to(device)
    with processes(device):
        run = claim_run(cfg)
        print(f"{cfg.base} + score head: {sum(p.numel() for p in (params or model.parameters())) / 1e6:.2f}M "
              f"trainable; {len(pairs)} training pairs ({pairs.dropped} over seq_len dropped), {len(heldout)} held out "
              f"({heldout.dropped} dropped)")
        before = accuracy(model, heldout, t.batch_size)

        def get_batch(step, micro, rank, world):
            return pairs.batch(step, micro, rank, world, t.batch_size, t.seed)

        final = train(model, t, run, get_batch, pairwise_loss, eval_batches=lambda: heldout.eval_batches(t.batch_size),
                      params=params, resume=cfg.resume)
        final.update(heldout_accuracy_before=before, heldout_accuracy=accuracy(model, heldout, t.batch_size),
                     heldout_pairs=len(heldout))
        print(f"held-out accuracy {before:.3f} before training, {final['heldout_accuracy']:.3f} after "
              f"({len(heldout)} pairs)")
        if cfg.lora.rank:
            merge_lora(body)
        meta = {"name": name, "base": cfg.base, "source": str(run), "pairs": [cfg.pairs, *cfg.more_pairs], "heldout": cfg.heldout,
                "final": {k: v for k, v in final.items() if isinstance(v, (int, float, str))}}
        with atomic_open(Path(run) / "reward.json") as f:
            json.dump(meta, f, indent=2)
        print(f"registered reward model {name}: {save_reward_model(name, model.float(), tokenizer, meta)}")
        return {**final, "reward_model": name}


if __name__ == "__main__":
    import sys

    from parley.config import parse_cli

    main(parse_cli(RewardConfig, sys.argv[1:], prog="parley train reward"))
