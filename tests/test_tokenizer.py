"""Tokenizer tests: SmolLM2's GGUF tokenizer and a tokenizer trained here, checked against transformers."""

import json

import gguf
import numpy as np
import pytest
import tokenizers
from tokenizers import processors

from parley.model.tokenizer import CHATML_TEMPLATE, Tokenizer



TEXTS = [
    "Hello world!", "Café déjà vu.", "naïve façade", "e\u0301 and n\u0303 (combining marks)",
    "日本語のテキスト", "中文，标点。", "🙂👍🏽 emoji 👨‍👩‍👧", "12345", "3.14159", "x = 42", "I'm 25 years",
    "100,000.00 $", "  multiple   spaces", "line\nbreak\n\n\nend", "\r\n windows", "trailing   ",
    "def f(x):\n    return x ** 2  # square\n", "<|im_start|>user\nhi<|im_end|>", "a <|endoftext|> b", "",
]
# Whitespace or a space before a number: transformers' GGUF converter does not know llama.cpp's "smollm"
# pre-tokenizer and falls back to GPT-2's regex, which keeps " 1" or "  " + "1" together. SmolLM2's own
# tokenizer.json (Digits(individual_digits=True) first) and llama.cpp ("\p{N}" first) split every digit
# off before anything else. The model was trained on the latter, so we follow it; ids from llama.cpp.
DIGIT_TEXTS = {
    "a  1": [81, 256, 33],
    "hello  2024": [28120, 256, 34, 32, 34, 36],
    "\n\n1": [1116, 33],
    "tab\t\t9": [15999, 1656, 41],
    " ½ ² ³": [216, 16738, 216, 19133, 216, 39050],
}
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another, in 日本語?"}],
]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def hf_smol(smollm2_hf_tokenizer):
    return smollm2_hf_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("\n".join(TEXTS + ["The quick brown fox jumps over the lazy dog."] * 20) * 5, encoding="utf-8")
    return Tokenizer.train([corpus], vocab_size=400)


