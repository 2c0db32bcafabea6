"""Train the guard (parley/pipeline/guard.py) from parley/data/guard/, calibrate it, report it.

    parley train guard                             # the MiniLM head: ~15 min on 2 busy cores, writes $PARLEY_HOME/guard/
    parley train guard --design encoder          # top 2 MiniLM layers fine-tuned (~25 min, 1 busy thread): the shipped head
    parley train guard --design encoder --out parley/data/guard/guard_head.safetensors   # how it was made (round 4)
    parley train guard --design lora --precision bf16 --lora-examples 9600   # the second design (round 12), compared only
    parley train guard --trunk me5 --precision auto     # the head over multilingual-e5-small (round 5)
    parley train guard --trunk me5 --dropout 0.2 --gate-with EN.safetensors   # the shipped guard (round 6): the
                                                  # English head EN (--design encoder) and this one behind a language gate

Recipe (design "minilm"; design "encoder", which the repository ships since round 4, builds on it):
1. the written examples are cut by hash into five folds: fold 0 is never trained on ("unseen
   written" test), fold 1 is the calibration fold;
2. a head is trained on folds 2-4 and their generated variants (seeds 0-2), and the thresholds
   are set on fold 1 and its variants (seed 3): injection's is the lowest whose false-positive
   rate on innocent passage sentences there is within `max_fpr`, moved up halfway to the next
   one that loses recall (a margin against overfitting the fold); the eight principles share
   `max_fpr` of benign requests and answers refused, lowered step by step where a step catches
   the most harmful examples per benign one (`_joint_thresholds`). Since round 10 that budget is
   spent on requests alone, and answer sentences get thresholds of their own, the same way on the
   fold's answer rows with a budget `answer_fpr` (`calibrate_kinds`); behind a language gate the
   other-language head's request thresholds are set on the rows it scores, its answer thresholds
   (since round 11) on all answer rows, since a fifth of them are too few. Folds are cut by intent for
   intents.toml, so fold 1 holds intents the head never saw;
3. the head is retrained on folds 1-4 with the same settings and saved with those thresholds.

Design "encoder" (`train_encoder`) fits step 2's head over folds 2-4, then fine-tunes MiniLM's
top `tuned_layers` layers end to end with a new head on the same data, recalibrates on fold 1 and reports both the frozen
and the tuned model on the same splits; the tuned layers are saved with the head (8.2 MB for two
layers in float16), and the guard then embeds through them (`TunedEncoder`), sharing the
pipeline's pass for the layers below (`Embedder.encode_sharing`).

`--trunk me5` puts the head over multilingual-e5-small (parley/pipeline/e5.py) instead of
MiniLM: the encoder reads other languages itself, so no gloss; the guard file records the trunk
and the runtime guard loads mE5 beside the pipeline's MiniLM (a second embedding pass a message).

Design "lora" fine-tunes SmolLM2 (LoRA of rank 8 on every projection, a linear head on the hidden
state of the last token of the text followed by "\nVerdict:") on a sample of the same training data,
calibrates the same way and reports the same splits; with `--out` it writes its adapters, head and
thresholds, a file the pipeline's guard refuses (it has no runtime for this design: RESULTS.md,
Guard rounds 1 and 12).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from parley.config import ConfigError, parse_cli, setting
from parley.pipeline.guard import (INJECTION, LABELS, NGRAM_BUCKETS, PRINCIPLES, TRUNKS, GatedGuard, Guard, by_kind,
                                   features, readings, standardize, trained_path, tuned_encoder, write_head)
from parley.train.guard_data import Example, GuardDataError, Splits, data_sha256, load_all, split
from parley.train.loop import resolve_device


@dataclass
class GuardTrainConfig:
    data: str = setting("", "folder with requests.toml and injections.toml ('' = parley/data/guard)")
    out: str = setting("", "where to write the head ('' = $PARLEY_HOME/guard/guard_head.safetensors)")
    design: str = setting("minilm", "minilm (a head on the sentence embeddings), encoder (the same with MiniLM's top "
                                    "layers fine-tuned) or lora (SmolLM2 + LoRA, report only)")
    per_example: int = setting(3, "generated variants per written example and generator seed")
    hidden: int = setting(128, "hidden units of the head")
    epochs: int = setting(12, "passes over the training data")
    lr: float = setting(3e-3, "AdamW learning rate of the head")
    weight_decay: float = setting(1e-2, "AdamW weight decay")
    dropout: float = setting(0.0, "dropout on the features and the hidden units while training (0: none)")
    max_fpr: float = setting(0.03, "calibration: most benign requests of the calibration fold flagged (all labels together)")
    answer_fpr: float = setting(0.02, "calibration: most benign answer sentences of the calibration fold flagged (the "
                                      "output check's own thresholds; 0: answers judged by the requests' thresholds)")
    seed: int = setting(0, "initialisation seed")
    trunk: str = setting("minilm", "the sentence encoder under the head: minilm (the pipeline's) or me5 "
                                   "(multilingual-e5-small, reads other languages; design minilm only)")
    gate_with: str = setting("", "trunk=me5: a guard head over MiniLM (a file) that scores the plainly English texts; "
                                 "this head scores the rest, and the two are saved as one gated guard")
    precision: str = setting("fp32", "the encoder's arithmetic while training: fp32, bf16 or auto (bf16 with AMX)")
    tuned_layers: int = setting(2, "design=encoder: MiniLM's top layers fine-tuned (of 6)")
    tune_epochs: int = setting(1, "design=encoder: passes of the fine-tuning over the training data (2 over-fitted: "
                                  "RESULTS.md, Guard round 4)")
    encoder_lr: float = setting(5e-5, "design=encoder: AdamW learning rate of the tuned layers")
    lora_model: str = setting("smollm2", "design=lora: the imported model to fine-tune")
    lora_examples: int = setting(600, "design=lora: training examples sampled (0: all of the training split)")
    lora_steps: int = setting(0, "design=lora: optimizer steps (0: one pass over the sample)")
    lora_batch: int = setting(16, "design=lora: examples per optimizer step")
    lora_rank: int = setting(8, "design=lora: adapter rank on every projection (alpha twice the rank)")
    lora_device: str = setting("cpu", "design=lora: where it trains: cpu, cuda (bf16 autocast there) on a machine "
                                      "with a GPU, or auto (cuda where torch sees one), as train.device")
    lora_lr: float = setting(5e-4, "design=lora: AdamW peak learning rate of the adapters (the head's: 4x); warm-up "
                                   "over the first 5% of steps, cosine to a tenth")
    lora_eval_every: int = setting(1, "design=lora: calibrate and report on every n-th example of each split (CPU time)")


# --- labels, training, calibration, scoring -------------------------------------------------------


def targets(examples: list[Example]) -> np.ndarray:
    y = np.zeros((len(examples), len(LABELS)), dtype=np.float32)
    for i, e in enumerate(examples):
        if e.label:
            y[i, LABELS.index(e.label)] = 1.0
    return y


def fit_head(x: np.ndarray, y: np.ndarray, hidden: int, epochs: int, lr: float, weight_decay: float,
             seed: int, dropout: float = 0.0) -> dict[str, np.ndarray]:
    """The guard's MLP, minibatches of 128 with AdamW; positives weighted up by sqrt(negatives/positives);
    `dropout` on its input and hidden units while training (the saved head has none)."""
    if len(x) == 0:
        raise GuardDataError("no training examples: the guard data files are empty")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    pos = yt.sum(0)
    pos_weight = torch.sqrt((len(yt) - pos) / pos.clamp(min=1.0))
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                              torch.nn.Dropout(dropout), torch.nn.Linear(hidden, y.shape[1]))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=order)
        for i in range(0, len(xt), 128):
            idx = perm[i:i + 128]
            loss = F.binary_cross_entropy_with_logits(net(xt[idx]), yt[idx], pos_weight=pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: p.detach().numpy().copy() for k, p in zip(("w1", "b1", "w2", "b2"), net.parameters())}  # dropout has none


def spread(embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """The shift and scale `standardize` applies: each dimension's mean over the training rows,
    and one over its standard deviation times sqrt(dim), so the embedding part has a length of
    about 1 beside the n-grams' 1."""
    std = embeddings.std(axis=0).clip(min=1e-6)
    return {"shift": embeddings.mean(axis=0).astype(np.float32),
            "scale": (1.0 / (std * np.sqrt(embeddings.shape[1]))).astype(np.float32)}


