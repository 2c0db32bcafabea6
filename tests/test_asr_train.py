"""`parley train asr`: the synthesized speech (cached, resumable, held-out voices and sentences
kept out), a tiny run whose loss falls, resume, the saved folder in transformers, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

from parley.cli import main as parley_main
from parley.config import load_config
from parley.train.asr import ASRConfig, frame_lengths, main as train_asr, normalized
from parley.voice.asr import load_asr
from parley.voice.audio import Clip
from parley.voice.speech_data import (HELDOUT_VOICES, SpeechConfig, SpeechDataError, check_voices, corpus_sentences,
                                      heldout_keys, load_clips, speakable, synthesize)

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

SENTENCES = ["the cat sat on the mat", "a dog ran to the park", "we like warm tea in the morning",
             "my sister reads books at night", "the sun is bright today", "open the door for me please",
             "he plays the piano very well", "it was a long and quiet day", "do you want some more bread",
             "they walked home after the game", "where did you put my keys", "this song makes me happy"]
VOICES = ["espeak:en-029+m1", "espeak:en-gb-scotland+f2"]
TINY = ["speech.clips=24", "speech.val_clips=4", "speech.shard_size=12", "speech.noise_prob=0.5",
        "speech.voices=" + json.dumps(VOICES), "speech.val_fraction=0.2",
        "model.hidden_size=32", "model.layers=1", "model.heads=2", "model.conv_width=16", "model.pos_kernel=8",
        "model.pos_groups=2", "train.device=cpu", "train.dtype=float32", "train.batch_size=4", "train.lr=3e-3",
        "train.warmup_steps=2", "train.log_every=2", "train.eval_every=0", "train.eval_batches=1",
        "heldout_voices=[\"espeak:en-us\"]", "heldout_sentences=2"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return path


@pytest.fixture(scope="module")
def speech(tmp_path_factory, text):
    return tmp_path_factory.mktemp("speech")


def config(tmp_path, text, speech, *more) -> ASRConfig:
    return load_config(ASRConfig, overrides=[f"run={tmp_path / 'run'}", f"data={speech}", f"text={text}", *TINY,
                                             *more])


def test_heldout_sentences_and_voices_stay_out_of_training(tmp_path):
    heldout = [k for k in sorted(heldout_keys()) if speakable(k, 3, 10) == k][:3]
    assert len(heldout) == 3
    path = tmp_path / "t.txt"
    path.write_text("\n".join([*heldout, "Hello there, how are you today?", "I have 3 cats.", "ha ha ha ha"]))
    assert corpus_sentences(text_file=path) == ["hello there how are you today"]  # digits, repeats, held-out: out
    assert speakable("It's  TIME to go!", 3, 10) == "it's time to go"
    for voice in HELDOUT_VOICES:
        with pytest.raises(SpeechDataError, match="held out"):
            check_voices(["espeak:en-029", voice])
    with pytest.raises(SpeechDataError, match="no espeak-ng voice"):
        check_voices(["espeak:en-029+nosuchvariant"])  # espeak-ng would speak its default voice instead
    with pytest.raises(SpeechDataError, match="no espeak-ng voice"):
        check_voices(["joe-like"])


def test_synthesis_is_cached_resumed_and_pinned(tmp_path):
    cfg = SpeechConfig(voices=VOICES, clips=6, val_clips=2, shard_size=3)
    logged = []
    synthesize(tmp_path, cfg, SENTENCES[:8], SENTENCES[8:], log=logged.append)
    assert len(logged) == 3
    audio, texts = load_clips(tmp_path, "train")
    assert len(audio) == 6 and set(texts) <= set(SENTENCES[:8]) and all(a.dtype == np.int16 for a in audio)
    assert all(len(a) > 4000 and np.abs(a).max() > 1000 for a in audio)  # half a second and more, not silent
    (tmp_path / "train-00001.npz").unlink()  # as if killed before that shard was written
    logged.clear()
    synthesize(tmp_path, cfg, SENTENCES[:8], SENTENCES[8:], log=logged.append)
    assert len(logged) == 1 and "train-00001" in logged[0]  # only what was missing, and the same again
    again, texts_again = load_clips(tmp_path, "train")
    assert texts_again == texts and all(np.array_equal(a, b) for a, b in zip(audio, again))
    with pytest.raises(SpeechDataError, match="other settings"):
        synthesize(tmp_path, SpeechConfig(voices=VOICES, clips=6, val_clips=2, shard_size=3, seed=1),
                   SENTENCES[:8], SENTENCES[8:])
    with pytest.raises(SpeechDataError, match="no sentences"):
        synthesize(tmp_path / "empty", cfg, [], SENTENCES)


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_tiny_run_learns_and_its_folder_loads_in_transformers(tmp_path, text, speech, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    code = parley_main(["train", "asr", f"run={tmp_path / 'run'}", f"data={speech}", f"text={text}", *TINY,
                        "train.steps=30"])
    assert code == 0
    out = capsys.readouterr().out
    assert "held-out voice espeak:en-us: WER" in out
    run = tmp_path / "run"
    curve = losses(run)
    assert np.mean(curve[-3:]) < 0.7 * np.mean(curve[:2]), curve
    result = json.loads((run / "result.json").read_text())
    assert 0 <= result["wer espeak:en-us"] and result["step"] == 30

    from parley.voice.wav2vec2 import load_folder

    folder = run / "model"
    ours, vocab, extractor = load_folder(folder)
    theirs = transformers.Wav2Vec2ForCTC.from_pretrained(folder).eval()
    processor = transformers.Wav2Vec2Processor.from_pretrained(folder)
    audio, _ = load_clips(speech, "val")
    x = audio[0].astype(np.float32) / 32768
    inputs = processor(x, sampling_rate=extractor["sampling_rate"], return_tensors="pt")
    # what training fed the model is what the saved feature extractor (and our loader) make of a clip
    assert torch.allclose(inputs.input_values[0], torch.from_numpy(normalized(audio[0])), atol=1e-4)
    assert torch.allclose(load_asr(str(folder)).inputs(Clip(x, extractor["sampling_rate"]))[0],
                          inputs.input_values[0], atol=1e-4)
    with torch.no_grad():
        expected = theirs(inputs.input_values).logits
        got = ours(inputs.input_values)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4)
    assert vocab.decode(got[0].argmax(-1).tolist()) == processor.batch_decode(expected.argmax(-1))[0]
    assert frame_lengths(ours.config, torch.tensor([len(x)])).item() == got.shape[1]


def test_resume_continues_where_the_checkpoint_left(tmp_path, text, speech, capsys):
    from safetensors.torch import load_file

    steps = ["train.steps=6", "train.save_every=3", "heldout_sentences=0"]
    train_asr(config(tmp_path / "a", text, speech, *steps))
    whole, cut = tmp_path / "a" / "run", tmp_path / "b" / "run"
    shutil.copytree(whole, cut)
    for done in ("checkpoints/step-000006", "model", "result.json"):  # as if killed after step 3's checkpoint
        shutil.rmtree(cut / done) if (cut / done).is_dir() else (cut / done).unlink()
    train_asr(config(tmp_path / "b", text, speech, *steps, "resume=true"))
    assert "resuming" in capsys.readouterr().out
    a, b = load_file(whole / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the last logged interval (steps 5-6) is the same; step 4's averages steps 3-4 only in the whole run
    assert losses(whole)[-1] == pytest.approx(losses(cut)[-1], abs=1e-6)
    with pytest.raises(FileExistsError, match="resume=true"):
        train_asr(config(tmp_path / "b", text, speech, *steps))


@pytest.mark.parametrize("setting, words", [
    ("speech.voices=[\"espeak:en-us\"]", "held out for evaluation"),
    ("speech.voices=[\"espeak:en-xx+m1\"]", "no espeak-ng voice"),
    ("speech.pitch=[1.2, 0.9]", "speech.pitch must be [low, high]"),
    ("speech.clips=0", "at least 1"),
    ("model.heads=5", "multiple of model.heads"),
    ("heldout_voices=[\"espeak:en-029\"]", "not among the benchmark's held-out voices"),
    ("text=/nonexistent/sentences.txt", "no text file"),
])
def test_bad_input_is_one_clear_error(tmp_path, text, speech, setting, words, capsys):
    code = parley_main(["train", "asr", f"run={tmp_path / 'run'}", f"data={tmp_path / 'speech'}", f"text={text}",
                        *TINY, setting])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err


def test_an_empty_text_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("ok\n1 2 3\n")
    code = parley_main(["train", "asr", f"run={tmp_path / 'run'}", f"data={tmp_path / 'speech'}", f"text={empty}",
                        *TINY])
    assert code == 2 and "no sentences to speak" in capsys.readouterr().err
