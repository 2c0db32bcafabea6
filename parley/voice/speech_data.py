"""Speech to train a recogniser on, synthesized here: sentences of the project's own dialog corpora
(chatterbot-corpus and chitchat-dataset, what `parley data prepare` gives `parley train sft`)
spoken by many espeak-ng voices at random speeds and pitches, with noise at random SNRs added.

    cfg = SpeechConfig(clips=4000)
    train, val = split_sentences(corpus_sentences(), cfg.val_fraction)
    synthesize(".data/asr-speech", cfg, train, val)      # cached in shards: a rerun only adds what is missing
    audio, texts = load_clips(".data/asr-speech", "train")

The voices that benchmarks/voice.py scores recognisers with (HELDOUT_VOICES: piper's joe and four
espeak-ng voices) are refused as training voices, and every sentence of its held-out set
(benchmarks/data/intents_heldout.yml) is left out of the training text, by exact sentence after
normalising. Shards are written atomically (`shard-00003.npz` appears whole or not at all), and
manifest.json pins the settings and sentences they were made with: a cache made with other
settings is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from parley.config import setting
from parley.files import NotRegularFile, atomic_open, read_regular
from parley.voice.asr import normalize
from parley.voice.audio import resample

REPO = Path(__file__).resolve().parents[2]
HELDOUT_SET = REPO / "benchmarks" / "data" / "intents_heldout.yml"
RATE = 8_000  # the clips' sampling rate: telephone speech is intelligible and costs the convolutions half
HELDOUT_VOICES = ("joe", "espeak:en-us", "espeak:en-gb", "espeak:en-us+f3", "espeak:en-gb-x-rp+m3")
# The CTC vocabulary, as a Wav2Vec2CTCTokenizer's vocab.json: <pad> is the blank, | the word gap.
CHARS = ["<pad>", "<s>", "</s>", "<unk>", "|", "'", *"abcdefghijklmnopqrstuvwxyz"]
_ACCENTS = ("en-029", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
_VARIANTS = ("m1", "m2", "m4", "m5", "m6", "m7", "f1", "f2", "f4", "klatt", "klatt2", "Andy", "Annie", "edward",
             "iven2", "linda", "max", "steph")
TRAIN_VOICES = [f"espeak:{a}+{v}" for a in _ACCENTS for v in _VARIANTS]


class SpeechDataError(ValueError):
    """Settings, voices or a cache that cannot make training speech (one line, saying what to do)."""


@dataclass
class SpeechConfig:
    """How the training speech is made; every field is pinned in the cache's manifest."""

    voices: list[str] = setting(factory=lambda: list(TRAIN_VOICES),
                                help="espeak:LANG+VARIANT voices to train on (never one of HELDOUT_VOICES)")
    clips: int = setting(4000, "training clips to synthesize (sentences are reused round-robin)")
    val_clips: int = setting(128, "validation clips (held-out sentences, training voices)")
    shard_size: int = setting(200, "clips per cache shard (the unit of resuming)")
    speed: list[float] = setting(factory=lambda: [0.8, 1.3], help="espeak speaking-rate factor range")
    pitch: list[float] = setting(factory=lambda: [0.88, 1.12],
                                 help="pitch/tempo factor range (resampling, as speed perturbation does)")
    snr_db: list[float] = setting(factory=lambda: [5.0, 30.0], help="signal-to-noise ratio range of added noise")
    noise_prob: float = setting(0.8, "fraction of clips that get noise (white or pink)")
    min_words: int = setting(3, "shortest sentence in words")
    max_words: int = setting(10, "longest sentence in words")
    val_fraction: float = setting(0.02, "fraction of sentences held out for validation (by hash)")
    seed: int = setting(0, "fixes the voice, speed, pitch and noise of every clip")

    def __post_init__(self):
        for name in ("speed", "pitch", "snr_db"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not low_high[0] <= low_high[1] or (name != "snr_db" and low_high[0] <= 0):
                raise SpeechDataError(f"speech.{name} must be [low, high] with low <= high, got {low_high}"
                                      + ("" if name == "snr_db" else " (both positive)"))
        if self.clips < 1 or self.val_clips < 1 or self.shard_size < 1:
            raise SpeechDataError("speech.clips, speech.val_clips and speech.shard_size must be at least 1")
        if not 0 <= self.noise_prob <= 1 or not 0 < self.val_fraction < 1:
            raise SpeechDataError("speech.noise_prob must be within [0, 1] and speech.val_fraction within (0, 1)")
        if not 1 <= self.min_words <= self.max_words:
            raise SpeechDataError(f"speech.min_words ({self.min_words}) must be 1..max_words ({self.max_words})")
        if not self.voices:
            raise SpeechDataError("speech.voices is empty: name at least one espeak:LANG+VARIANT voice")


# ---------------------------------------------------------------- text

def sentence_key(text: str) -> str:
    return " ".join(normalize(text))


def heldout_keys() -> set[str]:
    """Every sentence of benchmarks/voice.py's held-out set, normalised: kept out of training."""
    import yaml

    examples = yaml.safe_load(HELDOUT_SET.read_text())["examples"]
    return {sentence_key(t) for texts in examples.values() for t in texts}


def speakable(text: str, min_words: int, max_words: int) -> str | None:
    """The sentence in CTC characters (lower case, apostrophes, single spaces), or None when it has
    digits or symbols a reader would voice differently, or is too short or long."""
    text = re.sub(r"[.,!?;:\"()]+", " ", text.lower().replace("’", "'").replace("-", " "))
    words = text.split()
    if not min_words <= len(words) <= max_words or not re.fullmatch(r"[a-z' ]+", " ".join(words)) \
            or len(set(words)) * 2 < len(words):  # "a a a a", "ha ha ha": not sentences
        return None
    return " ".join(w.strip("'") for w in words if w.strip("'")) or None


def corpus_sentences(min_words: int = 3, max_words: int = 10, text_file: str | Path | None = None) -> list[str]:
    """Distinct sentences in CTC characters, held-out ones removed, in a fixed (sorted) order: of
    the dialog corpora, or of `text_file` (one sentence or more a line) when given."""
    if text_file is not None:
        path = Path(text_file)
        try:
            lines = read_regular(path).decode("utf-8").splitlines()  # a FIFO would block, a device never end
        except FileNotFoundError:
            raise SpeechDataError(f"no text file {path}: give a UTF-8 file of sentences, or leave text= empty") from None
        except NotRegularFile:
            raise SpeechDataError(f"text file {path} is not a regular file (a folder, pipe or device)") from None
        except UnicodeDecodeError as e:
            line = e.object[:e.start].count(b"\n") + 1
            raise SpeechDataError(f"{path}:{line}: not UTF-8 text; give a UTF-8 file of sentences") from None
    else:
        import chatterbot_corpus
        import chitchat_dataset

        from parley.train.corpus import read_chatterbot, read_chitchat

        dialogs = [*read_chatterbot(Path(chatterbot_corpus.__file__).parent / "data" / "english"),
                   *read_chitchat(Path(chitchat_dataset.__file__).parent / "dataset.json")]
        lines = [line for messages in dialogs for m in messages for line in m["content"].splitlines()]
    found = {s for line in lines for part in re.split(r"(?<=[.!?])\s+", line)
             if (s := speakable(part, min_words, max_words)) is not None}
    return sorted(found - heldout_keys())


def split_sentences(sentences: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) by a hash of each sentence, so adding sentences never moves one across."""
    def unit(s: str) -> float:
        return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") / 2**64

    return [s for s in sentences if unit(s) >= val_fraction], [s for s in sentences if unit(s) < val_fraction]


def encode_text(text: str) -> list[int]:
    ids = {c: i for i, c in enumerate(CHARS)}
    return [ids["|"] if c == " " else ids.get(c, ids["<unk>"]) for c in text]


# ---------------------------------------------------------------- voices

def _espeak_names(kind: str) -> set[str]:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SpeechDataError("espeak-ng is not installed: `apt-get install espeak-ng` (or `make voice`)")
    out = subprocess.run([binary, f"--voices={kind}"], capture_output=True, text=True, timeout=30).stdout
    rows = [line.split() for line in out.splitlines()[1:] if line.split()]
    if kind == "variant":  # File column: !v/NAME
        return {r[-1].split("/", 1)[1] for r in rows if r[-1].startswith("!v/")}
    return {r[1] for r in rows}


def check_voices(voices: list[str], heldout: tuple[str, ...] = HELDOUT_VOICES) -> None:
    """Refuse a voice espeak-ng lacks (it would silently speak its default instead) or one that
    the benchmark holds out."""
    languages, variants = _espeak_names("en"), _espeak_names("variant")
    for voice in voices:
        if voice in heldout:
            raise SpeechDataError(f"voice {voice!r} is held out for evaluation (benchmarks/voice.py): "
                                  "train on other voices")
        lang, _, variant = voice.removeprefix("espeak:").partition("+")
        if not voice.startswith("espeak:") or lang not in languages or (variant and variant not in variants):
            raise SpeechDataError(f"no espeak-ng voice {voice!r}: use espeak:LANG or espeak:LANG+VARIANT with LANG "
                                  f"from `espeak-ng --voices=en` and VARIANT from `espeak-ng --voices=variant`")


# ---------------------------------------------------------------- synthesis

def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """White noise, or pink (power falling as 1/f, shaped in the frequency domain)."""
    white = rng.standard_normal(n)
    if rng.random() < 0.5:
        return white
    spectrum = np.fft.rfft(white)
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    return np.fft.irfft(spectrum, n)


def render(tts, text: str, cfg: SpeechConfig, rng: np.random.Generator) -> np.ndarray:
    """One augmented clip at RATE, float32: the voice at a random speed; a pitch/tempo factor by
    resampling; random silence around it, a random level, and noise at a random SNR."""
    clip = tts.synthesize(text, speed=float(rng.uniform(*cfg.speed)))
    pitch = rng.uniform(*cfg.pitch)
    x = resample(clip.samples, clip.rate, int(round(RATE / pitch))).astype(np.float64)
    pad = rng.integers(0, int(0.25 * RATE), size=2)
    x = np.concatenate([np.zeros(pad[0]), x, np.zeros(pad[1])])
    x *= rng.uniform(0.2, 0.9) / max(np.abs(x).max(), 1e-6)
    if rng.random() < cfg.noise_prob:
        noise = _noise(rng, len(x))
        snr = rng.uniform(*cfg.snr_db)
        x += noise * np.sqrt(np.mean(x ** 2) / (np.mean(noise ** 2) * 10 ** (snr / 10)))
    return np.clip(x, -1, 1).astype(np.float32)


def _manifest(cfg: SpeechConfig, train: list[str], val: list[str]) -> dict:
    digest = hashlib.sha256("\n".join(train + ["--"] + val).encode()).hexdigest()
    return {"speech": asdict(cfg), "sentences_sha256": digest, "train_sentences": len(train),
            "val_sentences": len(val)}


def synthesize(folder, cfg: SpeechConfig, train: list[str], val: list[str], log=print) -> Path:
    """Fill `folder` with train-NNNNN.npz and val-NNNNN.npz shards (int16 audio, offsets, texts,
    voices); shards already there are kept, so an interrupted synthesis resumes."""
    from parley.voice.tts import load_tts

    if not train or not val:
        raise SpeechDataError(f"no sentences to speak ({len(train)} for training, {len(val)} for validation): "
                              "is the corpus empty, or speech.min_words/max_words too narrow?")
    check_voices(cfg.voices)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest, path = _manifest(cfg, train, val), folder / "manifest.json"
    if path.exists() and json.loads(path.read_text()) != manifest:
        raise SpeechDataError(f"{folder} holds speech made with other settings or sentences: "
                              "choose another speech folder (data=) or delete it")
    if not path.exists():
        with atomic_open(path) as f:
            json.dump(manifest, f, indent=2)
    voices = {}
    for split, sentences, total in (("train", train, cfg.clips), ("val", val, cfg.val_clips)):
        order = np.random.default_rng([cfg.seed, split == "val"]).permutation(len(sentences))  # not alphabetical
        shards = -(-total // cfg.shard_size)
        for shard in range(shards):
            out = folder / f"{split}-{shard:05d}.npz"
            if out.exists():
                continue
            rng = np.random.default_rng([cfg.seed, split == "val", shard])
            first = shard * cfg.shard_size
            texts = [sentences[order[i % len(sentences)]] for i in range(first, min(total, first + cfg.shard_size))]
            chosen = [cfg.voices[i] for i in rng.integers(len(cfg.voices), size=len(texts))]
            clips = []
            for text, voice in zip(texts, chosen):
                tts = voices.setdefault(voice, load_tts(voice))
                clips.append((render(tts, text, cfg, rng) * 32767).astype(np.int16))
            offsets = np.cumsum([0] + [len(c) for c in clips])
            with atomic_open(out, "wb") as f:
                np.savez(f, audio=np.concatenate(clips), offsets=offsets, texts=np.array(texts),
                         voices=np.array(chosen))
            log(f"speech: {out.name} ({len(texts)} clips, {offsets[-1] / RATE / 60:.1f} min)")
    return folder


def load_clips(folder, split: str) -> tuple[list[np.ndarray], list[str]]:
    """(int16 clips at RATE, their texts) of every shard of a split."""
    files = sorted(Path(folder).glob(f"{split}-*.npz"))
    if not files:
        raise SpeechDataError(f"no {split} speech in {folder}: synthesize it first")
    audio, texts = [], []
    for file in files:
        with np.load(file) as shard:
            offsets, samples = shard["offsets"], shard["audio"]  # each shard["audio"] reads the array anew
            audio += np.split(samples, offsets[1:-1])
            texts += [str(t) for t in shard["texts"]]
    return audio, texts
