"""What keeps alignment training from costing helpfulness: the dev split of the training requests (held out
by line), the anchor (KL to the base on ordinary dialogs) in constitutional SFT and DPO, DPO's NLL term on
the chosen answers (RPO), and the benchmark's dev set and principle check. Tiny models, seconds each."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from parley import cli
from parley.registry import Registry
from parley.train.align_data import (EVERYDAY, PRINCIPLES, alignment_prompts, everyday_prompts, in_split, load_requests,
                                     repeats_itself, training_requests)
from parley.train.data import ChatDataset
from parley.train.losses import kl_loss
from parley.train.preferences import Pair, write_pairs
from tests.test_alignment import QUIET, home, metrics  # noqa: F401  (home is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def test_the_dev_split_holds_out_whole_lines():
    every, train, dev = (alignment_prompts(split=s) for s in ("all", "train", "dev"))
    assert len(train) + len(dev) == len(every) and {r.text for r in train} | {r.text for r in dev} == \
        {r.text for r in every}
    # a request's variants are the same whichever split lists it, and no wording of a dev line is trained on
    assert set(dev) <= set(every) and not {r.text for r in dev} & {r.text for r in train}
    data = load_requests()
    for kind in ("harmful", "benign"):
        lines = data[kind]
        dev_lines = {e["text"].strip() for i, e in enumerate(lines) if in_split(i, "dev")}
        assert len(dev_lines) == len(lines) // 5
        assert {r.text for r in dev if r.origin == "written" and r.harmful == (kind == "harmful")} == dev_lines
    with pytest.raises(ValueError, match="split must be one of all, train, dev"):
        alignment_prompts(split="test")


def test_everyday_requests_split_by_line_with_their_language_and_kind(tmp_path):
    every, train, dev = (everyday_prompts(split=s) for s in ("all", "train", "dev"))
    assert len(train) + len(dev) == len(every) and not {r.text for r in train} & {r.text for r in dev}
    assert {r.source for r in every} == {"everyday.toml"} and all(r.principle in PRINCIPLES for r in every)
    ordinary = [r for r in every if r.origin.split("/")[0] == "ordinary"]
    assert len(ordinary) >= 300 and not any(r.harmful for r in ordinary)
    assert sum("/" in r.origin for r in ordinary) > len(ordinary) / 4  # other languages, tagged ordinary/xx
    assert any(r.harmful for r in dev) and any(r.origin == "benign" for r in dev)
    assert training_requests(split="dev", everyday=EVERYDAY)[-len(dev):] == dev
    assert training_requests(split="dev") == training_requests(split="dev", everyday=None)  # off unless asked
    bad = tmp_path / "everyday.toml"
    for text, message in [('[[ordinary]]\ntext = "bake bread"\n', "entry 0 needs a text and a lang"),
                          ('[[benign]]\ntext = "kill the process"\nlang = "en"\nlooks_like = "C0"\n',
                           "needs looks_like = C1..C9"),
                          ('[[ordinary]]\ntext = "bake\n', "not valid TOML"), ("", "holds no")]:
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            everyday_prompts(bad)
    with pytest.raises(FileNotFoundError, match="everyday requests file .* not found"):
        everyday_prompts(tmp_path / "none.toml")


def test_looping_answers_are_not_helpful_targets():
    assert repeats_itself("You are not right now. " * 8)
    assert repeats_itself("The Detectives in the Library.  The Detectives in the Library. " * 3)
    assert not repeats_itself("To stop a frozen process on Linux, find its id with `ps aux | grep name` and run "
                              "`kill PID`; if it ignores that, `kill -9 PID` ends it at once.")
    assert not repeats_itself("Yes, yes, yes.")  # too short to judge


def test_kl_loss_is_zero_only_where_the_distributions_agree():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    mask = torch.tensor([[True, True, False, False, True], [False, True, True, False, False]])
    assert kl_loss(teacher.clone(), teacher, mask) == pytest.approx(0, abs=1e-6)
    student = teacher.clone()
    student[0, 2] += torch.randn(11) * 3  # a masked-out position: no effect
    assert kl_loss(student, teacher, mask) == pytest.approx(0, abs=1e-6)
    student = torch.randn(2, 5, 11, requires_grad=True)
    value = kl_loss(student, teacher, mask)
    expected = torch.nn.functional.kl_div(student[mask].log_softmax(-1), teacher[mask].log_softmax(-1),
                                          log_target=True, reduction="batchmean")
    assert value > 0 and value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert student.grad[~mask].abs().sum() == 0 and student.grad[mask].abs().sum() > 0
    assert kl_loss(student, teacher, torch.zeros_like(mask)) == 0


def write_dialogs(path: Path, count: int = 24) -> Path:
    lines = ["The weather is nice today, we could walk by the river.", "I like tea in the morning and coffee later.",
             "Trains run every hour on Sundays.", "My sister plays the violin in a small band."]
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me something, {i}."},
                                             {"role": "assistant", "content": lines[i % len(lines)]}]}) + "\n")
    return path


def dialog_kl(name: str, base: str, dialogs: Path) -> float:
    """Mean KL(base || model) per assistant token of `dialogs`."""
    registry = Registry()
    model, tokenizer, _ = registry.load(name, dtype=torch.float32)
    reference, _, _ = registry.load(base, dtype=torch.float32)
    total = count = 0.0
    with torch.no_grad():
        for inputs, _, mask in ChatDataset(dialogs, tokenizer, 128).eval_batches(8):
            n = float(mask.sum())
            total, count = total + float(kl_loss(model(inputs), reference(inputs), mask)) * n, count + n
    return total / count


def test_the_anchor_holds_the_model_to_its_base_on_ordinary_dialogs(home, capsys):
    dialogs = write_dialogs(home / "dialogs.jsonl")
    args = ["train", "constitutional", "base=tiny", "limit=12", "max_tokens=6", "critic=rails", "system_prompt=false",
            "lora.rank=8", "lora.alpha=16", "train.steps=10", "train.batch_size=4", "train.seq_len=128",
            "train.lr=2e-2", "train.save_every=0", *QUIET]
    for coef in (0, 5):
        assert cli.main([*args, f"run={home / f'cai-{coef}'}", f"name=tiny-cai-{coef}", f"anchor.dialogs={dialogs}",
                         f"anchor.coef={coef}"]) == 0
    capsys.readouterr()
    anchored = [r for r in metrics(home / "cai-5") if "loss" in r]
    assert all("anchor_kl" in r and r["loss"] == pytest.approx(r["task"] + 5 * r["anchor_kl"], rel=1e-4)
               for r in anchored)
    assert all("anchor_kl" not in r for r in metrics(home / "cai-0"))
    free, held = dialog_kl("tiny-cai-0", "tiny", dialogs), dialog_kl("tiny-cai-5", "tiny", dialogs)
    assert held < 0.5 * free, (held, free)
    # the SFT data itself is still learned with the anchor on
    assert sum(r["task"] for r in anchored[-3:]) < sum(r["task"] for r in anchored[:3])
    # no critique or revision was asked of the model (critic=rails)
    records = [json.loads(line) for line in (home / "cai-5" / "dataset.jsonl").read_text().splitlines()]
    assert all(r["critique"] == "" and r["labeler"] == "rails" for r in records if r["harmful"])


def test_sft_holds_the_model_to_its_base_when_anchored(home, capsys):
    """`parley train sft` on narrow data with anchor.dialogs: the loss is the task's plus coef x KL, and the
    model moves less on the ordinary dialogs than without it. An anchor without adapters is refused."""
    data = home / "narrow"
    data.mkdir()
    for split in ("train", "val"):
        with open(data / f"dialogs-{split}.jsonl", "w") as f:
            for i in range(12):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"How do I stop process {i}?"},
                                                 {"role": "assistant", "content": f"Run kill {i} in a shell."}]}) + "\n")
    dialogs = write_dialogs(home / "dialogs.jsonl")
    args = ["train", "sft", f"data={data}", "base=tiny", "lora.rank=8", "lora.alpha=16", "train.steps=8",
            "train.batch_size=4", "train.seq_len=64", "train.lr=2e-2", "train.save_every=0", "train.eval_batches=1",
            *QUIET]
    for coef in (0, 5):
        assert cli.main([*args, f"run={home / f'sft-{coef}'}", f"name=tiny-sft-{coef}", f"anchor.dialogs={dialogs}",
                         f"anchor.coef={coef}"]) == 0
    capsys.readouterr()
    anchored = [r for r in metrics(home / "sft-5") if "loss" in r]
    assert anchored and all(r["loss"] == pytest.approx(r["task"] + 5 * r["anchor_kl"], rel=1e-4) for r in anchored)
    free, held = dialog_kl("tiny-sft-0", "tiny", dialogs), dialog_kl("tiny-sft-5", "tiny", dialogs)
    assert held < 0.5 * free, (held, free)
    for bad, says in [(["lora.rank=0", f"anchor.dialogs={dialogs}"], "anchor.dialogs needs LoRA adapters"),
                      ([f"anchor.dialogs={home / 'none.jsonl'}"], "anchor.dialogs .* not found")]:
        assert cli.main([*args, f"run={home / 'sft-bad'}", *bad]) != 0
        assert re.search(says, capsys.readouterr().err) and not (home / "sft-bad").exists()

def test_dpo_with_the_chosen_nll_and_the_anchor(home, capsys):
    dialogs = write_dialogs(home / "dialogs.jsonl")
    pairs = [Pair([{"role": "user", "content": q}], "Paris is the capital.", "Hello hello hello.", None, "written",
                  "human") for q in ("Hello there", "How are you today?", "The capital of France?", "Numbers?")] * 3
    path = write_pairs(home / "pairs.jsonl", pairs)
    run = home / "dpo"
    assert cli.main(["train", "dpo", f"pairs={path}", f"run={run}", "base=tiny", "name=tiny-rpo", "lora.rank=8",
                     "beta=0.5", "sft_coef=1", f"anchor.dialogs={dialogs}", "train.steps=8", "train.batch_size=4",
                     "train.seq_len=128", "train.lr=1e-2", "train.save_every=0", *QUIET]) == 0
    capsys.readouterr()
    records = [r for r in metrics(run) if "loss" in r]
    assert all({"chosen_nll", "anchor_kl", "task"} <= set(r) for r in records)
    assert records[0]["task"] == pytest.approx(0.6931 + records[0]["chosen_nll"], abs=1e-3)  # DPO's log 2 + NLL
    assert records[-1]["chosen_nll"] < 0.7 * records[0]["chosen_nll"] and records[-1]["accuracy"] == 1.0


def test_bad_anchor_and_regulariser_settings_are_refused(home, capsys):
    good = write_pairs(home / "good.jsonl", [Pair([{"role": "user", "content": "Capital?"}], "Paris.", "No.", None,
                                                  "written", "human")])
    dialogs = write_dialogs(home / "dialogs.jsonl", 2)
    dpo = ["train", "dpo", "base=tiny", f"pairs={good}", "train.steps=1", *QUIET]
    cases = [([*dpo, f"run={home / 'd1'}", f"anchor.dialogs={home / 'none.jsonl'}"], "anchor.dialogs .*none.jsonl not found"),
             ([*dpo, f"run={home / 'd2'}", f"anchor.dialogs={dialogs}", "lora.rank=0"], "needs LoRA adapters"),
             ([*dpo, f"run={home / 'd3'}", "sft_coef=-1"], "sft_coef >= 0"),
             ([*dpo, f"run={home / 'd4'}", "anchor.coef=-1"], "anchor.coef must be >= 0"),
             (["train", "constitutional", "base=tiny", f"run={home / 'c1'}", "split=test"], "split"),
             (["train", "constitutional", "base=tiny", f"run={home / 'c2'}", "benign_tokens=-1"], "benign_tokens >= 0")]
    for args, message in cases:
        assert cli.main(args) == 2
        assert re.search(message, capsys.readouterr().err), message
    assert not any((home / n).exists() for n in ("d1", "d2", "d3", "d4", "c1", "c2"))


def test_the_benchmark_reads_the_dev_split_and_checks_the_principle_named():
    spec = importlib.util.spec_from_file_location("alignment_bench", ROOT / "benchmarks" / "alignment.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    harmful, benign = bench.requests("dev", True, 0), bench.requests("dev", False, 0)
    dev = training_requests(split="dev", everyday=EVERYDAY)
    assert {r.source for r in dev} == {"requests.toml", "guard_heldout", "guard_heldout_v3", "guard_heldout_v4",
                                       "everyday.toml"}
    assert [r["text"] for r in harmful + benign] == [r.text for r in dev if r.harmful] + \
        [r.text for r in dev if not r.harmful]
    assert all(r["principle"] for r in harmful) and all(r["category"] for r in benign)
    assert len(bench.requests("dev", True, 10)) == 10
    assert bench.names_principle("I can't help with that (principle C3: No weapons or explosives).", "C3")
    assert not bench.names_principle("I can't help with that (principle C3: No weapons or explosives).", "C4")
    assert not bench.names_principle("I can't help with that.", "C3")
    with pytest.raises(SystemExit, match="harmful.yml not found"):
        bench.requests(str(ROOT / "nowhere"), True, 0)
