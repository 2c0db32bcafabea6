"""`parley train asr`: a small wav2vec 2.0 recogniser (parley/voice/wav2vec2.py) trained from
random weights with CTC over characters, on speech synthesized from the dialog corpora by many
espeak-ng voices (parley/voice/speech_data.py), then scored on voices it never heard.

    parley train asr recipes/asr-tiny.toml                           # ~10 min synthesis + ~40 min training, one CPU thread
    parley train asr recipes/asr-tiny.toml train.steps=20 speech.clips=200 run=runs/asr-quick
    parley transcribe clip.wav --model runs/asr-tiny/model           # the result: an HF folder

The run folder holds the loop's checkpoints (resume=true continues them) and, at the end,
`model/`: a Wav2Vec2ForCTC folder (config.json, model.safetensors, vocab.json, tokenizer and
feature-extractor configs) that our loader and `transformers` both read. The shape is the
base model's (raw-waveform convolutions, 320 samples a frame, a convolutional position
embedding, a transformer), smaller: the convolutions are LayerNorm'd and the transformer
pre-norm ("stable layer norm"), so that padding in a batch changes no clip's features.
Batches are clips of similar length (sorted, then cut), so padding stays small; the transformer
has no attention mask, as HF's base models have none.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file

from parley.config import setting
from parley.files import atomic_open, fsync
from parley.train.loop import TrainConfig, _unique_state, resolve_device, train
from parley.train.losses import ctc_loss
from parley.train.stage import claim_run, processes
from parley.voice.audio import MODEL_RATE
from parley.voice.speech_data import (CHARS, HELDOUT_VOICES, RATE, SpeechConfig, SpeechDataError, corpus_sentences,
                                      encode_text, load_clips, split_sentences, synthesize)
from parley.voice.wav2vec2 import Wav2Vec2Config, Wav2Vec2CTC


# Four convolutions instead of the base model's seven, with the same 320 samples (20 ms) a frame:
# on a CPU the elementwise work on the early, long feature maps costs more than the matmuls.
CONV_KERNEL, CONV_STRIDE = (10, 8, 4, 4), (5, 4, 4, 2)  # 160 samples a frame: 20 ms at 8 kHz


@dataclass
class ASRModelConfig:
    hidden_size: int = setting(192, "transformer width")
    layers: int = setting(4, "transformer layers")
    heads: int = setting(4, "attention heads")
    conv_width: int = setting(128, "channels of the waveform convolutions (the first has half)")
    feat_norm: Literal["layer", "group"] = setting("layer", "layer: LayerNorm after every convolution; group: GroupNorm after the first")
    pos_kernel: int = setting(32, "frames the convolutional position embedding spans (20 ms each)")
    pos_groups: int = setting(8, "groups of that convolution")

    def __post_init__(self):
        if min(self.hidden_size, self.layers, self.heads, self.conv_width, self.pos_kernel, self.pos_groups) < 1:
            raise ValueError("every model.* size must be at least 1")
        if self.hidden_size % self.heads or self.hidden_size % self.pos_groups:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be a multiple of model.heads "
                             f"({self.heads}) and model.pos_groups ({self.pos_groups})")

    def wav2vec2(self) -> Wav2Vec2Config:
        return Wav2Vec2Config(vocab_size=len(CHARS), hidden_size=self.hidden_size, num_hidden_layers=self.layers,
                              num_attention_heads=self.heads, intermediate_size=4 * self.hidden_size,
                              feat_extract_norm=self.feat_norm, conv_dim=(self.conv_width // 2,) + (self.conv_width,) * 3,
                              conv_kernel=CONV_KERNEL, conv_stride=CONV_STRIDE, conv_bias=True,
                              num_conv_pos_embeddings=self.pos_kernel,
                              num_conv_pos_embedding_groups=self.pos_groups, do_stable_layer_norm=True)


@dataclass
class ASRConfig:
    run: str = setting(help="run folder: config, metrics, plot, checkpoints, model/ (must be new unless resume)")
    data: str = setting(".data/asr-speech", "folder of the synthesized speech (a cache: reused when it fits)")
    resume: bool = setting(False, "continue the run in `run` from its newest checkpoint")
    text: str = setting("", "a text file to speak instead of the dialog corpora ('' = chatterbot + chitchat)")
    heldout_voices: list[str] = setting(factory=lambda: ["espeak:en-us", "espeak:en-gb-x-rp+m3"],
                                        help="voices never trained on, scored (WER) at the end")
    heldout_sentences: int = setting(40, "validation sentences each held-out voice speaks for that WER")
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    model: ASRModelConfig = field(default_factory=ASRModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if unknown := [v for v in self.heldout_voices if v not in HELDOUT_VOICES]:
            raise ValueError(f"heldout_voices {unknown} are not among the benchmark's held-out voices "
                             f"({', '.join(HELDOUT_VOICES)})")
        if self.heldout_sentences < 0:
            raise ValueError("heldout_sentences must be >= 0")


def frame_lengths(cfg: Wav2Vec2Config, samples: torch.Tensor) -> torch.Tensor:
    """Output frames of clips of `samples` samples (each convolution: floor((n - kernel) / stride) + 1)."""
    n = samples.clone()
    for kernel, stride in zip(cfg.conv_kernel, cfg.conv_stride):
        n = torch.div(n - kernel, stride, rounding_mode="floor") + 1
    return n.clamp(min=0)


def normalized(clip: np.ndarray) -> np.ndarray:
    """As Wav2Vec2FeatureExtractor(do_normalize=True): zero mean, unit variance per clip."""
    x = clip.astype(np.float32) / 32768
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


class SpeechBatches:
    """Clips cut into batches of similar length; `batch(i)` is (audio (b, samples) zero-padded,
    samples (b,), targets (all characters), target lengths (b,)), CTC's inputs."""

    def __init__(self, audio: list[np.ndarray], texts: list[str], batch_size: int):
        order = np.argsort([len(a) for a in audio], kind="stable")
        self.audio, self.labels = audio, [encode_text(t) for t in texts]
        self.batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def batch(self, i: int):
        rows = self.batches[i]
        longest = max(len(self.audio[r]) for r in rows)
        audio = torch.zeros(len(rows), longest)
        for j, r in enumerate(rows):
            audio[j, :len(self.audio[r])] = torch.from_numpy(normalized(self.audio[r]))
        return (audio, torch.tensor([len(self.audio[r]) for r in rows]),
                torch.tensor([c for r in rows for c in self.labels[r]]), torch.tensor([len(self.labels[r]) for r in rows]))

    def sampler(self, seed: int):
        """get_batch for the loop: a pure function of (seed, step, micro, rank)."""
        def get_batch(step: int, micro: int, rank: int, world: int):
            return self.batch(int(np.random.default_rng([seed, step, micro, rank]).integers(len(self.batches))))
        return get_batch