@pytest.fixture(scope="module")
def trained_dir(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("trained")
    trained.save(path)
    return path


def _hf_load(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def _hf_chat_ids(hf, messages, add_generation_prompt):
    encoded = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"])


# ---- SmolLM2 from GGUF ----

def test_gguf_metadata(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.eot_id) == (1, 2, 2, 0)
    assert smol.stop_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert smol.token_to_id("<|im_start|>") == 1 and smol.id_to_token(2) == "<|im_end|>"
    assert smol.token_to_id("no such token") is None
    assert "<|im_start|>" in smol.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_matches_transformers(smol, hf_smol, text):
    ids = smol.encode(text)
    assert ids == hf_smol(text)["input_ids"]
    assert smol.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("<|endoftext|>", "")
    assert smol.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", DIGIT_TEXTS)
def test_gguf_splits_digits_like_the_real_model(smol, text):
    assert smol.encode(text) == DIGIT_TEXTS[text]
    assert smol.encode("12345") == [smol.token_to_id(d) for d in "12345"]
    assert smol.decode(smol.encode(text)) == text


def test_gguf_matches_llama_cpp_on_generated_strings(smol, smollm2_path):
    """A small, fast slice of benchmarks/tokenizer_vs_llamacpp.py (which runs 20,000 strings).
    llama-cpp-python is the reference and not a project dependency: skipped where it is not
    importable (see the script's docstring for how to install it beside the project)."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or its C library not found
        pytest.skip(f"llama-cpp-python not usable here: {e}")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "tokenizer_vs_llamacpp", Path(__file__).resolve().parent.parent / "benchmarks" / "tokenizer_vs_llamacpp.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    reference = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    for text in script.strings(300, seed=1) + list(DIGIT_TEXTS):
        assert smol.encode(text) == reference.tokenize(text.encode("utf-8"), add_bos=False, special=False), text


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_matches_transformers(smol, hf_smol, messages, add_generation_prompt):
    text = smol.render_chat(messages, add_generation_prompt)
    assert text == hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = smol.encode_chat(messages, add_generation_prompt)
    assert ids == _hf_chat_ids(hf_smol, messages, add_generation_prompt)
    assert ids[0] == smol.token_to_id("<|im_start|>")


def test_gguf_save_load_roundtrip(smol, tmp_path):
    # This is how a GGUF import lands on disk; transformers then gets the real model's ids too.
    smol.save(tmp_path)
    ours, hf = Tokenizer.from_dir(tmp_path), _hf_load(tmp_path)
    for text in TEXTS + list(DIGIT_TEXTS):
        assert ours.encode(text) == hf(text)["input_ids"] == smol.encode(text), text
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id, ours.stop_ids, ours.chat_template) == \
        (smol.vocab_size, smol.bos_id, smol.eos_id, smol.pad_id, smol.stop_ids, smol.chat_template)
    assert hf.apply_chat_template(CHATS[2], tokenize=False, add_generation_prompt=True) == ours.render_chat(CHATS[2])


# ---- trained tokenizer ----

def test_trained_roundtrip_through_transformers(trained, trained_dir):
    ours, hf = Tokenizer.from_dir(trained_dir), _hf_load(trained_dir)
    assert 300 <= trained.vocab_size <= 400 and ours.vocab_size == trained.vocab_size
    assert trained.chat_template == ours.chat_template == CHATML_TEMPLATE
    assert (ours.eos_id, ours.eot_id, ours.bos_id) == (trained.token_to_id("<|im_end|>"), 0, None)
    assert ours.stop_ids == {0, trained.token_to_id("<|im_end|>")}
    for text in TEXTS + ["unseen: Ωμέγα ✓ 9876"]:
        ids = trained.encode(text)
        assert ours.encode(text) == hf(text)["input_ids"] == ids, text
        assert trained.decode(ids, skip_special_tokens=False) == text
    assert trained.encode("2024") == [trained.token_to_id(d) for d in "2024"]  # digits never merge
    for messages in CHATS:
        for add in (True, False):
            text = ours.render_chat(messages, add)
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert ours.encode_chat(messages, add) == _hf_chat_ids(hf, messages, add)


def test_bos_and_generation_config(trained, tmp_path):
    # BOS comes from tokenizer.json's post-processor (transformers 5 ignores add_bos_token when it exists).
    backend = tokenizers.Tokenizer.from_str(trained.backend.to_str())
    bos = "<|im_start|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, trained.token_to_id(bos))])
    Tokenizer(backend, {**trained.special, "bos_token": bos}).save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    tok, hf = Tokenizer.from_dir(tmp_path), _hf_load(tmp_path)
    assert tok.encode("hi 2") == hf("hi 2")["input_ids"] == [tok.bos_id] + trained.encode("hi 2")
    assert tok.stop_ids == trained.stop_ids | {5, 7}
    # No chat template: plain ChatML, and no BOS added on top of what the template writes.
    assert tok.chat_template is None
    assert tok.render_chat(CHATS[0]) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode_chat(CHATS[0]) == trained.encode_chat(CHATS[0])


# ---- streaming ----

@pytest.mark.parametrize("text, split_chars", [
    ("🙂👍🏽 emoji 👨‍👩‍👧", True), ("日本語のテキスト and 中文", True), ("Café déjà vu 3.14", False)])
def test_stream_decoder_matches_decode(smol, text, split_chars):
    ids = smol.encode(text)
    # Whether some character's bytes are spread over several tokens (then a push must hold text back).
    assert any(smol.decode([i]).endswith("\ufffd") for i in ids) == split_chars
    stream = smol.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == smol.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert ("" in pieces) == split_chars


def test_stream_decoder_hides_specials_and_flushes_broken_bytes(smol):
    ids = smol.encode_chat(CHATS[1], add_generation_prompt=False) + smol.encode("🙂")[:1]  # half an emoji
    stream = smol.stream_decoder()
    text = "".join(stream.push(i) for i in ids)
    assert "<|im_start|>" not in text and "Be brief." in text
    assert text + stream.flush() == smol.decode(ids) and smol.decode(ids).endswith("\ufffd")


def test_stream_decoder_on_trained(trained):
    text = "unseen: Ωμέγα ✓ 🙂 9876"
    ids = trained.encode(text)
    stream = trained.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


# ---- bad input ----

def test_missing_and_corrupt_files(tmp_path, trained_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((trained_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        Tokenizer.from_gguf(tmp_path / "tokenizer.json")


def test_bad_training_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        Tokenizer.train([empty], vocab_size=400)
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.train([tmp_path / "nope.txt"], vocab_size=400)
    empty.write_text("some text")
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train([empty], vocab_size=258)
    with pytest.raises(ValueError, match="no training files"):
        Tokenizer.train([], vocab_size=400)
    empty.write_bytes(b"\xff\xfe not UTF-8")
    with pytest.raises(ValueError, match="UTF-8"):
        Tokenizer.train([empty], vocab_size=400)


@pytest.mark.parametrize("messages", [
    [], "hi", [{"role": "user"}], [{"role": "robot", "content": "hi"}], [{"role": "user", "content": 3}], ["hi"],
])
def test_bad_messages(trained, messages):
    with pytest.raises(ValueError, match="messages|message 0"):
        trained.render_chat(messages)


def test_template_exceptions_become_value_errors(trained):
    tok = Tokenizer(trained.backend, trained.special,
                    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}"
                    "{% endif %}{{ messages[0]['content'] }}")
    assert tok.render_chat([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(ValueError, match="first message must be from the user"):
        tok.render_chat([{"role": "system", "content": "x"}])


def _write_gguf(path, model, pre):
    """A tiny GGUF holding only tokenizer metadata: the 256 byte tokens, one merge, one control token."""
    from tokenizers.pre_tokenizers import ByteLevel
    writer = gguf.GGUFWriter(str(path), "llama")
    tokens = sorted(ByteLevel.alphabet()) + ["ĠĠ", "<|endoftext|>"]
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_tensor("dummy", np.zeros(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("model, pre, error", [
    ("llama", "default", "tokenizer model 'llama' is not supported"),
    ("gpt2", "deepseek-llm", "pre-tokenizer 'deepseek-llm' is not supported"),
])
def test_unsupported_gguf_tokenizers(tmp_path, model, pre, error):
    with pytest.raises(ValueError, match=error):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "t.gguf", model, pre))


def test_gguf_pre_tokenizers(tmp_path):
    gpt2 = Tokenizer.from_gguf(_write_gguf(tmp_path / "a.gguf", "gpt2", "gpt-2"))
    pieces = ["a", "ĠĠ", "Ġ", "1", "2", "<|endoftext|>"]
    assert gpt2.encode("a   12<|endoftext|>") == [gpt2.token_to_id(t) for t in pieces]
    assert gpt2.stop_ids == {gpt2.token_to_id("<|endoftext|>")}
    # llama.cpp's default: punctuation runs, then GPT-2's split, then numbers cut into threes.
    default = Tokenizer.from_gguf(_write_gguf(tmp_path / "b.gguf", "gpt2", "default"))
    pieces = [piece for piece, _ in default.backend.pre_tokenizer.pre_tokenize_str("x+=1234567 ok")]
    assert pieces == ["x", "+=", "123", "456", "7", "Ġok"]


# Llama 3's and Qwen2's split as their tokenizer.json files spell it (with the (?i:) group llama.cpp rewrites)
HF_SPLITS = {"llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                          r"|\s*[\r\n]+|\s+(?!\S)|\s+",
             "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+"}
SPLIT_TEXTS = ["I'M SURE they'LL say it's 12345 or 3.14159!", "def f(x):\n\treturn x**2  # SQUARE\r\n\n  done",
               "Ünïcödé wörds, 日本語 テキスト and émoji 🙂🙂 ...", "  leading   spaces\n\n\nand $100,000.50 (approx.)",
               "don't DON'T Don'T we've WE'VE", "a\u00a0b\u2003c", ""]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_gguf_llama3_and_qwen2_split_as_their_tokenizer_json(tmp_path, pre):
    """A BPE learned here behind the split the model's tokenizer.json names, written to a GGUF with only
    its pre-tokenizer's name: Parley's reading of that GGUF must give the ids the tokenizer.json gives."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(HF_SPLITS[pre]), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    corpus = [t * 3 for t in SPLIT_TEXTS] + ["the quick brown fox jumps over the lazy dog " * 20, "1234567890" * 5]
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<|end_of_text|>"], show_progress=False))
    import json
    model = json.loads(hf.to_str())["model"]
    # plus a word no merge reaches: Llama 3 takes a piece that is a whole token as that token (ignore_merges)
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])] + ["Ġxyzzy"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t == "<|end_of_text|>" else 1 for t in tokens])
    writer.add_bos_token_id(tokens.index("<|end_of_text|>"))
    writer.add_tensor("dummy", np.zeros(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = Tokenizer.from_gguf(tmp_path / "t.gguf")
    bos = [ours.bos_id] if pre == "llama-bpe" else []  # llama.cpp adds one for the Llama 3 group by default
    for text in SPLIT_TEXTS:
        assert ours.backend.pre_tokenizer.pre_tokenize_str(text) == hf.pre_tokenizer.pre_tokenize_str(text), text
        assert ours.encode(text) == bos + hf.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == text
    whole = [ours.token_to_id("Ġxyzzy")] if pre == "llama-bpe" else hf.encode(" xyzzy").ids
    assert ours.encode(" xyzzy") == bos + whole
