"""Voice: audio checks (audio.py), speech synthesis (tts.py), speech recognition (asr.py, with our own
wav2vec 2.0 in wav2vec2.py), and voice activity detection (vad.py)."""
