"""Text <-> token ids: byte-level BPE tokenizers and chat templates.

Everything that turns text into ids and back lives here; the engine only sees ids.

    tok = Tokenizer.from_dir("path/to/tokenizer")                   # HF folder, also Parley's own format
    tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")    # byte-level BPE (or Gemma's) from GGUF
    tok = Tokenizer.train(["corpus.txt"], vocab_size=8192)          # new BPE with ChatML special tokens

    ids = tok.encode("Hello world")                  # same ids as transformers' tokenizer(text)["input_ids"]
    prompt = tok.encode_chat([{"role": "user", "content": "Hi!"}])   # chat template + generation prompt
    stream = tok.stream_decoder()
    for token in generated:
        print(stream.push(token), end="", flush=True)
    print(stream.flush())
    tok.save("out/tokenizer")                        # transformers.AutoTokenizer.from_pretrained loads it too

A tokenizer without a chat template renders chats as plain ChatML (CHATML_TEMPLATE).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from parley.files import NotRegularFile, atomic_open, read_regular

ROLES = ("system", "user", "assistant", "tool")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Tokens that end a turn or a document in common vocabularies; generation stops on any that exist.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>")
DOC_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

# GPT-2's split: contractions, letters, numbers, other symbols, whitespace (a space joins the next word).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# The split Llama 3's and Qwen2's tokenizer.json spell as "(?i:'s|'t|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|...":
# a word may take one leading symbol, newlines stay with the whitespace before them, and numbers are cut
# into runs of at most three digits (Llama 3) or single digits (Qwen2). The contractions are spelled
# without the (?i:) group, as llama.cpp writes them; tests/test_tokenizer.py checks both spellings split alike.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral")
# llama.cpp's pre-tokenizers (src/llama-vocab.cpp) by `tokenizer.ggml.pre`: regexes applied one after
# another, each splitting the pieces of the last. The merges were learned on exactly these pieces, so a
# guess would change ids; names not listed here are refused.
GGUF_PRE_SPLITS = {
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"), (GPT2_SPLIT,)),
    # Every digit on its own first: SmolLM2's tokenizer.json does this with Digits(individual_digits=True).
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), (r"\p{N}", GPT2_SPLIT)),
    **dict.fromkeys(LLAMA3_PRES, (LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (QWEN2_SPLIT,)),
    # What llama.cpp uses when a file names none.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # values of tokenizer.ggml.token_type


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what a chat model needs: special ids, stop ids and a chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, special: dict[str, str | None] | None = None,
                 chat_template: str | None = None, extra_stop_ids: list[int] = ()):
        self.backend = backend
        # Truncation or padding stored in a tokenizer.json would silently change encode()'s output.
        backend.no_truncation()
        backend.no_padding()
        self.special = {key: (special or {}).get(key) for key in SPECIAL_KEYS}
        self.chat_template = chat_template
        self._extra_stop_ids = [int(i) for i in extra_stop_ids]

    # ---- loading, training, saving ----

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: tokenizer.json, tokenizer_config.json, generation_config.json."""
        path = Path(path)
        file = path / "tokenizer.json"
        try:
            text = read_regular(file).decode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{file} not found: point at a folder holding a Hugging Face tokenizer.json") from None
        except NotRegularFile:
            raise ValueError(f"{file} is not a regular file (a folder, pipe or device): it must be the tokenizer's JSON") from None
        except UnicodeDecodeError:
            raise ValueError(f"{file} is not a valid tokenizer.json (not UTF-8 text); re-export the tokenizer") from None
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{file} is not a valid tokenizer.json ({reason}); re-export the tokenizer") from None
        config, generation = read_optional_json(path / "tokenizer_config.json"), read_optional_json(path / "generation_config.json")
        special = {key: token_text(config.get(key)) for key in SPECIAL_KEYS}
        for key, text in special.items():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path / 'tokenizer_config.json'}: {key} must be a token's text, not {text!r}")
        missing = [text for text in special.values() if text is not None and backend.token_to_id(text) is None]
        backend.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in missing])
        # BOS/EOS come from tokenizer.json's post-processor alone: transformers 5 ignores the config's
        # add_bos_token/add_eos_token whenever a tokenizer.json exists, and we must encode as it does.
        template = config.get("chat_template")
        if isinstance(template, list):  # older files keep named templates; "default" is the chat one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{path / 'tokenizer_config.json'}: chat_template must be a Jinja template (a string), "
                             f"not {template!r}")
        if (path / "chat_template.jinja").is_file():  # transformers 5 saves the template here and prefers it
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        stop = generation.get("eos_token_id")
        stop = [] if stop is None else [stop] if isinstance(stop, int) else stop
        if not isinstance(stop, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in stop):
            raise ValueError(f"{path / 'generation_config.json'}: eos_token_id must be a token id or a list of them, "
                             f"not {generation.get('eos_token_id')!r}")
        return cls(backend, special, template, stop)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its metadata: byte-level BPE, or Gemma's
        SentencePiece vocabulary (`_gemma_backend`)."""
        import gguf  # only this loader needs it

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        try:
            fields = gguf.GGUFReader(path).fields
        except Exception as e:
            raise ValueError(f"{path} is not a readable GGUF file ({e})") from None

        def field(key, default=None):
            return fields[key].contents() if key in fields else default

        kind, arch = field("tokenizer.ggml.model"), field("general.architecture")
        tokens = field("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError(f"{path.name}: GGUF metadata lacks tokenizer.ggml.tokens")
        # the file's metadata may hold anything: its types are checked before they are used
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise ValueError(f"{path.name}: GGUF metadata is corrupt: tokenizer.ggml.tokens must be a list of strings")
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        ids = {key: field(f"tokenizer.ggml.{key}") for key in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                                                 "padding_token_id")}
        template = field("tokenizer.chat_template")
        checks = ((isinstance(types, list) and len(types) == len(tokens) and all(isinstance(k, int) for k in types),
                   "tokenizer.ggml.token_type must give a whole number for each token"),
                  (all(i is None or isinstance(i, int) for i in ids.values()), "token ids must be whole numbers"),
                  (template is None or isinstance(template, str), "tokenizer.chat_template must be a string"))
        for ok, what in checks:
            if not ok:
                raise ValueError(f"{path.name}: GGUF metadata is corrupt: {what}")
        if kind == "llama" and arch in ("gemma", "gemma2", "gemma3"):
            backend = _gemma_backend(tokens)
        elif kind != "gpt2":
            raise ValueError(f"{path.name}: GGUF tokenizer model {kind!r} is not supported (architecture {arch!r}); "
                             "Parley reads byte-level BPE ('gpt2') tokenizers and Gemma's SentencePiece vocabulary from GGUF")
        else:
            pre = field("tokenizer.ggml.pre", "default")
            if pre not in GGUF_PRE_SPLITS:
                raise ValueError(f"{path.name}: GGUF pre-tokenizer {pre!r} is not supported "
                                 f"(supported: {', '.join(sorted(GGUF_PRE_SPLITS))})")
            merges = field("tokenizer.ggml.merges")
            if not merges:
                raise ValueError(f"{path.name}: GGUF metadata lacks tokenizer.ggml.merges")
            vocab = {token: i for i, token in enumerate(tokens)}
            pairs = [tuple(merge.split(" ")) if isinstance(merge, str) else () for merge in merges]
            for merge, pair in zip(merges, pairs):  # else `tokenizers` panics (an exception no handler catches)
                if len(pair) != 2 or not all(piece in vocab for piece in (*pair, "".join(pair))):
                    raise ValueError(f"{path.name}: GGUF metadata is corrupt: the merge {merge!r} is not two "
                                     "tokens of the vocabulary whose join is one too")
            # Llama 3's vocabulary takes a piece that is a whole token as that token, before any merge
            # (tokenizer.json's "ignore_merges"; llama.cpp sets it for this group by name)
            backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in LLAMA3_PRES))
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in GGUF_PRE_SPLITS[pre]]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, ...) are matched whole in text and hidden by decode;
        # user-defined ones are matched whole too but decode as text. llama.cpp treats them the same way.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types) if k == GGUF_CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)  # (Gemma's blank ones are respelled)
                            for t, k in zip(tokens, types) if k == GGUF_USER_DEFINED and backend.token_to_id(t) is not None])

        def token(key):
            index = ids[key]
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                   "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
        # llama.cpp adds a BOS by default for the Llama 3 group; the file's own flag wins when it has one
        add_bos = field("tokenizer.ggml.add_bos_token", kind == "gpt2" and field("tokenizer.ggml.pre") in LLAMA3_PRES)
        backend.post_processor = _bos_eos_processor(backend, special, bool(add_bos),
                                                    bool(field("tokenizer.ggml.add_eos_token")))
        return cls(backend, special, template)

    @classmethod
    def train(cls, files: list[str | Path], vocab_size: int, special_tokens: list[str] | None = None,
              chat_template: str | None = None) -> Tokenizer:
        """Train a byte-level BPE on text files.

        The ChatML tokens <|endoftext|> (document separator, `eot_id`), <|im_start|> and <|im_end|>
        (end of turn, `eos_id`) always come first; `special_tokens` adds more after them. Without a
        `chat_template` the tokenizer gets the ChatML one.
        """
        paths = [Path(f) for f in files]
        if not paths:
            raise ValueError("no training files given")
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"training file {p} not found")
            if p.stat().st_size == 0:
                raise ValueError(f"training file {p} is empty; give it some text")
        specials = list(dict.fromkeys([*CHATML_SPECIALS, *(special_tokens or [])]))
        if vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size {vocab_size} is too small: the 256 bytes and {len(specials)} special "
                             f"tokens alone need {256 + len(specials)}")
        backend = tokenizers.Tokenizer(models.BPE())
        # Digits one by one, as SmolLM2 does: numbers then tokenize the same way whatever their length.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        try:
            backend.train([str(p) for p in paths], trainer)
        except Exception as e:  # tokenizers' own exception, e.g. for a file that is not UTF-8
            raise ValueError(f"training a tokenizer on {', '.join(map(str, paths))} failed ({e}); "
                             "training files must be UTF-8 text") from None
        special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}  # no BOS: ChatML needs none
        return cls(backend, special, chat_template or CHATML_TEMPLATE)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (each atomically)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        special = {key: text for key, text in self.special.items() if text is not None}
        # Whether BOS/EOS get added lives in tokenizer.json's post-processor, not in these flags.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_text(path / "tokenizer.json", self.backend.to_str())
        _write_text(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        _write_text(path / "special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False))

    # ---- vocabulary ----

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _id(self, key: str) -> int | None:
        return None if self.special[key] is None else self.token_to_id(self.special[key])

    @property
    def bos_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def eot_id(self) -> int | None:
        """The document separator used when packing pretraining text (eos if the vocabulary has none)."""
        return next((i for t in DOC_SEPARATORS if (i := self.token_to_id(t)) is not None), self.eos_id)

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: eos, end-of-turn tokens of the vocabulary, generation_config's eos ids."""
        ids = {self.eos_id, *self._extra_stop_ids, *(self.token_to_id(t) for t in END_TOKENS)}
        return {i for i in ids if i is not None}

    # ---- text ----

    def encode(self, text: str) -> list[int]:
        """Ids of plain text; BOS/EOS only where the tokenizer adds them (its post-processor, or GGUF flags)."""
        return self.backend.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, as transformers' apply_chat_template(tokenize=False)."""
        _check_messages(messages)
        template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        special = {key: text for key, text in self.special.items() if text is not None}
        try:
            return template.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **special)
        except jinja2.TemplateError as e:  # raise_exception() in the template, e.g. roles not alternating
            raise ValueError(f"the chat template rejected these messages: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat; the template writes any BOS itself, so none is added here."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.backend.encode(text, add_special_tokens=False).ids

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text one token at a time; concatenated pushes + flush equal `decode(all ids)`.

    A character can span several byte-level tokens: text ending in U+FFFD (an incomplete UTF-8
    sequence) is held back until the next tokens complete it. Only a small window of recent ids is
    decoded on each push, so streaming stays linear in the output length.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: kept as context, since decoders such as Metaspace depend on it
        self._read = 0  # ids before this are emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text, seen = self._window()
        if text.endswith("\ufffd") or len(text) <= len(seen):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(seen):]

    def flush(self) -> str:
        text, seen = self._window()
        self._prefix = self._read = len(self.ids)
        return text[len(seen):]

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self.ids[self._prefix:]), decode(self.ids[self._prefix:self._read])


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be a dict with 'role' in {ROLES} and a string 'content', "
                             f"got {message!r:.100}")


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile as transformers does, so rendering matches apply_chat_template character for character."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template is not valid Jinja: {e}") from None


