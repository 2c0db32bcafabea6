"""`parley chat --live`: talk to the assistant through the default microphone and speaker.

    parley chat --live                                   # the assistant runs here
    parley chat --live --server http://HOST:8000 --api-key KEY

The microphone's audio goes, 20 ms at a time, to the live voice route (/api/voice,
parley/serve/routes_voice.py) of a server: the given one, or one started here on a loopback
port for this session alone (no keys, the chat's own settings). So the turn-taking is the web
UI's Talk button's exactly: the end-of-turn rule, barge-in (speak over the answer to stop it),
a pause inside a sentence taken back. What it hears and answers is printed; the answer is
played on the default output as it is synthesized, and stopped when the user barges in.
Needs an audio device and `pip install sounddevice` (with the PortAudio library,
`apt-get install libportaudio2`); without either, it says so and exits with status 2.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from typing import TextIO

RATE = 16_000
FRAME = RATE // 50  # samples a message: 20 ms (the end of speech waits for its frame to fill before the
# server hears it; 100 ms frames cost 50 ms a turn on average: benchmarks/voice_live.py --chunk-ms)


class LiveAudioError(ValueError):
    """No audio device or no audio library: a line that says what to install or plug in."""


def audio_library():
    """sounddevice, with a clear error when it or PortAudio is missing, or no device exists."""
    try:
        import sounddevice
    except ImportError:
        raise LiveAudioError("live voice needs the sounddevice package: pip install sounddevice==0.5.6") from None
    except OSError:  # the package is there but the PortAudio library is not
        raise LiveAudioError("live voice needs the PortAudio library: apt-get install libportaudio2") from None
    for kind in ("input", "output"):
        try:
            sounddevice.query_devices(kind=kind)
        except (sounddevice.PortAudioError, ValueError):
            raise LiveAudioError(f"there is no audio {kind} device: plug in a "
                                 f"{'microphone' if kind == 'input' else 'speaker or headphones'}, "
                                 "or use --audio-in FILE.wav --audio-out FILE.wav") from None
    return sounddevice


class Player:
    """Plays PCM16 pieces one after another on the default output; `clear` drops what is queued."""

    def __init__(self, sd):
        self.sd, self.pieces, self.stream = sd, queue.Queue(), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def play(self, pcm: bytes, rate: int) -> None:
        self.pieces.put((pcm, rate))

    def clear(self) -> None:
        while not self.pieces.empty():
            self.pieces.get_nowait()
        if self.stream is not None:
            self.stream.abort()  # what the device still holds stops now

    def close(self) -> None:
        self.pieces.put(None)
        self.thread.join(timeout=5)

    def _run(self) -> None:
        import numpy as np

        while (item := self.pieces.get()) is not None:
            pcm, rate = item
            if self.stream is None or self.stream.samplerate != rate:
                if self.stream is not None:
                    self.stream.close()
                self.stream = self.sd.OutputStream(samplerate=rate, channels=1, dtype="int16")
            if not self.stream.active:
                self.stream.start()
            try:
                self.stream.write(np.frombuffer(pcm, "<i2").reshape(-1, 1))
            except self.sd.PortAudioError:  # aborted by `clear`
                pass
        if self.stream is not None:
            self.stream.close()


def talk(url: str, key: str = "", voice: str = "default", stdout: TextIO = sys.stdout, turns: int = 0) -> int:
    """Bridge the default microphone and speaker to the live voice route at `url` (ws://.../api/voice)
    until Ctrl-C (or, with `turns`, until that many answers are done)."""
    from websockets.sync.client import connect

    sd = audio_library()
    heard: queue.Queue = queue.Queue()
    player = Player(sd)
    done = 0
    with connect(url, max_size=2 ** 24) as ws:
        ws.send(json.dumps({"type": "start", "api_key": key, "voice": voice}))
        heading = None

        def capture(indata, frames, time, status):  # PortAudio's thread: hand the bytes on
            heard.put(bytes(indata))

        def send():
            while (pcm := heard.get()) is not None:
                try:
                    ws.send(pcm)
                except Exception:  # the socket closed: the receiving side reports why
                    return

        sender = threading.Thread(target=send, daemon=True)
        microphone = sd.RawInputStream(samplerate=RATE, channels=1, dtype="int16", blocksize=FRAME,
                                       callback=capture)
        try:
            for message in ws:
                if isinstance(message, bytes):
                    if heading is not None:
                        player.play(message, heading["rate"])
                    heading = None
                    continue
                m = json.loads(message)
                kind = m["type"]
                if kind == "ready":
                    print(f"(listening: speak; Ctrl-C ends; voice {m['voice']})", file=stdout, flush=True)
                    sender.start()
                    microphone.start()
                elif kind == "transcript" and m["final"]:
                    print(f"you> {m['text']}", file=stdout, flush=True)
                elif kind == "turn":
                    stdout.write("assistant> ")
                elif kind == "text":
                    stdout.write(m["text"])
                    stdout.flush()
                elif kind == "audio":
                    heading = m
                elif kind == "interrupted":
                    player.clear()
                    print(" [interrupted]", file=stdout, flush=True)
                elif kind == "done":
                    print(file=stdout, flush=True)
                    done += 1
                    if turns and done >= turns:
                        break
                elif kind == "error":
                    raise LiveAudioError(f"the voice session ended: {m['message']}")
        except KeyboardInterrupt:
            pass
        finally:
            microphone.stop()
            microphone.close()
            heard.put(None)
            player.close()
            try:
                ws.send(json.dumps({"type": "stop"}))
            except Exception:  # closed already
                pass
    return 0


def talk_locally(cfg, stdout: TextIO = sys.stdout) -> int:
    """`talk` to a server started here for this session: the chat's assistant settings, no keys,
    a loopback port of the system's choosing; it is shut down (models freed) before returning."""
    import socket
    from dataclasses import fields

    import uvicorn

    from parley.pipeline.assistant import AssistantConfig
    from parley.serve.app import create_app
    from parley.serve.http import BoundedHttp
    from parley.serve.settings import Settings

    audio_library()  # no device: said before the slow loads
    settings = Settings(**{f.name: getattr(cfg, f.name) for f in fields(AssistantConfig)}, no_auth=True,
                        requests_per_minute=0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    http = BoundedHttp.capped(settings.max_connections_per_client, settings.max_connections)  # as `parley serve`
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", http=http))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        return talk(f"ws://127.0.0.1:{sock.getsockname()[1]}/api/voice", voice=cfg.voice, stdout=stdout)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
