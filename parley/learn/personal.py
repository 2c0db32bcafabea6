"""`parley learn user=NAME`: a LoRA adapter of one user's own, trained on what their feedback
teaches (their edits and liked answers: parley/learn/feedback.py), kept only if a gate of its
own lets it through, and then served for that user's turns (engine/adapters.py).

    parley learn user=ann replay=DATA                 # train, gate, and store ann's adapter
    parley learn user=ann replay=DATA --dry-run       # what it would train on
    parley learn user=ann --forget                    # delete ann's adapter and training data

The gate: on the replay's held-out dialogs (dialogs-val.jsonl: general skills) the adapter's
loss may rise by at most `user_margin`, and on the user's own held-out feedback targets (every
`heldout_every`-th, never trained on) its loss must fall. Replay dialogs are mixed into training
(`replay_ratio` per feedback example) so the adapter does not forget what the model could do.

Where things go: the adapter in $PARLEY_HOME/adapters/MODEL/USER_ID/ (adapter.json + weights,
model/lora.py's save_adapter: rank, alpha, targets, base model and version, the round), the
round's data and decision in $PARLEY_HOME/learn/MODEL/users/USER_ID/round-NNN/. A user who opts
out (`parley users optout NAME`, PUT /api/me/personalization) or is deleted loses both
(`forget`): no adapter of theirs is served or kept, no data of theirs stays for training, and
their examples are taken out of the general rounds' folders too (withdrawal.withdraw).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch

from parley.files import atomic_open
from parley.learn.feedback import collect
from parley.learn.withdrawal import withdraw, write_jsonl as _jsonl
from parley.model.lora import apply_lora, save_adapter
from parley.registry import Registry, parley_home, store_target
from parley.train.data import ChatDataset
from parley.train.loop import evaluate, train
from parley.train.losses import lm_loss


def adapters_dir(model: str, home: str | Path | None = None) -> Path:
    """Where the users' adapters of `model` live: one folder per user id (the engine's adapter names)."""
    return (Path(home) if home else parley_home()) / "adapters" / model


def serving(model: str, registry: Registry) -> dict:
    """Engine.from_config's `adapters`: the users' adapters of the model's current version."""
    return {"folder": adapters_dir(model, registry.home), "base": model, "version": registry.stamp(model) or "v1"}


def adapter_for(engine, store, user_id: int) -> str:
    """The adapter a user's turns are served with: their own where the engine has one made for
    its model and version and the user has not opted out, else "" (the base model)."""
    name = str(user_id)
    if engine.adapters is None or not engine.adapters.servable(name) or not store.personalized(user_id):
        return ""
    return name


def data_dir(model: str, user_id: int, home: str | Path | None = None) -> Path:
    return (Path(home) if home else parley_home()) / "learn" / model / "users" / str(user_id)


def forget(user_id: int, home: str | Path | None = None) -> list[str]:
    """Delete every adapter and all training data of the user, for every model, and withdraw
    their examples from the general learning rounds (withdrawal.withdraw); the folders that changed."""

    home = Path(home) if home else parley_home()
    gone = []
    for folder in [*(home / "adapters").glob(f"*/{user_id}"), *(home / "learn").glob(f"*/users/{user_id}")]:
        if folder.is_dir():
            shutil.rmtree(folder)
            gone.append(str(folder))
    return gone + withdraw(user_id, home)


def _loss(model, tokenizer, path: Path, cfg) -> float:
    rows = ChatDataset(path, tokenizer, cfg.train.seq_len)
    return evaluate(model, cfg.train, lambda: rows.eval_batches(cfg.train.batch_size), lm_loss)


