"""The training loop: it learns, resumes exactly after a kill, splits batches across processes
and micro-steps without changing the result, trains MoE routers, and writes its run folder."""

import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_job import VOCAB, Job, job_train_config, make_get_batch, run, tiny_chitchat, tiny_model

from parley import cli
from parley.config import ConfigError, parse_cli
from parley.model.lora import apply_lora
from parley.model.transformer import ModelConfig
from parley.model.weights import load_checkpoint
from parley.train import loop, pretrain, sft
from parley.train.loop import TrainConfig, latest_checkpoint, lr_multiplier, train
from parley.train.losses import lm_loss, next_token_loss, router_loss

pytestmark = pytest.mark.usefixtures("one_thread")
JOB = Path(__file__).with_name("train_job.py")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest and immune to busy neighbours


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def fixed_batch(step, micro, rank, world):
    x = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))
    return x[:, :-1], x[:, 1:]


def test_overfits_one_batch(tmp_path):
    cfg = job_train_config(steps=50, warmup_steps=5, save_every=0)
    final = train(tiny_model(), cfg, tmp_path, fixed_batch, lm_loss, peak_flops=1e12)
    first = losses(tmp_path)[1]
    assert first == pytest.approx(math.log(VOCAB), rel=0.05)  # a fresh model guesses uniformly
    assert final["step"] == 50 and final["loss"] < 0.5 * first


def test_next_token_loss_masks_positions():
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1], mask[1, 3] = True, True
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    assert torch.allclose(next_token_loss(logits, targets, mask), expected)
    whole = torch.nn.functional.cross_entropy(logits.view(10, 7), targets.view(10))
    assert torch.allclose(next_token_loss(logits, targets), whole)
    empty = next_token_loss(logits.requires_grad_(), targets, torch.zeros_like(mask))
    empty.backward()  # no target at all still gives a graph: DDP needs every rank's backward
    assert empty.item() == 0.0


def test_schedule_warmup_decay_and_end():
    cfg = TrainConfig(steps=101, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)  # 1/10 of the way up
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg) == pytest.approx(0.55)  # halfway through the decay
    assert lr_multiplier(25, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 6)))
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)  # the last step ends on the floor
    linear = TrainConfig(steps=101, warmup_steps=10, min_lr_ratio=0.1, schedule="linear")
    assert [lr_multiplier(s, linear) for s in (25, 55, 100)] == pytest.approx([0.85, 0.55, 0.1])
    constant = TrainConfig(steps=101, warmup_steps=10, schedule="constant")
    assert lr_multiplier(100, constant) == 1.0


