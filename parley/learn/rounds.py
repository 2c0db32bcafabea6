"""`parley learn`: one learning round. Users' feedback since the last round trains a LoRA
candidate (mixed with replay dialogs, so old skills are kept); the report card compares it with
the current version; it is promoted only if no gated metric falls beyond its margin AND the
feedback metric improves. Every round keeps its data, report and decision in its folder.

    parley learn replay=DATA                      # DATA: a `parley data prepare` folder (the SFT dialogs)
    parley learn replay=DATA --dry-run            # what it would train on; trains and writes nothing
    parley learn --list                           # every round: its data, its report card, the decision
    parley learn replay=DATA train.steps=100 lora.rank=8 --quick

The round folder ($PARLEY_HOME/learn/MODEL/round-NNN/): feedback.json (what was collected, and
what was left out and why), data/dialogs-train.jsonl (feedback targets + replay) and
data/dialogs-val.jsonl (replay), sft-heldout.jsonl and pairs-heldout.jsonl (held-out feedback:
the feedback metric), pairs.jsonl (every preference pair, parley/train/preferences.py's format),
against.jsonl, train/ (the SFT run, with adapter.safetensors), report.md/json/metrics.png, and
decision.json, written last: a round without it never finished and is ignored. Each feedback
row names its user (user_id): when a user opts out or is deleted, `withdraw` takes their rows
out (parley/learn/withdrawal.py) and writes withdrawn.json (how many, when; the report card says so too).

The feedback metric: the loss on held-out feedback targets (edits and liked answers not trained
on) must fall; when there are none, the accuracy on held-out preference pairs must rise.
A refused candidate is not kept as a version (its adapter stays in the round folder).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from parley.config import setting
from parley.files import NotRegularFile, atomic_open, read_regular
from parley.learn.feedback import Examples, collect
from parley.learn.report import EvalConfig, compare, model_metrics, pipeline_metrics, write_report
from parley.learn.withdrawal import WITHDRAWN, write_jsonl as _jsonl
from parley.registry import DEFAULT_MODEL, Registry, parley_home, store_target
from parley.train.loop import TrainConfig
from parley.train.preferences import jsonl_rows, write_pairs
from parley.train.sft import LoRAConfig


def _train_defaults() -> TrainConfig:
    return TrainConfig(steps=60, batch_size=4, seq_len=256, lr=5e-4, warmup_steps=5, eval_every=0, save_every=0,
                       eval_batches=4, device="cpu")


@dataclass
class LearnConfig:
    model: str = setting(DEFAULT_MODEL, "registered model that learns", positional="MODEL")
    replay: str = setting("", "folder with dialogs-train.jsonl and dialogs-val.jsonl (`parley data prepare`): "
                              "mixed in so old skills are kept, and the gate's dialog loss")
    replay_ratio: float = setting(2.0, "replay dialogs per feedback example in the training mix")
    heldout_every: int = setting(4, "every Nth feedback example and pair is held out for the feedback metric")
    db: str = setting("", "SQLite file or postgresql:// URL of the store ('' = PARLEY_HOME/parley.db)")
    dry_run: bool = setting(False, "show what the round would train on; train and write nothing")
    list: bool = setting(False, "list the rounds so far and their decisions")
    since: str = setting("", "read feedback written after this ISO time ('' = after the last round)")
    quick: bool = setting(False, "the report card's small subsets (tests)")
    limit: int = setting(24, "report card: requests per guard_heldout set answered by each model")
    user: str = setting("", "train this user's own adapter instead of a round for everyone (parley/learn/personal.py)")
    user_margin: float = setting(0.05, "user=NAME: most the adapter may raise the replay's held-out loss")
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=_train_defaults)

    def __post_init__(self):
        if self.replay_ratio < 0 or self.heldout_every < 2:
            raise ValueError(f"replay_ratio must be >= 0 and heldout_every >= 2; got {self.replay_ratio}, "
                             f"{self.heldout_every}")
        if not self.lora.rank:
            raise ValueError("parley learn trains LoRA adapters: lora.rank must be > 0")


def rounds_dir(model: str, home: str | Path | None = None) -> Path:
    return (Path(home) if home else parley_home()) / "learn" / model


def list_rounds(model: str, home: str | Path | None = None) -> list[dict]:
    """Every finished round of the model, oldest first: its decision.json with its folder."""
    out = []
    folder = rounds_dir(model, home)
    for d in sorted(folder.glob("round-*")) if folder.is_dir() else []:
        if (d / "decision.json").is_file():
            withdrawn = json.loads((d / WITHDRAWN).read_text()) if (d / WITHDRAWN).is_file() else []
            out.append({**json.loads((d / "decision.json").read_text()), "folder": str(d),
                        "withdrawn": sum(w["examples"] for w in withdrawn)})
    return out


def _row(example: dict) -> dict:
    """A feedback target as the round keeps it: the dialog, and whose it is (for `withdraw`)."""
    return {"messages": example["messages"], "user_id": example["user_id"]}


def _split(rows: list, every: int) -> tuple[list, list]:
    """(train, held out): every `every`-th row held out, at least one when there are two or more."""
    held = [r for i, r in enumerate(rows) if i % every == every - 1] or rows[1:2]
    return [r for r in rows if not any(r is h for h in held)], held


def _replay_dialogs(folder: Path) -> tuple[list[dict], bytes]:
    """The replay folder's training dialogs, every line checked, and its validation file's bytes:
    read before a round is claimed, so a bad file leaves no round folder behind."""
    train, rows = folder / "dialogs-train.jsonl", []
    for lineno, row in jsonl_rows(train, "replay dialogs"):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
            raise ValueError(f"{train}:{lineno}: expected {{\"messages\": [...]}}, a dialog as "
                             "`parley data prepare` writes it")
        rows.append(row)
    if not rows:
        raise ValueError(f"{train} holds no dialogs: replay needs the ones `parley data prepare` writes")
    try:
        val = read_regular(folder / "dialogs-val.jsonl")
    except NotRegularFile as e:
        raise ValueError(f"replay dialogs file {e}") from None
    return rows, val


def _replay(rows: list[dict], count: int, seed: int) -> list[dict]:
    return random.Random(seed).sample(rows, min(count, len(rows)))


def _claim(model: str) -> tuple[int, Path]:
    folder = rounds_dir(model)
    folder.mkdir(parents=True, exist_ok=True)
    n = max((int(d.name.split("-")[1]) for d in folder.glob("round-*")), default=0) + 1
    while True:
        try:
            (folder / f"round-{n:03d}").mkdir()
            return n, folder / f"round-{n:03d}"
        except FileExistsError:  # another round claimed it meanwhile
            n += 1


def gate(rows: dict[str, dict]) -> tuple[bool, list[str]]:
    """Promote? and why (or why not): every gated metric within its margin, and the feedback metric improved."""
    reasons = [f"{name} fell beyond its margin ({r['previous']:.4f} -> {r['value']:.4f}, margin {r['margin']})"
               for name, r in rows.items() if r["gated"] and r["within_margin"] is False]
    loss, pairs = rows["feedback_loss"], rows["pair_accuracy"]
    metric = loss if loss["delta"] is not None else pairs
    if metric["delta"] is None:
        reasons.append("no held-out feedback to measure the feedback metric on")
    elif not metric["improved"]:
        reasons.append(f"the feedback metric did not improve ({metric['previous']:.4f} -> {metric['value']:.4f})")
    return not reasons, reasons


def _describe(found: Examples) -> str:
    lines = [f"feedback: {json.dumps(found.counts())}"]
    for e in found.sft[:5]:
        lines.append(f"  sft ({e['source']}, {e['user']}): {e['messages'][-2]['content'][:60]!r} -> "
                     f"{e['messages'][-1]['content'][:60]!r}")
    for p in found.pairs[:5]:
        lines.append(f"  pair ({p.meta.get('user')}): {p.prompt[-1]['content'][:50]!r}: chosen "
                     f"{p.chosen[:40]!r} over {p.rejected[:40]!r}")
    for s in found.skipped[:5]:
        lines.append(f"  left out: turn {s['turn_id']} of {s['user']}: {s['reason']}")
    return "\n".join(lines)


def main(cfg: LearnConfig) -> dict:
    if cfg.user:
        from parley.learn import personal

        return personal.main(cfg)
    registry = Registry()
    if cfg.list:
        rounds = list_rounds(cfg.model)
        for r in rounds:
            print(f"round {r['round']:3}  {r['at']}  {'PROMOTED ' + r['version'] if r['promoted'] else 'refused':16} "
                  f"sft {r['counts'].get('sft', 0)}  pairs {r['counts'].get('pairs', 0)}  "
                  + (f"withdrawn {r['withdrawn']}  " if r["withdrawn"] else "") +
                  f"{'; '.join(r['reasons']) or 'every gated metric held, the feedback metric improved'}")
        if not rounds:
            print(f"no learning rounds of {cfg.model} yet (in {rounds_dir(cfg.model)})")
        return {"rounds": rounds}
    current = registry.versions(cfg.model)  # an unknown model is reported here
    replay = Path(cfg.replay) if cfg.replay else None
    if replay is None or not (replay / "dialogs-train.jsonl").exists() or not (replay / "dialogs-val.jsonl").exists():
        raise FileNotFoundError(f"replay={cfg.replay or '(none)'}: give a folder with dialogs-train.jsonl and "
                                f"dialogs-val.jsonl (`parley data prepare DATA`): replaying them keeps old skills")
    replay_rows, replay_val = _replay_dialogs(replay)
    done = list_rounds(cfg.model)
    since = cfg.since or (done[-1]["until"] if done else "")
    from parley.store import Store

    with Store(store_target(cfg.db or None)) as store:
        found = collect(store, since)
    print(_describe(found))
    if cfg.dry_run:
        print(f"dry run: would train {cfg.model} on {len(found.sft)} feedback targets (+ replay from {replay}); "
              f"nothing trained or written")
        return {"dry_run": True, "counts": found.counts()}
    n, folder = _claim(cfg.model)
    parent = next(v.label for v in current if v.current)
    decision = {"round": n, "model": cfg.model, "parent": parent, "since": since, "until": found.until,
                "counts": found.counts(), "promoted": False, "version": None}
    with atomic_open(folder / "feedback.json") as f:
        json.dump({"counts": found.counts(), "skipped": found.skipped}, f, indent=1)
    if found.pairs:
        write_pairs(folder / "pairs.jsonl", found.pairs)
    _jsonl(folder / "against.jsonl", found.against)
    train_sft, held_sft = _split(found.sft, cfg.heldout_every)
    train_pairs, held_pairs = _split(found.pairs, cfg.heldout_every)
    _jsonl(folder / "sft-heldout.jsonl", [_row(e) for e in held_sft])
    if held_pairs:
        write_pairs(folder / "pairs-heldout.jsonl", held_pairs)
    if not train_sft:
        return _decide(folder, decision, False, ["no feedback to train on since the last round"], registry)
    data = folder / "data"
    data.mkdir()
    mix = [_row(e) for e in train_sft]
    mix += _replay(replay_rows, round(cfg.replay_ratio * len(train_sft)), cfg.train.seed)
    random.Random(cfg.train.seed).shuffle(mix)
    _jsonl(data / "dialogs-train.jsonl", mix)
    (data / "dialogs-val.jsonl").write_bytes(replay_val)
    candidate = f"{cfg.model}.round-{n}"[:64]
    from parley.train import sft

    sft.main(sft.SFTConfig(data=str(data), run=str(folder / "train"), base=cfg.model, name=candidate,
                           lora=cfg.lora, train=cfg.train))
    evaluation = EvalConfig(model=cfg.model, dialogs=str(replay / "dialogs-val.jsonl"), feedback=str(folder),
                            quick=cfg.quick, limit=cfg.limit, seq_len=cfg.train.seq_len)
    cards = {}
    for label, name in (("candidate", candidate), (parent, cfg.model)):
        model, tokenizer, _ = registry.load(name)
        cards[label] = model_metrics(model, tokenizer, evaluation)
    shared = pipeline_metrics(cfg.quick)
    for card in cards.values():
        card.update(shared)
    rows = compare(cards["candidate"], cards[parent])
    promote, reasons = gate(rows)
    decision["metrics"] = rows
    write_report(folder, f"Learning round {n} of {cfg.model}: candidate vs {parent}", rows,
                 {"decision": "promote" if promote else "refuse", "reasons": reasons, "counts": found.counts()},
                 ("candidate", parent))
    if promote:
        version = registry.add_version(cfg.model, registry.path(candidate),
                                       {"round": n, "parent": parent, "note": f"learning round {n}",
                                        "report": str(folder / "report.md")})
        registry.promote(cfg.model, version.label)
        decision["version"] = version.label
    else:
        registry.remove(candidate)
    return _decide(folder, decision, promote, reasons, registry)


def _decide(folder: Path, decision: dict, promoted: bool, reasons: list[str], registry: Registry) -> dict:
    decision = {**decision, "promoted": promoted, "reasons": reasons, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_open(folder / "decision.json") as f:
        json.dump(decision, f, indent=1, default=str)
    verdict = f"promoted as {decision['model']} {decision['version']}" if promoted else "refused: " + "; ".join(reasons)
    print(f"round {decision['round']}: {verdict} ({folder})", file=sys.stderr)
    return decision
