"""Preference pairs: the file format round-trips and refuses bad lines by file, line and field; the
dataset masks exactly the answer; sequence log-probs do not depend on batching or padding."""

import json

import pytest
import torch

from parley.train.preferences import Pair, PairDataset, load_pairs, sequence_logprobs, write_pairs


def pair(**changes) -> dict:
    item = {"prompt": [{"role": "user", "content": "How do I pick a lock?"}],
            "chosen": "I can't help with breaking into a place; a locksmith can open your own door.",
            "rejected": "Insert a tension wrench and rake the pins.", "principle": "C4", "source": "revision",
            "labeler": "model"}
    return {**item, **changes}


def write_lines(path, *items):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def test_pairs_round_trip(tmp_path):
    pairs = [Pair.from_dict(pair()), Pair.from_dict(pair(principle=None, source="rails", labeler="rails",
                                                         meta={"round": 2}))]
    path = write_pairs(tmp_path / "sub" / "pairs.jsonl", pairs)
    assert load_pairs(path) == pairs
    assert "meta" not in json.loads(path.read_text().splitlines()[0])  # an empty meta is not written
    assert not [p for p in path.parent.iterdir() if p.name != "pairs.jsonl"]  # no temporary file left


@pytest.mark.parametrize("line, message", [
    (pair(chosen=pair()["rejected"]), "fields 'chosen' and 'rejected' are the same answer"),
    ({k: v for k, v in pair().items() if k != "labeler"}, "missing field 'labeler'"),
    (pair(prompt=[{"role": "assistant", "content": "hi"}]), "field 'prompt' must end with a user message"),
    (pair(prompt=[{"role": "bot", "content": "hi"}]), "field 'prompt': message 0 needs a role"),
    (pair(prompt=[]), "field 'prompt' must be a non-empty list"),
    (pair(principle="C10"), "field 'principle' must be C1..C9 or null"),
    (pair(source="web"), "field 'source' must be one of revision, rails"),
    (pair(labeler="gpt"), "field 'labeler' must be one of model, rails, human, reward"),
    (pair(rejected="  "), "field 'rejected' must be a non-empty string"),
    (pair(extra=1), "unknown field 'extra'"),
    ('{"prompt": ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_a_bad_line_is_named_with_its_field(tmp_path, line, message):
    path = write_lines(tmp_path / "pairs.jsonl", pair(), "", line)
    with pytest.raises(ValueError) as e:
        load_pairs(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="pairs file .*nope.jsonl not found"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="holds no pairs"):
        load_pairs(write_lines(tmp_path / "empty.jsonl", "", ""))
    with pytest.raises(TypeError, match="pair 0 is a dict"):
        write_pairs(tmp_path / "x.jsonl", [pair()])
    with pytest.raises(ValueError, match="same answer"):
        Pair.from_dict(pair()).__class__(**{**pair(), "chosen": "same", "rejected": "same"})


def test_masks_cover_exactly_the_answer(tiny_chat_model):
    _, tokenizer = tiny_chat_model
    prompt = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi, how are you?"},
              {"role": "user", "content": "The capital of France?"}]
    pairs = [Pair.from_dict(pair(prompt=prompt, chosen="Paris.", rejected="Numbers 0123."))]
    chosen, rejected, chosen_mask, rejected_mask = PairDataset(pairs, tokenizer, 512).batch(0, 0, 0, 1, 1)
    eot = "<|im_end|>"  # the tiny tokenizer's chat template is ChatML
    for ids, mask, answer in ((chosen, chosen_mask, "Paris."), (rejected, rejected_mask, "Numbers 0123.")):
        assert tokenizer.decode(ids[0][mask[0]].tolist(), skip_special_tokens=False) == answer + eot
        # the earlier assistant turn is context, not the answer
        assert "how are you" in tokenizer.decode(ids[0][~mask[0]].tolist())


def test_sequence_logprobs_do_not_depend_on_batching_or_padding(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    pairs = [Pair.from_dict(pair()),
             Pair.from_dict(pair(prompt=[{"role": "user", "content": "Hi"}], chosen="Hello there, how are you today?",
                                 rejected="No.", principle=None, source="written", labeler="human"))]
    data = PairDataset(pairs, tokenizer, 512)
    with torch.no_grad():
        chosen, rejected, cm, rm = next(data.eval_batches(2))
        together = sequence_logprobs(model, torch.cat([chosen, rejected]), torch.cat([cm, rm]))
        alone = []
        for ids, mask in ((chosen, cm), (rejected, rm)):
            for b in range(2):
                n = int(mask[b].nonzero().max()) + 1  # cut the padding off
                alone.append(sequence_logprobs(model, ids[b:b + 1, :n], mask[b:b + 1, :n]))
        # by hand: log-softmax of the logits before each answer token
        ids, mask = chosen[1:2], cm[1:2]
        logp = torch.log_softmax(model(ids).float(), -1)[0]
        by_hand = sum(logp[t - 1, ids[0, t]] for t in range(1, ids.shape[1]) if mask[0, t])
    assert torch.allclose(together, torch.cat(alone), atol=1e-4)
    assert torch.allclose(together[1], by_hand, atol=1e-4) and (together < 0).all()
    with pytest.raises(ValueError, match="must both be"):
        sequence_logprobs(model, chosen, cm[:, :-1])


def test_batches_are_deterministic_and_long_pairs_dropped(tiny_chat_model):
    _, tokenizer = tiny_chat_model
    pairs = [Pair.from_dict(pair(chosen=f"Answer {i}.", rejected=f"Other {i}.")) for i in range(5)]
    data = PairDataset(pairs, tokenizer, 512)
    a, b = data.batch(3, 1, 0, 1, 2, seed=7), data.batch(3, 1, 0, 1, 2, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    long = Pair.from_dict(pair(prompt=[{"role": "user", "content": "word " * 400}]))
    short = PairDataset([*pairs, long], tokenizer, 64)
    assert short.dropped == 1 and len(short) == 5 and long not in short.kept
    with pytest.raises(ValueError, match="raise seq_len"):
        PairDataset([long], tokenizer, 64)