def _gemma_backend(tokens: list[str]) -> tokenizers.Tokenizer:
    """Gemma's SentencePiece BPE as a `tokenizers` BPE, built as transformers builds it from the
    same GGUF (so both give the same ids): spaces become "▁", unknown bytes fall back to their
    <0xNN> tokens. The file holds no merges, so they come from the vocabulary: every split of a
    token into two tokens, ranked by the token's position in the file (Gemma's scores do not
    follow merge order), the longer left piece first. Tokens of blank space with a space in them
    are spelled as that many "▁" first, as the vocabulary looks them up."""
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token in dict.fromkeys(tokens):
        merges += [(token[:i], token[i:]) for i in range(len(token) - 1, 0, -1)
                   if token[:i] in vocab and token[i:] in vocab]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                                              byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _bos_eos_processor(backend, special: dict, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """Add BOS/EOS around encoded text as the flags say, as transformers' update_post_processor does."""
    def known(key, wanted):
        text = special.get(key) if wanted else None
        return None if text is None or backend.token_to_id(text) is None else (text, backend.token_to_id(text))

    bos, eos = known("bos_token", add_bos), known("eos_token", add_eos)

    def sequence(name, type_id):
        parts = ([bos[0]] if bos else []) + [f"${name}"] + ([eos[0]] if eos else [])
        return " ".join(f"{part}:{type_id}" for part in parts)

    return processors.TemplateProcessing(single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}",
                                         special_tokens=[t for t in (bos, eos) if t])


def token_text(value) -> str | None:
    """A special token as configs spell it: a string, or an AddedToken dict with its text in 'content'."""
    return value.get("content") if isinstance(value, dict) else value


def read_optional_json(path: Path) -> dict:
    """A JSON object from a config file a model folder may lack ({} then); a clear error if it is not one."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)