def head_probs(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The head's probabilities for raw `features` (standardized here where the head says so)."""
    x = standardize(x, params)
    hidden = np.maximum(x @ params["w1"].T + params["b1"], 0.0)
    return _sigmoid(hidden @ params["w2"].T + params["b2"])


GRID = np.round(np.arange(0.05, 0.991, 0.005), 3)  # the thresholds calibration chooses from


def negatives(examples: list[Example], label: str) -> np.ndarray:
    """The benign examples a label's threshold must leave alone: requests and answers for a
    principle, passage sentences for injection."""
    kinds = ("passage",) if label == INJECTION else ("request", "answer")
    return np.array([e.label == "" and e.kind in kinds for e in examples])


def calibrate(probs: np.ndarray, examples: list[Example], max_fpr: float, joint: bool = True) -> np.ndarray:
    """Per label, the threshold described in the module docstring. A benign request is wrongly
    refused when any of the eight principles flags it: `joint` shares `max_fpr` among them where
    it buys the most recall (`_joint_thresholds`); otherwise each principle gets an eighth of it.
    Injection (one label) gets all of it."""
    grid = GRID
    out = []
    for k, label in enumerate(LABELS):
        budget = max_fpr if label == INJECTION else max_fpr / len(PRINCIPLES)
        pos = np.array([e.label == label for e in examples])
        neg = negatives(examples, label)
        if not pos.any() or not neg.any():
            out.append(0.5)
            continue
        fpr = np.array([(probs[neg, k] >= t).mean() for t in grid])
        recall = np.array([(probs[pos, k] >= t).mean() for t in grid])
        ok = np.flatnonzero(fpr <= budget)
        lo = ok[0] if len(ok) else len(grid) - 1
        hi = lo
        while hi + 1 < len(grid) and recall[hi + 1] >= recall[lo]:
            hi += 1
        out.append(float(grid[(lo + hi) // 2]))
    out = np.array(out, dtype=np.float32)
    if joint:
        out[:len(PRINCIPLES)] = _joint_thresholds(probs[:, :len(PRINCIPLES)], examples, max_fpr, grid)
    return out


def calibrate_kinds(probs: np.ndarray, examples: list[Example], max_fpr: float,
                    answer_fpr: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The thresholds for requests and passages (`calibrate` on every row but the answers), and
    the principles' thresholds for answer sentences (`answer_levels`), each at most the request's:
    a sentence refused as a request is stopped in an answer too (the greedy joint search can leave
    a principle at the top of the grid, as it left C3 at 0.99 in round 10's English head,
    RESULTS.md). The answer thresholds are None where `answer_levels` is: the requests' then judge
    answers too."""
    answer = np.array([e.kind == "answer" for e in examples], dtype=bool)
    thresholds = calibrate(probs[~answer], [e for e, a in zip(examples, answer) if not a], max_fpr)
    return thresholds, capped(answer_levels(probs, examples, answer_fpr), thresholds)


def answer_levels(probs: np.ndarray, examples: list[Example], answer_fpr: float) -> np.ndarray | None:
    """The principles' thresholds for answer sentences: `_joint_thresholds` on the answer rows
    alone, `answer_fpr` of the benign ones; None where `answer_fpr` is 0 or the rows hold no harmful
    or no benign answer."""
    answer = np.array([e.kind == "answer" for e in examples], dtype=bool)
    answers = [e for e, a in zip(examples, answer) if a]
    if answer_fpr <= 0 or not any(e.label for e in answers) or all(e.label for e in answers):
        return None
    return _joint_thresholds(probs[answer][:, :len(PRINCIPLES)], answers, answer_fpr, GRID)


def capped(levels: np.ndarray | None, thresholds: np.ndarray) -> np.ndarray | None:
    """A full row of answer thresholds: the principles' `levels`, each at most its request
    threshold in `thresholds`, and injection's from `thresholds`."""
    if levels is None:
        return None
    out = thresholds.copy()
    out[:len(PRINCIPLES)] = np.minimum(levels, thresholds[:len(PRINCIPLES)])
    return out


def limits(examples: list[Example], thresholds: np.ndarray, answer_thresholds: np.ndarray | None) -> np.ndarray:
    """(examples, labels): the thresholds each example is judged by, by its kind (`Guard.thresholds_for`)."""
    return by_kind([e.kind for e in examples], thresholds, thresholds if answer_thresholds is None else answer_thresholds)


def _joint_thresholds(probs: np.ndarray, examples: list[Example], max_fpr: float, grid: np.ndarray) -> np.ndarray:
    """The principles' thresholds lowered step by step from the top of `grid`, each time on the
    principle whose next step that catches more harmful examples catches the most per benign one
    newly refused (by any principle), while the benign examples refused stay within `max_fpr`."""
    harmful = np.array([e.kind != "passage" and e.label in PRINCIPLES for e in examples])
    benign = negatives(examples, PRINCIPLES[0])
    level = np.full(probs.shape[1], len(grid) - 1)  # index into grid per principle

    def counts(levels: np.ndarray) -> tuple[int, int]:
        flagged = (probs >= grid[levels]).any(axis=1)
        return int(flagged[harmful].sum()), int(flagged[benign].sum())

    caught, refused = counts(level)
    allowed = max_fpr * max(int(benign.sum()), 1)
    while True:
        best = None
        for k in np.flatnonzero(level > 0):
            trial = level.copy()
            while trial[k] > 0:  # down to the next step that catches more
                trial[k] -= 1
                c, r = counts(trial)
                if c > caught:
                    break
            if c <= caught or r > allowed:
                continue
            gain = (c - caught) / (r - refused + 1)
            if best is None or gain > best[0]:
                best = (gain, trial, c, r)
        if best is None:
            return grid[level].astype(np.float32)
        _, level, caught, refused = best


def report(probs: np.ndarray, examples: list[Example], thresholds: np.ndarray) -> dict:
    """Harmful recall, benign false positives, right-principle rate and recall per principle
    (requests), harmful and benign answer sentences flagged (answers), injection recall and
    innocent sentences removed (passages).
    `thresholds`: (labels,), or (examples, labels) where each example has its own (`thresholds_for`)."""
    thresholds = np.broadcast_to(thresholds, probs.shape)  # one row for all, or a row per example (a gated guard)
    flagged = probs >= thresholds
    k_inj = LABELS.index(INJECTION)
    harm = flagged[:, :k_inj].any(axis=1)
    margin = probs[:, :k_inj] / thresholds[:, :k_inj]
    named = [PRINCIPLES[i] for i in margin.argmax(axis=1)]
    out: dict = {}
    req = [i for i, e in enumerate(examples) if e.kind == "request"]
    bad = [i for i in req if examples[i].label]
    good = [i for i in req if not examples[i].label]
    caught = [i for i in bad if harm[i]]
    if bad:
        out["harmful_recall"] = (len(caught), len(bad))
        out["right_principle"] = (sum(named[i] == examples[i].label for i in caught), len(caught))
        out["per_principle"] = {p: (sum(harm[i] for i in bad if examples[i].label == p),
                                    sum(examples[i].label == p for i in bad)) for p in PRINCIPLES}
    if good:
        out["benign_flagged"] = (sum(harm[i] for i in good), len(good))
    answers = [i for i, e in enumerate(examples) if e.kind == "answer"]
    if answers:
        out["answer_recall"] = (sum(harm[i] for i in answers if examples[i].label),
                                sum(bool(examples[i].label) for i in answers))
        out["answer_flagged"] = (sum(harm[i] for i in answers if not examples[i].label),
                                 sum(not examples[i].label for i in answers))
    orders = [i for i, e in enumerate(examples) if e.label == INJECTION]
    innocent = [i for i, e in enumerate(examples) if e.kind == "passage" and not e.label]
    if orders:
        out["injection_recall"] = (int(flagged[orders, k_inj].sum()), len(orders))
    if innocent:
        out["innocent_removed"] = (int(flagged[innocent, k_inj].sum()), len(innocent))
    return out


def describe(name: str, figures: dict) -> str:
    def pct(pair):
        return f"{pair[0]}/{pair[1]} ({pair[0] / pair[1]:.1%})" if pair[1] else "0/0"

    parts = [f"{key.replace('_', ' ')} {pct(figures[key])}" for key in
             ("harmful_recall", "benign_flagged", "right_principle", "answer_recall", "answer_flagged",
              "injection_recall", "innocent_removed")
             if key in figures]
    return f"{name}: " + "; ".join(parts)


# --- design 1: a head on the MiniLM embeddings -----------------------------------------------------


def train_minilm(cfg: GuardTrainConfig, written: list[Example], embedder, english: Guard | None = None,
                 alone_out: Path | None = None) -> tuple[Guard, dict]:
    """Design "minilm" (over either trunk): the head of steps 1-3 and its figures. With `english`
    (a head over MiniLM, `--gate-with`), the result is a `GatedGuard`: `english` for plainly
    English texts, this head for the rest with thresholds set on the calibration rows it scores;
    the figures then report this head alone and, as "gated: ...", the two together, and this
    head alone (thresholds set on all calibration rows) is saved to `alone_out` for comparison."""
    s = split(written, per_example=cfg.per_example)
    cache: dict[str, np.ndarray] = {}

    def feats(examples: list[Example]) -> np.ndarray:
        todo = list(dict.fromkeys(e.text for e in examples if e.text not in cache))
        for i in range(0, len(todo), 512):
            chunk = todo[i:i + 512]
            for text, row in zip(chunk, features(chunk, embedder, cfg.trunk)):
                cache[text] = row
        if not examples:
            return np.zeros((0, embedder.dim + NGRAM_BUCKETS), np.float32)
        return np.stack([cache[e.text] for e in examples])

    hp = dict(hidden=cfg.hidden, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
              dropout=cfg.dropout)
    fit = feats(s.train_fit)
    scaling = spread(fit[:, :embedder.dim]) if cfg.trunk == "me5" else {}
    params = fit_head(standardize(fit, scaling), targets(s.train_fit), **hp)
    val_probs = head_probs(params | scaling, feats(s.val))
    thresholds, answer_thresholds = calibrate_kinds(val_probs, s.val, cfg.max_fpr, cfg.answer_fpr)
    params = fit_head(standardize(feats(s.train), scaling), targets(s.train), **hp) | scaling
    guard = Guard(params, thresholds, embedder, data_sha256(cfg.data or None), trunk=cfg.trunk,
                  answer_thresholds=answer_thresholds)
    figures = {"calibration fold": report(val_probs, s.val, limits(s.val, thresholds, answer_thresholds))}
    probs = {name: head_probs(params, feats(examples)) for name, examples in s.test.items()}
    for name, examples in s.test.items():
        figures[name] = report(probs[name], examples, limits(examples, thresholds, answer_thresholds))
    figures["sizes"] = {"train": len(s.train), "calibration": len(s.val), **{k: len(v) for k, v in s.test.items()}}
    if english is None:
        return guard, figures
    if alone_out is not None:
        print(f"saved the {cfg.trunk} head alone {guard.save(alone_out)}", flush=True)
    # the gate: `english` scores the plainly English texts; this head the rest, its thresholds set on the
    # calibration rows it will score
    routed = [not e for e in GatedGuard.routes([e.text for e in s.val])]
    other_val = [e for e, r in zip(s.val, routed) if r]
    other_thresholds, _ = calibrate_kinds(val_probs[routed], other_val, cfg.max_fpr, 0)
    # its answer thresholds on all the calibration fold's answer rows, which it scores as well: the
    # ones routed to it are about a fifth, too few to set them on (guard round 11, RESULTS.md)
    other_answers = capped(answer_levels(val_probs, s.val, cfg.answer_fpr), other_thresholds)
    other = Guard(params, other_thresholds, embedder, guard.data_sha256, trunk=cfg.trunk,
                  answer_thresholds=other_answers)
    gated = GatedGuard(english, other)
    for name, examples, mine in (("calibration fold", s.val, val_probs), *((n, s.test[n], probs[n]) for n in s.test)):
        texts = [e.text for e in examples]
        both = mine.copy()
        own = GatedGuard.routes(texts)
        if own.any():
            both[own] = english.probabilities([t for t, r in zip(texts, own) if r])
        figures[f"gated: {name}"] = report(both, examples, gated.thresholds_for(texts, [e.kind for e in examples]))
    return gated, figures


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))


# --- design 3: the same head with MiniLM's top layers fine-tuned ------------------------------------


def train_encoder(cfg: GuardTrainConfig, written: list[Example], embedder,
                  frozen_out: Path | None = None) -> tuple[Guard, dict, Guard]:
    """Stage 1 is design "minilm"'s head fitted on folds 2-4 over the frozen encoder ("frozen:"
    figures); stage 2 fine-tunes MiniLM's top `tuned_layers` layers and a new head together for
    `tune_epochs` ("tuned:" figures). Both are calibrated on fold 1 and reported on the same
    splits, so the two rows differ by the fine-tuning alone. Returns the tuned guard, the
    figures and the frozen stage-1 guard (saved at once to `frozen_out`), both
    as trained on folds 2-4 (no retrain on folds 1-4: it would double the CPU time)."""
    s = split(written, per_example=cfg.per_example)
    encoder = tuned_encoder(embedder, cfg.tuned_layers)
    everything = [s.train_fit, s.val, *s.test.values()]
    texts = list(dict.fromkeys(e.text for part in everything for e in part))
    read, grams = readings(texts, cfg.trunk)
    row = {t: i for i, t in enumerate(texts)}
    started = time.perf_counter()
    states = [h.to(torch.bfloat16) for h in encoder.bottom(read)]  # the frozen layers run once per text
    print(f"frozen layers over {len(texts)} texts: {time.perf_counter() - started:.0f} s", flush=True)

    def feats(examples: list[Example]) -> np.ndarray:
        idx = [row[e.text] for e in examples]
        with torch.inference_mode():
            emb = [encoder.pool([states[i] for i in idx[k:k + 256]]) for k in range(0, len(idx), 256)]
        emb = torch.cat(emb).numpy() if emb else np.zeros((0, encoder.dim), np.float32)
        return np.concatenate([emb, grams[idx]], axis=1)

    hp = dict(hidden=cfg.hidden, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
              dropout=cfg.dropout)
    params = fit_head(feats(s.train_fit), targets(s.train_fit), **hp)
    (frozen_thresholds, frozen_answers), figures = _calibrated("frozen", params, feats, s, cfg)
    frozen = Guard(params, frozen_thresholds, embedder, data_sha256(cfg.data or None), trunk=cfg.trunk,
                   answer_thresholds=frozen_answers)
    if frozen_out is not None:  # written before the long part, so a stopped run still leaves it
        print(f"saved the frozen head {frozen.save(frozen_out)}", flush=True)
    params = _tune(cfg, encoder, [states[row[e.text]] for e in s.train_fit],
                   grams[[row[e.text] for e in s.train_fit]], targets(s.train_fit))
    (thresholds, answer_thresholds), tuned = _calibrated("tuned", params, feats, s, cfg)
    figures |= tuned
    figures["sizes"] = {"train": len(s.train_fit), "calibration": len(s.val), **{k: len(v) for k, v in s.test.items()}}
    return (Guard(params, thresholds, encoder, data_sha256(cfg.data or None), trunk=cfg.trunk,
                  answer_thresholds=answer_thresholds), figures, frozen)


def _calibrated(name: str, params: dict, feats, s: Splits,
                cfg: GuardTrainConfig) -> tuple[tuple[np.ndarray, np.ndarray | None], dict]:
    val_probs = head_probs(params, feats(s.val))
    both = calibrate_kinds(val_probs, s.val, cfg.max_fpr, cfg.answer_fpr)
    figures = {f"{name}: calibration fold": report(val_probs, s.val, limits(s.val, *both))}
    for split_name, examples in s.test.items():
        figures[f"{name}: {split_name}"] = report(head_probs(params, feats(examples)), examples, limits(examples, *both))
    return both, figures


def _tune(cfg: GuardTrainConfig, encoder, states: list[torch.Tensor], grams: np.ndarray,
          y: np.ndarray) -> dict[str, np.ndarray]:
    """Fine-tune the encoder's top layers (AdamW at `encoder_lr`) together with a new head (at
    `lr`, initialised as stage 1's was) on the training examples, batches of 32, bf16 autocast
    where the CPU has fast bf16; returns the head's weights. A new head, not stage 1's: that
    one fits the training examples to a loss near 0, which leaves the encoder no gradient."""
    from parley.pipeline.embed import fast_bf16

    torch.manual_seed(cfg.seed)
    head = torch.nn.Sequential(torch.nn.Linear(grams.shape[1] + encoder.dim, cfg.hidden), torch.nn.ReLU(),
                               torch.nn.Linear(cfg.hidden, y.shape[1]))
    yt, gt = torch.from_numpy(y), torch.from_numpy(grams)
    pos = yt.sum(0)
    pos_weight = torch.sqrt((len(yt) - pos) / pos.clamp(min=1.0))
    optimizer = torch.optim.AdamW([{"params": encoder.top.parameters(), "lr": cfg.encoder_lr},
                                   {"params": head.parameters(), "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    encoder.top.train()
    started = time.perf_counter()
    for epoch in range(cfg.tune_epochs):
        perm = torch.randperm(len(yt), generator=order).tolist()
        for step, i in enumerate(range(0, len(perm), 32)):
            idx = perm[i:i + 32]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16()):
                x = torch.cat([encoder.pool([states[k] for k in idx]).float(), gt[idx]], dim=1)
                logits = head(x).float()
            loss = F.binary_cross_entropy_with_logits(logits, yt[idx], pos_weight=pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0:
                print(f"tune epoch {epoch} step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
    encoder.top.eval()
    return {k: p.detach().numpy().copy() for k, p in zip(("w1", "b1", "w2", "b2"), head.parameters())}


# --- design 2: SmolLM2 fine-tuned with LoRA as a classifier ------------------------------------------

LORA_FORMAT = "parley-guard-lora-1"
LORA_SUFFIX = "\nVerdict:"  # the last token, which reads the whole text (causal), is where the head looks
LORA_TOKENS = 64  # a text's tokens kept before the suffix


def lora_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    suffix = tokenizer.encode(LORA_SUFFIX)
    return [tokenizer.encode(t)[:LORA_TOKENS] + suffix for t in texts]


def lora_states(model, ids: list[list[int]]) -> torch.Tensor:
    """The last real token's final hidden state of each text (right-padded: causal attention keeps the padding
    out of every real position)."""
    from parley.train.reward import pad

    device = model.model.embed_tokens.weight.device
    batch, last = (t.to(device) for t in pad(ids, 0))
    return model.states(batch)[torch.arange(len(ids), device=device), last]


def buckets(examples: list[Example], size: int, rng: random.Random, pool: int = 50) -> list[list[int]]:
    """One pass over `examples` in batches of `size` indices: shuffled, then sorted by length within pools of `pool`
    batches so that a batch's texts are of a length (less padding), and the batches shuffled again."""
    order = rng.sample(range(len(examples)), len(examples))
    out = []
    for k in range(0, len(order), size * pool):
        chunk = sorted(order[k:k + size * pool], key=lambda i: len(examples[i].text))
        out += [chunk[j:j + size] for j in range(0, len(chunk), size)]
    rng.shuffle(out)
    return out


def train_lora(cfg: GuardTrainConfig, written: list[Example]) -> dict:
    """Design 2: LoRA (rank `lora_rank`, every projection) on the language model and a linear head on the last
    token's state, trained on a sample of the same training split with the same weighted loss, calibrated on
    the same fold by the same rule and reported on the same splits (every `lora_eval_every`-th example)."""
    from parley.model.lora import apply_lora, lora_state_dict
    from parley.pipeline.embed import resolve_precision
    from parley.registry import Registry

    s = split(written, per_example=cfg.per_example)
    n = cfg.lora_eval_every  # main checked it is >= 1
    s = Splits(s.train_fit, s.val[::n], s.train, {k: v[::n] for k, v in s.test.items()})
    model, tokenizer, _ = Registry().load(cfg.lora_model, dtype=torch.float32)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    params = apply_lora(model, r=cfg.lora_rank, alpha=2 * cfg.lora_rank)
    head = torch.nn.Linear(model.config.hidden_size, len(LABELS))
    device = resolve_device(cfg.lora_device, "lora_device")
    model.to(device)
    head.to(device)
    bf16 = device.type == "cuda" or resolve_precision(cfg.precision) == "bf16"

    def logits(texts: list[str]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return head(lora_states(model, lora_ids(tokenizer, texts))).float()

    sample = rng.sample(s.train_fit, min(cfg.lora_examples or len(s.train_fit), len(s.train_fit)))
    y = torch.from_numpy(targets(sample)).to(device)
    pos = y.sum(0)
    pos_weight = torch.sqrt((len(y) - pos) / pos.clamp(min=1.0))
    steps = cfg.lora_steps or -(-len(sample) // cfg.lora_batch)
    optimizer = torch.optim.AdamW([{"params": params, "lr": cfg.lora_lr},
                                   {"params": list(head.parameters()), "lr": 4 * cfg.lora_lr}], weight_decay=0.0)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min((k + 1) / warmup, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(k / steps, 1.0)))))
    batches = [b for _ in range(-(-steps * cfg.lora_batch // len(sample))) for b in buckets(sample, cfg.lora_batch, rng)]
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = batches[step]
        loss = F.binary_cross_entropy_with_logits(logits([sample[i].text for i in idx]), y[idx], pos_weight=pos_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"lora step {step}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    train_s = time.perf_counter() - start
    model.eval()

    @torch.no_grad()
    def probs(examples: list[Example]) -> np.ndarray:
        out = np.zeros((len(examples), len(LABELS)))
        by_length = sorted(range(len(examples)), key=lambda i: len(examples[i].text))  # little padding per batch
        for k in range(0, len(examples), 32):
            rows = by_length[k:k + 32]
            out[rows] = torch.sigmoid(logits([examples[i].text for i in rows])).double().cpu().numpy()
        return out

    t0 = time.perf_counter()
    val_probs = probs(s.val)
    per_text_ms = (time.perf_counter() - t0) / max(len(s.val), 1) * 1000
    both = calibrate_kinds(val_probs, s.val, cfg.max_fpr, cfg.answer_fpr)
    figures = {"calibration fold": report(val_probs, s.val, limits(s.val, *both))}
    for name, examples in s.test.items():
        figures[name] = report(probs(examples), examples, limits(examples, *both))
        print(describe(name, figures[name]), flush=True)
    figures["lora"] = {"train_examples": len(sample), "steps": steps, "train_s": round(train_s, 1),
                       "batched_ms_per_text": round(per_text_ms, 1), "bf16": bf16}
    if cfg.out:
        tensors = {f"lora.{k}": v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
        tensors |= {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        tensors["thresholds"] = torch.from_numpy(np.ascontiguousarray(both[0]))
        if both[1] is not None:
            tensors["answer_thresholds"] = torch.from_numpy(np.ascontiguousarray(both[1]))
        meta = {"format": LORA_FORMAT, "labels": json.dumps(list(LABELS)), "model": cfg.lora_model,
                "rank": str(cfg.lora_rank), "data_sha256": data_sha256(cfg.data or None)}
        print(f"saved {write_head(cfg.out, tensors, meta)}")
    return figures


# --- the command -------------------------------------------------------------------------------------


def main(cfg: GuardTrainConfig) -> int:
    if cfg.design not in ("minilm", "encoder", "lora"):
        raise GuardDataError(f"design must be minilm, encoder or lora, got {cfg.design!r}")
    if cfg.trunk not in TRUNKS:
        raise GuardDataError(f"trunk must be one of {', '.join(TRUNKS)}, got {cfg.trunk!r}")
    if cfg.gate_with and cfg.trunk != "me5":
        raise GuardDataError("--gate-with puts a head over mE5 behind a language gate: it needs --trunk me5")
    if cfg.trunk != "minilm" and cfg.design != "minilm":
        raise GuardDataError(f"--trunk {cfg.trunk} is built for design=minilm (a head on the frozen embeddings) "
                             f"only, not design={cfg.design}; leave --trunk at minilm")
    if cfg.design == "lora" and (cfg.lora_examples < 0 or cfg.lora_steps < 0 or cfg.lora_batch < 1 or cfg.lora_rank < 1
                                 or cfg.lora_lr <= 0 or cfg.lora_eval_every < 1):
        raise GuardDataError("design=lora needs lora_examples and lora_steps >= 0, lora_batch, lora_rank and "
                             "lora_eval_every >= 1 and lora_lr > 0")
    if cfg.design == "lora":
        try:
            resolve_device(cfg.lora_device, "lora_device")
        except ConfigError as e:
            raise GuardDataError(f"design=lora: {e}") from None
    if cfg.design == "encoder" and (not 1 <= cfg.tuned_layers <= 6 or cfg.tune_epochs < 1 or cfg.encoder_lr <= 0):
        raise GuardDataError("design=encoder needs tuned_layers in 1..6, tune_epochs >= 1 and encoder_lr > 0")
    if (cfg.per_example < 0 or cfg.epochs < 1 or cfg.hidden < 1 or not 0 < cfg.max_fpr < 1 or not 0 <= cfg.answer_fpr < 1
            or not 0 <= cfg.dropout < 1):
        raise GuardDataError("per_example must be >= 0, epochs and hidden >= 1, max_fpr in (0, 1), answer_fpr in [0, 1) "
                             "and dropout in [0, 1)")
    written = load_all(cfg.data or None)
    start = time.perf_counter()
    if cfg.design == "lora":
        figures = train_lora(cfg, written)
    else:
        from parley.pipeline.e5 import load_e5
        from parley.pipeline.embed import Embedder

        embedder = load_e5(precision=cfg.precision) if cfg.trunk == "me5" else Embedder.load(precision=cfg.precision)
        out = Path(cfg.out or trained_path())
        if cfg.design == "encoder":
            frozen_out = out.with_suffix(".frozen" + out.suffix)
            guard, figures, frozen = train_encoder(cfg, written, embedder, frozen_out)
            print("the frozen head's thresholds: " + ", ".join(f"{k}={t:.2f}" for k, t in zip(LABELS, frozen.thresholds)))
        else:
            english = Guard.load(cfg.gate_with, Embedder.load(precision=cfg.precision)) if cfg.gate_with else None
            if english is not None and english.trunk != "minilm":
                raise GuardDataError(f"--gate-with wants a head over MiniLM (the English side of the gate); "
                                     f"{cfg.gate_with} is a head over {english.trunk!r}")
            guard, figures = train_minilm(cfg, written, embedder, english, out.with_suffix(f".{cfg.trunk}" + out.suffix))
        print(f"saved {guard.save(out)}")
        for name, head in (("", guard), *((("the other-language head's ", guard.other),)
                                           if isinstance(guard, GatedGuard) else ())):
            print(f"{name}thresholds: " + ", ".join(f"{k}={t:.2f}" for k, t in zip(LABELS, head.thresholds)))
            print(f"{name}answer thresholds: " + ", ".join(f"{k}={t:.2f}" for k, t in zip(LABELS, head.answer_thresholds)))
    print(f"design {cfg.design}, {len(written)} written examples, {time.perf_counter() - start:.0f} s")
    for name, fig in figures.items():
        print(describe(name, fig) if name not in ("sizes", "lora") else f"{name}: {fig}")
        if "per_principle" in fig:
            print("  per principle: " + ", ".join(f"{p} {a}/{n}" for p, (a, n) in fig["per_principle"].items()))
    return 0


def train_guard_main(argv: list[str]) -> int:
    """`parley train guard [--data DIR] [--out FILE] [--design minilm|encoder|lora] [--trunk minilm|me5]`."""
    return main(parse_cli(GuardTrainConfig, argv, prog="parley train guard"))