def test_resume_after_kill_repeats_the_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    run(Job(run_dir=str(reference)))  # 30 steps, checkpoints every 5
    killed = tmp_path / "killed"
    # hold_at=13 parks it in get_batch of the 14th step (0-based 13): checkpoint 10 written, 11-13 logged
    proc = subprocess.Popen([sys.executable, str(JOB), f"run_dir={killed}", "hold_at=13"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in proc.stdout:
            if line.strip() == "holding":
                break
        else:
            pytest.fail(f"training process ended early: {proc.wait()} {proc.stderr.read()}")
        assert latest_checkpoint(killed).name == "step-000010"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert max(losses(killed)) == 13  # logged past the checkpoint; the resumed run must forget that
    final = run(Job(run_dir=str(killed), resume=True))
    assert final["step"] == 30
    got, want = losses(killed), losses(reference)
    assert sorted(got) == list(range(1, 31))
    assert got == pytest.approx(want, abs=1e-6)
    a = load_file(killed / "checkpoints/step-000030/model.safetensors")
    b = load_file(reference / "checkpoints/step-000030/model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    run(Job(run_dir=str(tmp_path), train=job_train_config(steps=4, save_every=0)))
    before = (tmp_path / "metrics.jsonl").read_text()
    assert run(Job(run_dir=str(tmp_path), train=job_train_config(steps=4, save_every=0), resume=True))["step"] == 4
    assert (tmp_path / "metrics.jsonl").read_text() == before


def _final_weights(run_dir):
    return load_file(latest_checkpoint(run_dir) / "model.safetensors")


DDP = [(2, 1, "adamw"), (1, 2, "adamw"), (1, 2, "muon")]  # (batch_size, grad_accum, optimizer)
DDP_FP32 = dict(dtype="float32", steps=6, save_every=0)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[tuple, Path]:
    """Each of DDP trained by two torchrun processes, one after the other in one launch (a launch
    costs three interpreters' imports): its run folder by its settings."""
    root = tmp_path_factory.mktemp("ddp")
    folders = {case: root / "-".join(map(str, case)) for case in DDP}
    argv = []
    for (batch_size, grad_accum, optimizer), folder in folders.items():
        argv += ["--", f"run_dir={folder}", f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}",
                 f"train.optimizer={optimizer}", *(f"train.{k}={v}" for k, v in DDP_FP32.items())]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(JOB), *argv[1:]], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folders


# (1, 2) skips DDP's sync on micro-step 1; with Muon each rank orthogonalizes the same all-reduced gradient
@pytest.mark.parametrize("batch_size, grad_accum, optimizer", DDP)
def test_torchrun_two_processes_equal_one_process(ddp_runs, tmp_path, batch_size, grad_accum, optimizer):
    fp32 = dict(DDP_FP32, optimizer=optimizer)
    ddp = ddp_runs[batch_size, grad_accum, optimizer]
    tokens = [json.loads(line)["tokens"] for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert tokens[0] == 4 * 16  # a global batch of 4 sequences over two processes
    one = tmp_path / "one"  # the same global batch of 4 in one process, whole
    run(Job(run_dir=str(one), train=job_train_config(**fp32, batch_size=4)))
    accum = tmp_path / "accum"  # ... and as two micro-batches of 2
    run(Job(run_dir=str(accum), train=job_train_config(**fp32, batch_size=2, grad_accum=2)))
    for other in (one, accum):
        assert losses(ddp) == pytest.approx(losses(other), rel=1e-5)
        a, b = _final_weights(ddp), _final_weights(other)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    written = {"checkpoints", "metrics.jsonl"} | ({"loss.png"} if importlib.util.find_spec("matplotlib") else set())
    assert {p.name for p in ddp.iterdir()} == written  # rank 0 alone writes


def test_moe_router_loss_is_trained_and_every_expert_gets_tokens(tmp_path):
    model = tiny_model(moe=True)
    inputs, targets = make_get_batch(job_train_config())(0, 0, 0, 1)
    loss, metrics = lm_loss(model, (inputs, targets))
    logits, router_logits = model(inputs, return_router_logits=True)
    aux = router_loss(router_logits, model.config).item()
    assert float(metrics["router"]) == pytest.approx(aux) and aux > 0
    assert loss.item() == pytest.approx(next_token_loss(logits, targets).item() + aux, rel=1e-6)

    tokens = {}
    for layer, block in enumerate(model.model.layers):
        for e, expert in enumerate(block.block_sparse_moe.experts):
            expert.register_forward_hook(lambda m, args, out, key=(layer, e):
                                         tokens.__setitem__(key, tokens.get(key, 0) + args[0].shape[0]))
    gate_before = model.model.layers[0].block_sparse_moe.gate.weight.detach().clone()
    cfg = job_train_config(steps=10, save_every=0)
    final = train(model, cfg, tmp_path, make_get_batch(cfg), lm_loss, peak_flops=1e12)
    assert len(tokens) == 2 * 4 and min(tokens.values()) > 0
    assert final["loss"] == pytest.approx(final["ce"] + final["router"], rel=1e-5)
    assert final["router"] > 0
    assert not torch.equal(gate_before, model.model.layers[0].block_sparse_moe.gate.weight)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    cfg = job_train_config(steps=2, save_every=1)
    train(tiny_model(hidden=32), cfg, tmp_path, make_get_batch(cfg), lm_loss, peak_flops=1e12)
    with pytest.raises(ValueError, match="different model.*hidden_size 32 != 64"):
        train(tiny_model(hidden=64), job_train_config(steps=4), tmp_path, make_get_batch(cfg), lm_loss,
              resume=True, peak_flops=1e12)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny_model(), cfg, tmp_path, make_get_batch(cfg), lm_loss, peak_flops=1e12)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = job_train_config(steps=6, save_every=2, eval_every=3, eval_batches=2)
    real_save = torch.save

    def save(obj, path, *args, **kw):
        if obj.get("step") == 4:  # die half-way through writing the second checkpoint
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")
        real_save(obj, path, *args, **kw)

    monkeypatch.setattr(loop.torch, "save", save)
    evals = lambda: (make_get_batch(cfg)(1000 + i, 0, 0, 1) for i in range(4))  # noqa: E731
    with pytest.raises(OSError, match="disk full"):
        train(tiny_model(), cfg, tmp_path, make_get_batch(cfg), lm_loss, evals, peak_flops=1e12)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-000002"]
    model, meta = load_checkpoint(latest_checkpoint(tmp_path))  # loadable as a plain Parley checkpoint
    assert meta["step"] == 2 and model.config.hidden_size == 32

    monkeypatch.setattr(loop.torch, "save", real_save)
    final = train(tiny_model(), cfg, tmp_path, make_get_batch(cfg), lm_loss, evals, resume=True, peak_flops=1e12)
    assert final["step"] == 6 and math.isfinite(final["val_loss"])
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())  # stale temp removed
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert records[0]["lr"] == pytest.approx(cfg.lr * lr_multiplier(0, cfg))
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_keeps_only_the_newest_checkpoints(tmp_path):
    cfg = job_train_config(steps=7, save_every=2, keep_checkpoints=2)
    train(tiny_model(), cfg, tmp_path, make_get_batch(cfg), lm_loss, peak_flops=1e12)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000006", "step-000007"]


