"""A tiny training run in its own process, for the tests that kill, resume or torchrun one.

    python tests/train_job.py run_dir=RUN [train.steps=30 moe=true resume=true hold_at=12 ...]
    torchrun --standalone --nproc-per-node 2 tests/train_job.py run_dir=RUN train.dtype=float32
    torchrun ... tests/train_job.py run_dir=A train.batch_size=2 -- run_dir=B train.grad_accum=2   # runs in turn

Batches are random tokens drawn from generators seeded by (step, sequence index). Each step has
one global batch of batch_size * grad_accum * world sequences, and process `rank` at micro-step
`micro` takes its slice: every way of splitting the same global batch sees the same data.
"""

from __future__ import annotations

import json
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parley.config import parse_cli, setting
from parley.model.transformer import ModelConfig, Transformer
from parley.train.loop import TrainConfig, train
from parley.train.losses import lm_loss

VOCAB = 96


def tiny_model(moe: bool = False, hidden: int = 32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    experts = dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.1) if moe else {}
    model = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, **experts))
    model.init_weights()
    return model


def tiny_chitchat(path, conversations: int = 240, seed: int = 0):
    """A chitchat-dataset file (the format `parley data prepare` reads) of made-up small talk:
    a corpus for the whole recipe (tokenizer, pretraining, SFT) that tests build offline in
    milliseconds. Returns the file."""
    rng = random.Random(seed)
    people, things = ["Ana", "Ben", "Chloe", "Dev", "Eli", "Fay"], ["tea", "rain", "books", "chess", "bikes", "jazz"]
    questions = ["Do you like {t}?", "What do you think of {t}?", "Have you tried {t} lately, {p}?", "Hi {p}, how are you?"]
    answers = ["I like {t} a lot.", "Not really, {t} is not for me.", "Yes! {t} makes my day, {p}.",
               "I am fine, thanks. I was reading about {t}."]
    data = {}
    for i in range(conversations):
        turns = []
        for k in range(rng.randint(2, 4)):
            words = dict(t=rng.choice(things), p=rng.choice(people))
            text = rng.choice(answers if k % 2 else questions).format(**words)
            turns.append([{"text": text, "sender": "ab"[k % 2]}])
        data[f"c{i}"] = {"messages": turns}
    Path(path).write_text(json.dumps(data))
    return Path(path)


def make_get_batch(cfg: TrainConfig, hold_at: int = 0):
    def get_batch(step: int, micro: int, rank: int, world: int):
        if hold_at and step == hold_at:  # park here until the test kills us: a kill at a known point, no timing
            print("holding", flush=True)
            while True:
                signal.pause()
        first = (micro * world + rank) * cfg.batch_size
        rows = [torch.randint(0, VOCAB, (cfg.seq_len + 1,), generator=torch.Generator().manual_seed(step * 100_003 + i))
                for i in range(first, first + cfg.batch_size)]
        x = torch.stack(rows)
        return x[:, :-1], x[:, 1:]
    return get_batch


def job_train_config(**changes) -> TrainConfig:
    settings = dict(steps=30, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=3, log_every=1, eval_every=0,
                    save_every=5)
    return TrainConfig(**{**settings, **changes})


@dataclass
class Job:
    run_dir: str = setting(help="run folder")
    train: TrainConfig = field(default_factory=job_train_config)
    moe: bool = setting(False, "a mixture-of-experts model")
    resume: bool = setting(False, "continue from the newest checkpoint")
    hold_at: int = setting(0, "block before this step's batch (0 = never), for a test to kill us")


def run(job: Job) -> dict:
    model = tiny_model(job.moe)
    return train(model, job.train, job.run_dir, make_get_batch(job.train, job.hold_at), lm_loss,
                 resume=job.resume, peak_flops=1e12)


def jobs(argv: list[str]) -> list[Job]:
    """The jobs of a command line: groups of settings separated by `--`, run in turn (one process
    start, and under torchrun one process group, for several runs)."""
    groups, group = [], []
    for arg in [*argv, "--"]:
        if arg != "--":
            group.append(arg)
        elif group:
            groups.append(group)
            group = []
    return [parse_cli(Job, group) for group in groups]


if __name__ == "__main__":
    from parley.train.stage import processes

    with processes(torch.device("cpu")):  # the runs join this group (train starts none of its own)
        for job in jobs(sys.argv[1:]):
            run(job)
