"""`parley train tokenizer`: a byte-level BPE trained on the cleaned corpus.

    parley data prepare .data/corpus                          # writes .data/corpus/text/*.jsonl
    parley train tokenizer data=.data/corpus vocab_size=8192 out=runs/tokenizer-8k

The tokenizer gets ChatML special tokens and template (see parley.model.tokenizer), so a
model pretrained with it can be fine-tuned on conversations and chat right away.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from parley.config import setting
from parley.model.tokenizer import Tokenizer


@dataclass
class TokenizerConfig:
    data: str = setting(".data/corpus", "folder written by `parley data prepare` (its text/*.jsonl is read)")
    out: str = setting("runs/tokenizer-8k", "folder to write the tokenizer to (must not exist)")
    vocab_size: int = setting(8192, "tokens in the vocabulary, special tokens included")


def main(cfg: TokenizerConfig) -> Path:
    texts = sorted(Path(cfg.data, "text").glob("*.jsonl"))
    if not texts:
        raise FileNotFoundError(f"no cleaned text in {cfg.data}/text: run `parley data prepare {cfg.data}` first")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists: choose a new out=")
    with tempfile.TemporaryDirectory() as tmp:  # the trainer reads plain text files
        plain = []
        for path in texts:
            target = Path(tmp) / (path.stem + ".txt")
            with open(path, encoding="utf-8") as src, open(target, "w", encoding="utf-8") as dst:
                for lineno, line in enumerate(src, 1):
                    try:
                        dst.write(json.loads(line)["text"] + "\n\n")
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(f'{path}:{lineno}: expected {{"text": ...}}; rebuild the folder with '
                                         f"`parley data prepare {cfg.data}`") from None
            if target.stat().st_size:
                plain.append(target)
        if not plain:  # the trainer would name its temporary files
            raise ValueError(f"the cleaned text in {cfg.data}/text is empty ({', '.join(p.name for p in texts)}): "
                             f"install the corpus sources (`make data-sources`) and run "
                             f"`parley data prepare {cfg.data}` again")
        tokenizer = Tokenizer.train(plain, vocab_size=cfg.vocab_size)
    tokenizer.save(out)
    print(f"trained a {tokenizer.vocab_size}-token BPE on {len(texts)} sources; saved to {out}")
    return out


if __name__ == "__main__":
    import sys

    from parley.config import parse_cli

    main(parse_cli(TokenizerConfig, sys.argv[1:], prog="parley train tokenizer"))