def test_flops_per_token_counts_matmul_weights_and_attention():
    dense, moe = tiny_model(), tiny_model(moe=True)
    cfg = dense.config
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size  # tied embedding: lm_head's matmul counts once
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 16
    assert loop.flops_per_token(dense, 16) == 6 * (cfg.num_params() - norms) + attention
    assert loop.flops_per_token(moe, 16) == 6 * (moe.config.num_params(active=True) - norms) + attention


def test_evaluate_is_the_mean_over_the_first_eval_batches():
    model, cfg = tiny_model(), job_train_config(dtype="float32", eval_batches=3)
    batches = [make_get_batch(cfg)(s, 0, 0, 1) for s in range(5)]
    want = sum(lm_loss(model, b)[0].item() for b in batches[:3]) / 3
    assert model.training and loop.evaluate(model, cfg, lambda: iter(batches), lm_loss) == pytest.approx(want)
    assert model.training  # back in the mode it was in


class Bigram(torch.nn.Module):
    """Not a Transformer: the loop must still train, save and resume it (tied weights included)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.out = torch.nn.Linear(16, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(self.embed(ids))


def bigram_loss(model, batch):
    return next_token_loss(model(batch[0]), batch[1]), {}


def test_any_module_trains_saves_and_resumes(tmp_path):
    cfg = job_train_config(steps=6, save_every=3, schedule="constant", warmup_steps=2)
    train(Bigram(), cfg, tmp_path / "whole", make_get_batch(cfg), bigram_loss, peak_flops=1e12)
    # stopped after 3 steps: a constant schedule after the same warm-up, so the schedules agree
    train(Bigram(), job_train_config(steps=3, save_every=3, schedule="constant", warmup_steps=2), tmp_path / "half",
          make_get_batch(cfg), bigram_loss, peak_flops=1e12)
    train(Bigram(), cfg, tmp_path / "half", make_get_batch(cfg), bigram_loss, resume=True, peak_flops=1e12)
    assert losses(tmp_path / "half") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)
    assert list(load_file(latest_checkpoint(tmp_path / "half") / "model.safetensors")) == ["embed.weight"]


def test_device_auto_is_the_gpu_when_there_is_one_else_the_cpu(tmp_path):
    want = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert loop.resolve_device("auto") == want
    assert loop.resolve_device("cpu") == torch.device("cpu")
    model = tiny_model()
    train(model, job_train_config(steps=1, save_every=0, device="cpu"), tmp_path, fixed_batch, lm_loss,
          peak_flops=1e12)
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="train.device=cuda, but torch sees no CUDA GPU.*set train.device=cpu"):
        train(tiny_model(), job_train_config(device="cuda"), tmp_path / "run", fixed_batch, lm_loss)
    assert not (tmp_path / "run").exists()
    stage = ["data=nowhere", f"run={tmp_path / 'stage'}", "train.device=cuda"]  # refused before data or model
    with pytest.raises(ConfigError, match="train.device=cuda"):
        pretrain.main(parse_cli(pretrain.PretrainConfig, [*stage, "tokenizer=nowhere"]))
    with pytest.raises(ConfigError, match="train.device=cuda"):
        sft.main(parse_cli(sft.SFTConfig, [*stage, "base=no-such-model"]))
    assert not (tmp_path / "stage").exists()
    with pytest.raises(ConfigError, match="expected auto, cpu or cuda"):
        loop.resolve_device("tpu")
    with pytest.raises(ConfigError, match="device: expected"):
        parse_cli(TrainConfig, ["device=gpu"])


# ---------------------------------------------------------------- the stages as a newcomer meets them

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and token shards of a made-up chitchat corpus, built with the real commands."""
    root = tmp_path_factory.mktemp("corpus")
    chitchat = tiny_chitchat(root / "chitchat.json")
    data, tokenizer = root / "corpus", root / "tokenizer"
    source = ["sources=chitchat", f"location=chitchat={chitchat}", "val_fraction=0.2"]
    assert cli.main(["data", "prepare", str(data), *source]) == 0
    assert cli.main(["train", "tokenizer", f"data={data}", f"out={tokenizer}", "vocab_size=400"]) == 0
    assert cli.main(["data", "prepare", str(data), f"--tokenizer={tokenizer}", *source]) == 0
    return data, tokenizer


