"""Parley's GGUF tokenizer against llama.cpp's own, on SmolLM2's GGUF: token ids of generated strings.

    PYTHONPATH=/path/to/llama_cpp .venv/bin/python benchmarks/tokenizer_vs_llamacpp.py             # 20,000 strings
    PYTHONPATH=/path/to/llama_cpp .venv/bin/python benchmarks/tokenizer_vs_llamacpp.py --strings 500 --seed 3
    PYTHONPATH=/path/to/llama_cpp .venv/bin/python benchmarks/tokenizer_vs_llamacpp.py --gpt2-split --show 3  # control

The reference is llama.cpp's tokenizer through PyPI `llama-cpp-python` (not a project
dependency: install it anywhere, e.g. `pip install --target DIR llama-cpp-python`, and put DIR
on PYTHONPATH; its libllama built elsewhere is found with LLAMA_CPP_LIB_PATH=FOLDER). `Llama(model_path=..., vocab_only=True)` reads the vocabulary, the merges and the
`tokenizer.ggml.pre` name ("smollm") from the same GGUF that `parley models import smollm2`
reads, without loading weights. Both tokenize every string without a BOS and without parsing
special tokens (the generator never writes "<|", where one starts), and the ids must be equal.

The strings are drawn with a seeded generator from pieces rich in what pre-tokenizers split
differently: runs of ASCII digits, Unicode numbers (superscripts, fractions, Arabic-Indic and
full-width digits, Roman numerals), runs of spaces, tabs and newlines (also before digits),
punctuation, contractions, accented and combining letters, CJK, emoji with joiners and
skin tones, and plain words. Prints the count that agree and the first mismatches.
"""

from __future__ import annotations

import argparse
import random
import sys

DIGITS = "0123456789"
UNICODE_NUMBERS = "½¼¾²³¹⁴⁰₀₁₂٠١٢٣٤٥٦٧٨٩０１２３４５６７８９ⅠⅡⅢⅣⅫ①②⑩"
SPACES = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n", "\u00a0", "\u3000"]
PUNCTUATION = ".,;:!?-_'\"()[]{}/\\@#$%^&*+=~`|<>…–—«»¿¡"
WORDS = ["the", "Hello", "world", "x", "I'm", "don't", "we're", "they'll", "it's", "USD", "v2", "id",
         "café", "naïve", "façade", "Ωμέγα", "Привет", "e\u0301", "n\u0303", "日本語", "中文", "한국어",
         "مرحبا", "שלום", "हिन्दी", "🙂", "👍🏽", "👨\u200d👩\u200d👧", "🇵🇹", "def", "return", "0x1F", "3.14"]


def piece(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.30:
        return "".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 12)))
    if kind < 0.40:
        return "".join(rng.choice(UNICODE_NUMBERS) for _ in range(rng.randint(1, 3)))
    if kind < 0.60:
        return rng.choice(SPACES)
    if kind < 0.75:
        return "".join(rng.choice(PUNCTUATION) for _ in range(rng.randint(1, 3)))
    return rng.choice(WORDS)


def strings(n: int, seed: int) -> list[str]:
    """n strings, the same for the same seed; none contains "<|" (a special token's start)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        text = "".join(piece(rng) for _ in range(rng.randint(1, 14)))
        if "<|" not in text:
            out.append(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strings", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=10, help="how many mismatches to print")
    ap.add_argument("--gpt2-split", action="store_true",
                    help="a control: give Parley's tokenizer GPT-2's split alone for SmolLM2 (no digit "
                         "split first, what transformers' GGUF converter falls back to); mismatches must appear")
    args = ap.parse_args()
    if args.strings < 1:
        sys.exit(f"--strings must be a positive count (got {args.strings})")
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not importable: `pip install --target DIR llama-cpp-python`, then run "
                 "with DIR on PYTHONPATH (it is the reference, not a project dependency)")

    from parley.model import tokenizer as tokenizer_module
    from parley.model.tokenizer import Tokenizer
    from parley.registry import smollm2_gguf

    if args.gpt2_split:
        tokenizer_module.GGUF_PRE_SPLITS["smollm"] = (tokenizer_module.GPT2_SPLIT,)

    path = smollm2_gguf()
    ours = Tokenizer.from_gguf(path)
    reference = Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = strings(args.strings, args.seed)
    mismatches = []
    for text in texts:
        theirs = reference.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        mine = ours.encode(text)
        if mine != theirs:
            mismatches.append((text, mine, theirs))
    digits = sum(any(c in DIGITS for c in t) for t in texts)
    print(f"{path.name}: {len(texts) - len(mismatches):,} of {len(texts):,} strings tokenize to the same ids "
          f"as llama.cpp (seed {args.seed}; {digits:,} strings contain ASCII digits, "
          f"{sum(len(t) for t in texts):,} characters in all)")
    for text, mine, theirs in mismatches[: args.show]:
        print(f"  {text!r}\n    parley    {mine}\n    llama.cpp {theirs}")
    sys.exit(0 if bool(mismatches) == args.gpt2_split else 1)


if __name__ == "__main__":
    main()