def main(cfg) -> dict:
    """One personal round for cfg.user (a parley.learn.rounds.LearnConfig); its decision."""
    from parley.store import Store

    registry = Registry()
    with Store(store_target(cfg.db or None)) as store:
        user = store.get_user_by_name(cfg.user)
        if user is None:
            raise ValueError(f"no user named {cfg.user!r}: `parley users list` shows who there is")
        if not store.personalized(user.id):
            raise ValueError(f"{cfg.user} has opted out of personalization: nothing of theirs is trained on")
        found = collect(store, "", user=cfg.user)
    replay = Path(cfg.replay) if cfg.replay else None
    if replay is None or not (replay / "dialogs-train.jsonl").is_file() or not (replay / "dialogs-val.jsonl").is_file():
        raise FileNotFoundError(f"replay={cfg.replay or '(none)'}: give a folder with dialogs-train.jsonl and "
                                "dialogs-val.jsonl (`parley data prepare DATA`): the gate's general loss")
    examples = [{"messages": e["messages"]} for e in found.sft]
    held = examples[cfg.heldout_every - 1::cfg.heldout_every] or examples[1:2]
    trained = [e for i, e in enumerate(examples) if not any(e is h for h in held)]
    print(f"{cfg.user}: {len(found.sft)} feedback targets ({len(trained)} to train on, {len(held)} held out), "
          f"{len(found.skipped)} left out")
    if cfg.dry_run:
        return {"dry_run": True, "user": cfg.user, "train": len(trained), "heldout": len(held)}
    if not trained or not held:
        raise ValueError(f"{cfg.user} has too little feedback for an adapter of their own: {len(examples)} edits or "
                         "liked answers; at least 2 are needed (one to train on, one to check it with)")
    folder = data_dir(cfg.model, user.id)
    folder.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(d.name.split("-")[1]) for d in folder.glob("round-*")), default=0)
    run = folder / f"round-{n:03d}"
    run.mkdir()
    lines = [x for x in (replay / "dialogs-train.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    rng = random.Random(cfg.train.seed)
    mix = trained + [json.loads(x) for x in rng.sample(lines, min(len(lines), round(cfg.replay_ratio * len(trained))))]
    rng.shuffle(mix)
    _jsonl(run / "train.jsonl", mix)
    _jsonl(run / "heldout.jsonl", held)

    model, tokenizer, _ = registry.load(cfg.model, dtype=torch.float32)
    general, mine = replay / "dialogs-val.jsonl", run / "heldout.jsonl"
    before = {"general": _loss(model, tokenizer, general, cfg), "user": _loss(model, tokenizer, mine, cfg)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        params = apply_lora(model, r=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                            targets=tuple(cfg.lora.targets))
    chats = ChatDataset(run / "train.jsonl", tokenizer, cfg.train.seq_len)
    train(model, cfg.train, run / "train", lambda step, micro, rank, world: chats.batch(
        step, micro, rank, world, cfg.train.batch_size, cfg.train.seed), lm_loss, params=params)
    after = {"general": _loss(model, tokenizer, general, cfg), "user": _loss(model, tokenizer, mine, cfg)}
    reasons = []
    if after["general"] > before["general"] + cfg.user_margin:
        reasons.append(f"general loss rose beyond the margin ({before['general']:.4f} -> {after['general']:.4f}, "
                       f"margin {cfg.user_margin})")
    if not after["user"] < before["user"]:
        reasons.append(f"the user's held-out feedback did not fit better ({before['user']:.4f} -> {after['user']:.4f})")
    version = registry.stamp(cfg.model) or "v1"
    decision = {"user": cfg.user, "user_id": user.id, "model": cfg.model, "base_version": version, "round": n,
                "before": before, "after": after, "kept": not reasons, "reasons": reasons,
                "counts": {"train": len(trained), "heldout": len(held), "replay": len(mix) - len(trained)},
                "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not reasons:
        save_adapter(adapters_dir(cfg.model) / str(user.id), model, base=cfg.model, base_version=version,
                     user_id=user.id, round=n, data=str(run))
    with atomic_open(run / "decision.json") as f:
        json.dump(decision, f, indent=1)
    print(f"{cfg.user}: adapter {'kept' if not reasons else 'refused: ' + '; '.join(reasons)} (general loss "
          f"{before['general']:.4f} -> {after['general']:.4f}, own held-out {before['user']:.4f} -> {after['user']:.4f})")
    return decision