def pretrain_args(corpus, run, *extra) -> list[str]:
    data, tokenizer = corpus
    return [str(ROOT / "recipes" / "pretrain-tiny.toml"),
            f"data={data}", f"tokenizer={tokenizer}", f"run={run}", "model.depth=1", "train.steps=3",
            "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.log_every=1",
            "train.dtype=float32", *extra]


def test_torchrun_two_processes_on_a_fresh_run_folder(corpus, tmp_path):
    """Both processes used to create the folder and write its config, and the slower one stopped
    with 'already exists'."""
    home, run_dir = tmp_path / "home", tmp_path / "runs" / "ddp"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "parley", "train", "pretrain", *pretrain_args(corpus, run_dir, "name=ddp")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**ENV, "PARLEY_HOME": str(home), "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3]  # logged once, by the first process
    assert (run_dir / "config.toml").is_file() and latest_checkpoint(run_dir).name == "step-000003"
    said = [line for line in result.stdout.splitlines() if line.startswith("registered ")]
    assert said == ["registered ddp: parley chat model=ddp"]
    suggestion = shlex.split(said[0].split(": ", 1)[1])[1:]
    assert cli.load_settings(cli.parse_args(suggestion)).model == "ddp"  # the suggested command is real


@pytest.mark.parametrize("bad, says", [
    ("train.lr=-1", "lr and muon_lr must be positive"), ("train.beta2=1.5", "beta1 and beta2"),
    ("train.weight_decay=-0.1", "weight_decay must be >= 0"), ("model.experts=1", "experts must be 0"),
    ("model.experts_per_token=9", "experts_per_token"), ("train.seq_len=4096", "train.seq_len 4096 is longer"),
    ("name=Not A Name", "invalid model name"), ("model.init_std=0", "init_std must be positive")])
def test_bad_values_are_refused_before_the_run_folder_is_made(corpus, tmp_path, capsys, bad, says):
    run_dir = tmp_path / "run"
    extra = [bad, "model.experts=4"] if "experts_per_token" in bad else [bad]
    assert cli.main(["train", "pretrain", *pretrain_args(corpus, run_dir, *extra)]) == 2
    assert says in capsys.readouterr().err
    assert not run_dir.exists()


