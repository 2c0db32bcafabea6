"""Voice-turn latency through the live voice route, end to end: a real server (SmolLM2, the
default pipeline, Whisper tiny.en, piper) on a local port, and a WebSocket client that streams
piper's speech of a held-out question in real time as a microphone does (one continuous stream,
speech then quiet, in 20 ms frames as `parley chat --live` sends them, each sent when its last
sample has been "captured"), and notes when the final transcript and the first audio of the answer arrive.

    python benchmarks/voice_live.py              # 5 questions
    python benchmarks/voice_live.py --short      # 2 questions (a minute or two)
    python benchmarks/voice_live.py --write      # append the table to benchmarks/RESULTS.md
    python benchmarks/voice_live.py --chunk-ms 100  # frames of 100 ms (what the CLI sent until 2026-12-06)

Latency = arrival of the first answer audio - the moment the last sample of speech was spoken (its
time in the stream), so the wait for the frame holding it to fill (up to one frame) is counted.
Everything the route does is in it: the end-of-turn rule (parley.voice.vad.EndOfTurn), Whisper, the
turn, the first clause's synthesis.
The last column is the server's own split of it, from the first audio message's `latency`
(parley/serve/routes_voice.py): last speech frame -> turn decided (the end-of-turn wait, with
the early transcription inside it), the final transcription (0: the early one was reused), turn
started -> first spoken text (pipeline stages and the model), the first piece's synthesis; it
says when the turn was started on the guess before it was decided (speculative start, ms after
the last speech frame) and when the first piece was synthesized from the model's draft before
the safety stage released its sentence (tts.HeadStart);
VOICE_LIVE_DEBUG=1 prints as well the server's timeline of each turn (`latency.marks`: ms after
the server read the last speech frame, up to the sending of the first audio).
The questions are benchmarks/voice.py's turn questions (the held-out intent utterances).
When a pause inside a question is taken for its end, the answer to the part heard so far may
start before the speech ends; that audio is not counted, the turn measured is the one that
follows the end of speech, and the table says so ("first answered early as ..."), with the count
under it. If the rest of the question is then judged no barge-in (it came while the early
answer played, and the rule took it for an echo or a noise), no turn follows it: the row says
so and the median leaves it out. VOICE_LIVE_DEBUG=1 prints every message the socket receives.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from record import append_section, commit, cpu_name
from voice import heldout_sentences


def serve(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return server, thread, f"ws://127.0.0.1:{sock.getsockname()[1]}/api/voice"


def one_turn(url: str, key: str, pcm: bytes, chunk_s: float = 0.02) -> dict:
    """Stream `pcm` (16 kHz PCM16 speech) and 10 s of quiet after it as one stream in real time,
    each `chunk_s` frame sent when its last sample is due; the arrival times, relative to the end
    of speech (the time in the stream of `pcm`'s last sample), of the final transcript and of the
    first answer audio."""
    from websockets.sync.client import connect

    step = int(chunk_s * 16_000) * 2
    stream = pcm + b"\0" * (-len(pcm) % step + round(10 / chunk_s) * step)  # quiet: in the frame speech ended in, 10 s
    chunks = [stream[i:i + step] for i in range(0, len(stream), step)]
    last = (len(pcm) - 1) // step  # the frame holding the last sample of speech
    marks: dict = {}
    with connect(url) as ws:
        ws.send(json.dumps({"type": "start", "api_key": key}))
        while json.loads(ws.recv(timeout=120))["type"] != "ready":
            pass
        start = time.perf_counter()
        marks["end"] = start + len(pcm) / 2 / 16_000

        def send():
            for i, chunk in enumerate(chunks):
                time.sleep(max(0.0, start + (i + 1) * chunk_s - time.perf_counter()))  # captured by now
                if "audio" in marks or "ignored" in marks:
                    return
                ws.send(chunk)
                if i == last:
                    marks["sent"] = True

        sender = threading.Thread(target=send)
        sender.start()
        while "audio" not in marks and "ignored" not in marks:
            message = ws.recv(timeout=60)
            if os.environ.get("VOICE_LIVE_DEBUG"):  # every message of the socket, for reading a turn's course
                print("received", message if isinstance(message, str) else f"{len(message)} bytes", file=sys.stderr)
            if isinstance(message, bytes):
                continue
            m = json.loads(message)
            if m["type"] == "transcript" and m["final"]:
                marks["heard"], marks["text"] = time.perf_counter(), m["text"]
            elif m["type"] == "audio" and "sent" not in marks:
                # a pause inside the utterance was taken for its end: the answer to the part heard so far
                # starts, and the rest of the speech takes the turn back; the turn measured is the last one
                marks.setdefault("early", marks.get("text", ""))
            elif m["type"] == "audio":
                marks["audio"], marks["latency"] = time.perf_counter(), m.get("latency", {})
            elif m["type"] == "ignored" and "early" in marks:
                # the rest of the question came while the early answer still played, and the barge-in
                # rule judged it no barge-in (e.g. an echo of the answer's words): no turn follows
                marks["ignored"] = f"{m['text']} ({m['reason']})"
            elif m["type"] == "error" or m["type"] == "ignored" or (m["type"] == "done" and "sent" in marks):
                raise RuntimeError(f"the turn ended without audio: {m}")
        sender.join()
    if "ignored" in marks:
        return {"early": marks["early"], "ignored": marks["ignored"], "text": marks["text"]}
    return {"early": marks.get("early"), "text": marks["text"], "heard_ms": (marks["heard"] - marks["end"]) * 1000,
            "audio_ms": (marks["audio"] - marks["end"]) * 1000, "stages": marks["latency"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="2 questions")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--chunk-ms", type=int, default=20, help="the client's frame: 20 ms as `parley chat "
                        "--live` sends (the web UI: 32)")
    parser.add_argument("--note", default="", help="a remark for the written section (e.g. the machine was loaded)")
    args = parser.parse_args()
    if not 10 <= args.chunk_ms <= 1000:
        parser.error(f"--chunk-ms must be 10..1000 (a frame is at most one second), not {args.chunk_ms}")
    torch.set_flush_denormal(True)
    from parley.serve.app import create_app
    from parley.serve.settings import Settings
    from parley.store import Store
    from parley.voice.audio import resample
    from parley.voice.tts import load_tts

    piper = load_tts("default")

    def pcm(text: str) -> bytes:
        clip = piper.synthesize(text)
        # trailing quiet of piper's clip is cut, so the last chunk holding speech is the end of speech
        samples = resample(clip.samples, clip.rate, 16_000)
        loud = np.flatnonzero(np.abs(samples) > 0.01)
        samples = samples[:loud[-1] + 1] if len(loud) else samples
        return (np.concatenate([np.zeros(3_200), samples]).clip(-1, 1) * 32767).round().astype("<i2").tobytes()

    n, turns = 8, 2 if args.short else 5
    questions = heldout_sentences(n + turns)[n:]
    rows = ["| question | heard as | end of speech -> final transcript ms | -> first answer audio ms "
            "| server: endpoint / ASR / first text / TTS ms |", "|---|---|---|---|---|"]
    latencies, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        db = f"{tmp}/parley.db"
        with Store(db) as store:
            key = store.create_api_key(store.add_user("bench").id)
        server, thread, url = serve(create_app(Settings(db=db, temperature=0, max_tokens=96, requests_per_minute=0)))
        try:
            one_turn(url, key, pcm("Hello there."), args.chunk_ms / 1000)  # warm up every stage
            for question in questions:
                r = one_turn(url, key, pcm(question), args.chunk_ms / 1000)
                results.append(r)
                if "ignored" in r:
                    rows.append(f"| {question} | answered early as \"{r['early']}\"; the rest ignored: "
                                f"{r['ignored']} | - | - | - |")
                    print(rows[-1], flush=True)
                    continue
                latencies.append(r["audio_ms"])
                s = r["stages"]
                if os.environ.get("VOICE_LIVE_DEBUG"):  # the server's timeline, ms after it read the last speech frame
                    print("marks", json.dumps(s.get("marks")), f"client: {r['audio_ms']:.0f} ms", file=sys.stderr)
                stages = " / ".join(str(s.get(k, "-")) for k in ("endpoint_ms", "asr_ms", "first_text_ms", "tts_ms"))
                marks = s.get("marks", {})
                if "speculated" in marks:  # the turn was started on the guess, before it was decided
                    stages += f" (started on the guess at {marks['speculated']})"
                if marks.get("tts_started", 0) < marks.get("frame:TextDelta", 0):  # HeadStart: from the draft
                    stages += " (first piece from the draft)"
                heard = r["text"] if r["early"] is None else f"{r['text']} (first answered early as \"{r['early']}\")"
                rows.append(f"| {question} | {heard} | {r['heard_ms']:.0f} | {r['audio_ms']:.0f} | {stages} |")
                print(rows[-1], flush=True)
        finally:  # the app's shutdown frees the speech models, whose threads must end before the interpreter
            server.should_exit = True
            thread.join(timeout=60)
    early, ignored = sum(r["early"] is not None for r in results), sum("ignored" in r for r in results)
    rows.append(f"\nmedian end of speech -> first audio through /api/voice: {np.median(latencies):.0f} ms "
                f"(goal < 700 ms); turns answered before the speech ended (a pause inside it taken for its end): "
                f"{early} of {len(results)}, {ignored} of them with the rest of the question "
                "ignored (not in the median)")
    print("\n".join(rows))
    if args.write:
        command = "python benchmarks/voice_live.py" + (" --short" if args.short else "") + \
            (f" --chunk-ms {args.chunk_ms}" if args.chunk_ms != 20 else "")
        append_section(f"\n## Voice: live-route turn latency, end to end ({dt.date.today()})\n\n"
                       f"Commit {commit()}, {cpu_name(flags=True)}, {torch.get_num_threads()} threads. "
                       f"Command: `{command} --write`. {args.note}\n\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
