"""`parley chat --live` (parley/voice/live.py) through a real audio device without hardware: ALSA's
`file` plugin as the default device (its capture reads a raw PCM file, its playback writes one),
reached through PortAudio and sounddevice as a microphone and speaker would be. The question is
piper's speech; the server is the live voice route on the tiny model. Without PortAudio
(apt-get install libportaudio2) or sounddevice these tests are skipped."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parley.voice.asr import wer
from parley.voice.audio import resample
from test_voice_live import make_site, ws_url

try:
    import sounddevice  # noqa: F401
except (ImportError, OSError):  # OSError: the package without the PortAudio library
    pytest.skip("sounddevice or PortAudio is not installed", allow_module_level=True)
pytest.importorskip("faster_whisper")
pytest.importorskip("piper")

ASK = "Turn on the kitchen lights."
ROOT = Path(__file__).resolve().parents[1]


def alsa_device(folder: Path, question: bytes) -> dict:
    """An environment whose default ALSA device captures `question` and writes what it plays."""
    (folder / "in.raw").write_bytes(question)
    (folder / "alsa").mkdir()
    (folder / "alsa" / "asoundrc").write_text(
        'pcm.!default {\n type file\n slave.pcm "null"\n format "raw"\n'
        f' file "{folder / "out.raw"}"\n infile "{folder / "in.raw"}"\n}}\n')
    return {**os.environ, "XDG_CONFIG_HOME": str(folder), "PYTHONPATH": str(ROOT)}


def test_live_chat_hears_the_microphone_and_speaks_to_the_output(tiny768_registry, tmp_path):
    from parley.voice.tts import load_tts

    clip = load_tts("default").synthesize(ASK)
    speech = resample(clip.samples, clip.rate, 16_000)
    samples = np.concatenate([np.zeros(3_200), speech, np.zeros(16_000 * 4)])  # then 4 s of quiet
    env = alsa_device(tmp_path, (samples.clip(-1, 1) * 32767).round().astype("<i2").tobytes())
    site, key, _ = make_site(tiny768_registry, tmp_path)
    with site as url:
        run = subprocess.run([sys.executable, "-c", "import sys; from parley.voice.live import talk; "
                              "sys.exit(talk(sys.argv[1], sys.argv[2], turns=1))", ws_url(url), key],
                             env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    heard = next(line for line in lines if line.startswith("you> ")).removeprefix("you> ")
    assert wer(ASK, heard) <= 0.25, run.stdout
    assert any(line.startswith("assistant> ") for line in lines)
    played = np.frombuffer((tmp_path / "out.raw").read_bytes(), "<i2")
    assert np.abs(played).max() > 1000  # the answer's speech reached the output device


def test_live_chat_without_a_device_says_so(tmp_path):
    (tmp_path / "alsa").mkdir()
    (tmp_path / "alsa" / "asoundrc").write_text('pcm.!default { type hw card 99 }\nctl.!default { type hw card 99 }\n')
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    probe = subprocess.run([sys.executable, "-c", "import sounddevice as sd; print(len(sd.query_devices()))"],
                           env=env, capture_output=True, text=True, timeout=60)
    if probe.stdout.strip() != "0":
        pytest.skip("this machine has an audio device")
    run = subprocess.run([sys.executable, "-m", "parley.cli", "chat", "--live"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "no audio input device" in run.stderr, run.stderr