def test_a_failed_start_does_not_block_the_rerun(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("# left by a start that failed before its first checkpoint\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    assert cli.main(["train", "pretrain", *pretrain_args(corpus, run_dir, "name=rerun")]) == 0
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3]
    capsys.readouterr()
    assert cli.main(["train", "pretrain", *pretrain_args(corpus, run_dir, "name=rerun")]) == 2  # now it holds a run
    assert "already holds a trained run: pass resume=true" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main(["train", "pretrain", *pretrain_args(corpus, other)]) == 2
    assert "holds other files (notes.txt)" in capsys.readouterr().err


def test_train_seed_fixes_the_initial_weights_and_the_losses(corpus, tmp_path, monkeypatch):
    shape = ModelConfig.from_depth(1, 400, 64)
    torch.manual_seed(1)
    a = pretrain.build_model(shape, 0.02, seed=0).state_dict()
    torch.manual_seed(2)  # whatever the process did before
    b = pretrain.build_model(shape, 0.02, seed=0).state_dict()
    c = pretrain.build_model(shape, 0.02, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    for i, run_dir in enumerate((tmp_path / "one", tmp_path / "two")):
        torch.manual_seed(100 + i)
        assert cli.main(["train", "pretrain", *pretrain_args(corpus, run_dir, f"name=seeded-{i}")]) == 0
    assert losses(tmp_path / "one") == losses(tmp_path / "two")  # equal, not close: the same computation
    data, _ = corpus
    for i, run_dir in enumerate((tmp_path / "sft-one", tmp_path / "sft-two")):  # LoRA's A starts random too
        torch.manual_seed(200 + i)
        assert cli.main(["train", "sft", str(ROOT / "recipes" / "sft-chitchat.toml"), f"data={data}",
                         f"run={run_dir}", "base=seeded-0", "train.steps=2", "train.batch_size=2",
                         "train.seq_len=32", "train.eval_batches=1", "train.log_every=1",
                         "train.dtype=float32"]) == 0
    assert losses(tmp_path / "sft-one") == losses(tmp_path / "sft-two")


def test_a_warmup_longer_than_the_run_is_clamped_with_a_warning(tmp_path, capsys):
    cfg = job_train_config(steps=20, warmup_steps=100, save_every=0)
    train(tiny_model(), cfg, tmp_path, fixed_batch, lm_loss, peak_flops=1e12)
    assert ("train.warmup_steps=100 is not shorter than train.steps=20: warming up over 2 steps instead"
            in capsys.readouterr().out)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert lrs[:2] == pytest.approx([cfg.lr / 2, cfg.lr]) and lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_the_progress_line_shows_the_router_loss_of_a_moe(tmp_path, capsys):
    cfg = job_train_config(steps=2, save_every=0)
    train(tiny_model(moe=True), cfg, tmp_path, make_get_batch(cfg), lm_loss, peak_flops=1e12)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all(re.search(r"loss \d+\.\d+ \(ce \d+\.\d+, router \d+\.\d+\)", x) for x in lines)


@pytest.mark.parametrize("kind", ["full", "moe", "lora"])
def test_flops_per_token_is_what_a_step_performs(kind):
    """The count against torch's FLOP counter on a real step (attention in its math form, which the
    counter sees): a LoRA step's frozen weights get no weight gradient, and what reads the frozen
    embeddings passes no gradient back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model(moe=kind == "moe")
    if kind == "lora":
        apply_lora(model, r=4, alpha=8)
    x = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        lm_loss(model, (x[:, :-1], x[:, 1:]))[0].backward()
    assert loop.flops_per_token(model, 16) * 3 * 16 == counter.get_total_flops()


def test_mfu_never_exceeds_one(tmp_path):
    cfg = job_train_config(steps=4, save_every=0)
    train(tiny_model(), cfg, tmp_path, fixed_batch, lm_loss, peak_flops=1.0)  # a peak far below any real step
    mfu = [r["mfu"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert len(mfu) == 4 and max(mfu) <= 1.0 and mfu[0] == 1.0