def speech_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """loss_fn for the loop: CTC of the model's character logits against the clips' texts."""
    audio, samples, targets, target_lengths = batch
    logits = model(audio)
    frames = frame_lengths(model.config, samples).clamp(max=logits.shape[1])
    return ctc_loss(logits, targets, frames, target_lengths), {}


def save_folder(model: Wav2Vec2CTC, folder: Path) -> Path:
    """The model as an HF Wav2Vec2ForCTC folder with its tokenizer and feature extractor, built
    beside `folder` and renamed over it when complete."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = asdict(model.config)
    config = {**cfg, "conv_dim": list(cfg["conv_dim"]), "conv_stride": list(cfg["conv_stride"]),
              "conv_kernel": list(cfg["conv_kernel"]), "num_feat_extract_layers": len(cfg["conv_dim"]),
              "model_type": "wav2vec2", "architectures": ["Wav2Vec2ForCTC"], "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2, "ctc_loss_reduction": "mean", "feat_extract_activation": "gelu"}
    files = {
        "config.json": config,
        "vocab.json": {c: i for i, c in enumerate(CHARS)},
        "tokenizer_config.json": {"tokenizer_class": "Wav2Vec2CTCTokenizer", "pad_token": "<pad>", "unk_token": "<unk>",
                                  "bos_token": "<s>", "eos_token": "</s>", "word_delimiter_token": "|",
                                  "do_lower_case": False},
        "special_tokens_map.json": {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
        "preprocessor_config.json": {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
                                     "sampling_rate": RATE, "padding_value": 0.0, "padding_side": "right",
                                     "do_normalize": True, "return_attention_mask": True,
                                     "processor_class": "Wav2Vec2Processor"},
    }
    for name, value in files.items():
        (tmp / name).write_text(json.dumps(value, indent=2) + "\n")
    save_file(_unique_state(model.float()), tmp / "model.safetensors")
    for name in (*files, "model.safetensors"):
        fsync(tmp / name)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    fsync(folder.parent)
    return folder


def heldout_wer(folder: Path, sentences: list[str], voices: list[str]) -> dict[str, float]:
    """Pooled WER of the saved model on `sentences` spoken plainly by each held-out voice."""
    from parley.voice.asr import load_asr, word_edits
    from parley.voice.audio import Clip, resample
    from parley.voice.tts import load_tts

    asr, scores = load_asr(str(folder)), {}
    for voice in voices:
        tts, edits, words = load_tts(voice), 0, 0
        for text in sentences:
            clip = tts.synthesize(text)
            heard = asr.transcribe(Clip(resample(clip.samples, clip.rate, MODEL_RATE), MODEL_RATE)).text
            e, w = word_edits(text, heard)
            edits, words = edits + e, words + w
        scores[voice] = edits / max(words, 1)
    return scores


def main(cfg: ASRConfig) -> dict:
    t = cfg.train
    device = resolve_device(t.device)
    with processes(device) as (rank, world):
        if world > 1:
            raise ValueError("parley train asr runs in one process: start it without torchrun")
        sentences = corpus_sentences(cfg.speech.min_words, cfg.speech.max_words, cfg.text or None)
        train_text, val_text = split_sentences(sentences, cfg.speech.val_fraction)
        run = claim_run(cfg)
        synthesize(cfg.data, cfg.speech, train_text, val_text)
        training = SpeechBatches(*load_clips(cfg.data, "train"), t.batch_size)
        validation = SpeechBatches(*load_clips(cfg.data, "val"), t.batch_size)
        torch.manual_seed(t.seed)
        model = Wav2Vec2CTC(model_cfg := cfg.model.wav2vec2())
        params = sum(p.numel() for p in model.parameters())
        hours = sum(len(a) for a in training.audio) / RATE / 3600
        print(f"asr: {params / 1e6:.2f}M parameters, {len(training.audio)} training clips ({hours:.2f} h) "
              f"from {len(cfg.speech.voices)} voices, {len(validation.audio)} validation clips")
        final = train(model, t, run, training.sampler(t.seed), speech_loss,
                      eval_batches=lambda: (validation.batch(i) for i in range(len(validation.batches))),
                      resume=cfg.resume)
        folder = save_folder(model.cpu().eval(), run / "model")
        print(f"saved {folder}: parley transcribe FILE.wav --model {folder}")
        if cfg.heldout_voices and cfg.heldout_sentences:
            picked = [val_text[i] for i in np.random.default_rng(t.seed).permutation(len(val_text))]
            scores = heldout_wer(folder, picked[:cfg.heldout_sentences], cfg.heldout_voices)
            for voice, score in scores.items():
                print(f"held-out voice {voice}: WER {score:.3f} on {cfg.heldout_sentences} validation sentences")
            final.update({f"wer {v}": s for v, s in scores.items()})
        with atomic_open(run / "result.json") as f:
            json.dump({"params": params, "train_hours": hours, **final}, f, indent=2, default=str)
        return {**final, "model": str(folder)}
