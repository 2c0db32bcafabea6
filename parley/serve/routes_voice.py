"""The live voice route: a WebSocket that listens, answers and speaks, turn after turn.

    from websockets.sync.client import connect
    ws = connect("ws://127.0.0.1:8000/api/voice")      # or additional_headers={"Authorization": "Bearer KEY"}
    ws.send(json.dumps({"type": "start", "api_key": KEY}))   # first: the key (a browser cannot send headers)
    ws.send(pcm16)                                      # then audio: 16 kHz mono 16-bit little-endian PCM
    for message in ws: ...                              # JSON events, and binary audio after each "audio"

Client to server: a JSON `start` ({"type": "start", "api_key": KEY (unless sent as a bearer
header), "conversation": ID to go on with one, "voice": "default" | "joe" | "espeak" |
"espeak:VOICE"}), then binary frames of 16 kHz mono PCM16 (at most 32,000 bytes, one second,
each; any size below that), and `{"type": "stop"}` to end.

Server to client, JSON: `ready` {rate, voice, audio_rate}; `speech_started` (the endpointer
heard an utterance begin); `transcript` {text, final: false} at 2 s of an utterance and every
1.5 s or so after, and {text, final: true} when it ends (the end-of-turn rule,
parley.voice.vad.EndOfTurn: Whisper starts at 100 ms of quiet; the turn ends after 200 ms of
quiet if the transcript reads as finished, else after 600 ms); `turn` {conversation}; `text`
{text} as the answer streams; `audio` {text, rate, samples} followed by one binary message with
that sentence's PCM16 (first sentence, or first clause of 4+ words, or the first 4 words of a
sentence of 8 or more, as soon as it is written;
the turn's first `audio` also has `latency`: {endpoint_ms: last speech frame -> turn decided,
asr_ms: the wait for the final transcript, 0 when the early one was reused, first_text_ms:
turn started -> first spoken text, tts_ms: its synthesis, marks: {step: ms after the last speech
frame} for each step on the way: speculated (below), decided, transcribed, turn_started, the first of
each pipeline frame ("frame:TextDelta": the first shown text), tts_started, tts_done, sending});
`interrupted` {conversation};
`ignored` {text, reason: "noise" | "echo"} (speech over the answer that was no barge-in: it is
not answered either); `resumed` {text} (speech went on, within 1 s of audio, after a turn began but before any
of its answer was shown: the pause was inside the user's sentence, so that turn is taken back unsaved
and its text starts the next utterance); `done` {turn_id, conversation, interrupted}; `error` {message, code},
after which the socket closes (1008 a policy: auth, limits, bad input; 1011 the server's fault).

Speculative start: when the guess made in a pause (100 ms of quiet) is ready before the end-of-turn
rule has decided, the turn starts on it at once, unseen: its messages are held and its writes wait
(parley.pipeline.runner.Tentative). If the turn then ends on that same transcript, it is kept and
what it held is sent in order; if speech goes on, or the final transcript differs, it is dropped
through the engine's cancellation and nothing of it is sent or saved. The first spoken piece is
synthesized from the model's draft while the output safety stage still holds its sentence
(parley.voice.tts.HeadStart) and sent only once the checked text's first piece is the same.

Barge-in: speech that starts while the assistant has a turn going (generating, or audio it sent
that the client is still playing by the server's clock) stops it once parley.voice.vad.BargeIn
says it is the user (300 ms of speech whose transcript has words, and not the sound the assistant
just played coming back: parley.voice.echo.Playback holds what was sent on the stream's clock, and
the heard audio is matched against it; a noise or the assistant's own voice from the speaker stops
nothing and is not answered, a user repeating the answer's words does); the turn is interrupted
through the engine's cancellation (RunningTurn.interrupt: saved marked interrupted, with a
"barge-in" feedback), no more of its audio is sent, and the new utterance starts the next turn
(speech over a turn still being transcribed joins that utterance to the next instead).
A turn that had ended but whose audio was still playing gets the feedback only. Bounds: frame
size, a text message's JSON nesting (at most 64 levels, as an HTTP body's: errors.json_body_error),
utterance length (`voice_max_utterance_seconds`: cut there and answered), idle time
(`voice_idle_seconds`), the server's keys and rate limit, and the BrowserGuard's Host and
Origin rule (parley/serve/origins.py) before the socket is accepted.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from parley.serve.errors import APIError, json_body_error
from parley.serve.routes_audio import WHISPER, Voices
from parley.serve.server import Server
from parley.serve.turns import QueueFull, RunningTurn, TurnDone, TurnStarted
from parley.voice.asr import Transcription

RATE = 16_000
MAX_FRAME_BYTES = 32_000  # one second of 16 kHz PCM16
PARTIAL_EVERY_S = 1.5  # a partial transcript after each 1.5 s of new speech (or 3x the last ASR time), the first
# after 2 s: a short command ("turn on the lights") then ends without a partial in Whisper's way
RESUME_S = 1.0  # speech this soon after an utterance whose turn has shown nothing yet goes on with it (retract)
FIRST_CLAUSE = 4  # words before a comma may end the first spoken piece (as `parley chat --audio-out`)
FIRST_WORDS = 4  # and a longer first sentence from its first 4 words (tts.sentences): piper makes 4
# words in about half the time of 6 while the model, writing the next sentence, shares the CPU with it


class Closing(Exception):
    """End the session with an error message and a WebSocket close code."""

    def __init__(self, message: str, code: str, close: int = 1008):
        super().__init__(message)
        self.message, self.code, self.close = message, code, close


def voice_routes(server: Server, voices: Voices) -> APIRouter:
    router = APIRouter()

    @router.websocket("/api/voice")
    async def voice(ws: WebSocket):
        await ws.accept()
        session = LiveSession(server, voices, ws)
        try:
            await session.run()
            await ws.close(1000)
        except WebSocketDisconnect:
            pass
        except Closing as e:
            await session.fail(e.message, e.code, e.close)
        except Exception as e:  # a bug: said, never a silent drop
            await session.fail(f"the voice session failed: {type(e).__name__}: {e}", "server_error", 1011)
        finally:
            await session.end()

    return router


class LiveSession:
    """One client's live conversation: its endpointer, its current turn, what it has been sent."""

    def __init__(self, server: Server, voices: Voices, ws: WebSocket):
        from parley.voice.echo import Playback
        from parley.voice.vad import BargeIn, EndOfTurn, EnergyVAD, Endpointer

        self.server, self.voices, self.ws, self.settings = server, voices, ws, server.settings
        self.end_rule = EndOfTurn()
        self.cut = Endpointer(EnergyVAD(min_silence_ms=self.end_rule.long_ms), RATE)
        self.guess: asyncio.Task | None = None  # the transcript made after the first short quiet
        self.guessed: tuple[int, Transcription] | None = None  # (Endpointer.spoken then, its transcription)
        self.guess_key = (-1, False)  # pause() when the last guess began
        self.guess_job: tuple[int, asyncio.Future] | None = None  # (Endpointer.spoken, its transcription)
        self.send_lock = asyncio.Lock()
        self.user = self.asr = self.tts = None
        self.conversation: int | None = None
        self.task: asyncio.Task | None = None  # the current turn: transcribe, answer, speak
        self.spec: Spec | None = None  # a turn started on the guess, before the end of the turn (speculate)
        self.running: RunningTurn | None = None  # its pipeline turn, while it generates
        self.barged = False  # the current turn was interrupted: send no more of it
        self.overlong = False  # the last utterance was cut for length while the user went on
        self.carry = ""  # an utterance whose turn the user spoke over before it began: the next one's start
        self.playing_until = 0.0  # monotonic time the client's playback of what was sent ends
        self.last_answer: int | None = None  # the latest saved answer, for barge-in feedback after it ended
        self.partial: asyncio.Task | None = None
        self.partial_at = 0  # samples heard when the last partial transcript was made
        self.asr_seconds = 0.0  # how long the last transcription took: partials keep Whisper busy a third
        # of the time at most, so the end of an utterance seldom waits for one (they share the CPU and a lock)
        self.barge_rule = BargeIn()
        self.over: Over | None = None  # speech begun over the assistant's answer, not yet known to be a barge-in
        self.deciding: asyncio.Task | None = None  # whether an utterance spoken over the answer gets a turn
        self.open_turn: tuple[str, int | None, float] | None = None  # (its text, the conversation before, when
        # its speech ended) of a turn that has shown nothing yet: speech soon after takes it back (retract)
        self.retracted = False  # the current turn was taken back: it sends nothing more
        self.said: list[str] = []  # what the assistant has spoken in its latest turn (an echo of it is no barge-in)
        self.played = Playback()  # and its audio, on the stream's clock: an echo is that sound, not just its words
        self.last_speech = 0.0  # perf_counter of the last frame heard as speech: where a turn's latency starts
        self.last_speech_frame = 0  # and its index in the stream (Endpointer.frames_seen)
        self.broken: asyncio.Future = asyncio.get_running_loop().create_future()  # a task's error (spawn)
        self.ended = False  # the client has gone (end): a turn that has not started its answer never does

    async def send(self, kind: str, **fields) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps({"type": kind, **fields}))

    async def fail(self, message: str, code: str, close: int) -> None:
        try:
            await self.send("error", message=message, code=code)
            await self.ws.close(close, reason=code)
        except (WebSocketDisconnect, RuntimeError):  # the client has gone already
            pass

    def spawn(self, work) -> asyncio.Task:
        """Run `work` beside the session; if it fails, the session ends with its error (`receive`
        raises it) instead of the client waiting for a message that never comes."""
        def failed(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None and not self.broken.done():
                self.broken.set_result(task.exception())

        task = asyncio.create_task(work)
        task.add_done_callback(failed)
        return task

    async def receive(self) -> dict:
        """The client's next message; an idle session (no message, and no turn going) is closed,
        and a failed task of the session (spawn) ends it."""
        while True:
            message = asyncio.ensure_future(self.ws.receive())
            await asyncio.wait((message, self.broken), timeout=self.settings.voice_idle_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
            if self.broken.done():
                message.cancel()
                raise self.broken.result()
            if message.done():
                return message.result()
            message.cancel()
            if self.task is None or self.task.done():
                raise Closing(f"no audio or message for {self.settings.voice_idle_seconds:g} s: the session "
                              "is closed", "idle_timeout")

    # ------------------------------------------------------------------ the session

    async def run(self) -> None:
        await self.start(await self.receive())
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await self.hear(message["bytes"])
            elif _json(message.get("text")).get("type") == "stop":
                return
            else:
                raise Closing('send binary PCM16 audio frames or {"type": "stop"}', "invalid_message")

    async def start(self, message: dict) -> None:
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect()
        start = _json(message.get("text"))
        if start.get("type") != "start":
            raise Closing('the first message must be {"type": "start", "api_key": KEY}', "invalid_message")
        self.user = await run_in_threadpool(self.authenticate, start.get("api_key"))
        conversation = start.get("conversation")
        if conversation is not None:
            if not isinstance(conversation, int) or await run_in_threadpool(
                    lambda: self.server.store().get_conversation(self.user.id, conversation)) is None:
                raise Closing(f"no conversation {conversation!r} of yours to go on with", "not_found")
            self.conversation = conversation
        voice = start.get("voice") or "default"
        if not isinstance(voice, str) or not (voice in ("default", "joe", "espeak")
                                              or re.fullmatch(r"espeak:[\w+-]+", voice)):
            raise Closing(f"no voice named {voice!r}: use default, joe, espeak or espeak:VOICE", "invalid_value")
        self.asr, self.asr_busy, self.tts, self.tts_busy = await run_in_threadpool(self.load, voice)
        await self.send("ready", rate=RATE, voice=self.tts.name, audio_rate=self.tts.rate,
                        max_frame_bytes=MAX_FRAME_BYTES)

    def authenticate(self, key):
        """The user of the key in the bearer header or the start message (as every route checks it)."""
        try:
            if self.settings.no_auth:
                return self.server.store().get_user_by_name(self.settings.user)
            header = self.ws.headers.get("authorization") or (f"Bearer {key}" if isinstance(key, str) else "")
            user, key = self.server.key_user(header, self.ws.client.host if self.ws.client else "")
            if self.server.buckets.take(key) is not None:
                raise APIError(429, "rate limit reached for this key; retry in a minute", code="rate_limit_exceeded")
            return user
        except APIError as e:
            raise Closing(e.message, e.code or "unauthorized") from None

    def load(self, voice: str):
        from parley.voice.asr import load_asr
        from parley.voice.tts import load_tts

        try:
            # the encoder reads a window fitted to each utterance, not 30 s: a short one costs less
            asr, asr_busy = self.voices.get(("asr", WHISPER, "fitted"), lambda: load_asr("default", window=0))
            if voice in ("default", "joe"):
                tts, tts_busy = self.voices.get(("tts", voice), lambda: load_tts(voice))
            else:
                tts, tts_busy = self.voices.make(lambda: load_tts(voice)), threading.Lock()
        except APIError as e:
            raise Closing(e.message, e.code or "unavailable") from None
        return asr, asr_busy, tts, tts_busy

    # ------------------------------------------------------------------ listening

    async def hear(self, data: bytes) -> None:
        if len(data) > MAX_FRAME_BYTES or len(data) % 2:
            raise Closing(f"an audio frame has {len(data)} bytes: send 16 kHz mono PCM16 (an even number of bytes), "
                          f"at most {MAX_FRAME_BYTES} (one second) a frame", "invalid_audio")
        was_speaking, spoken = self.cut.in_speech, self.cut.spoken
        ended = self.cut.push(np.frombuffer(data, "<i2").astype(np.float32) / 32768)
        if self.cut.spoken > spoken:
            self.last_speech, self.last_speech_frame = time.perf_counter(), self.cut.frames_seen
            if self.spec is not None:  # the user went on: the guess it was started on is not the turn's
                self.drop_spec()
        if self.cut.in_speech and not was_speaking or (ended and not was_speaking):
            await self.send("speech_started")
            if not self.overlong:  # speech going on past a cut for length is the same speaker, not a barge-in
                if self.answering():
                    self.over = Over(self.cut.spoken - self.cut.speech_frames, self.last_speech_frame)
                else:
                    await self.barge_in()
        if self.over is not None and self.over.check is None and self.cut.in_speech and (
                self.cut.spoken - self.over.spoken) * self.cut.vad.frame_ms >= self.barge_rule.min_ms:
            self.over.check = self.spawn(self.vet(self.cut.heard(), self.cut.heard_start, self.over))
        if not self.cut.in_speech and self.cut.speech_frames == 0:
            self.overlong = False  # quiet was heard: speech from here on is a new utterance
        if self.cut.in_speech and len(self.cut.heard()) > self.settings.voice_max_utterance_seconds * RATE:
            ended += self.cut.flush()  # long enough: answer what was said so far
            self.overlong = True
        for utterance in ended:
            await self.answer(utterance)
        await self.end_if_finished()
        if self.cut.in_speech and self.cut.quiet_ms >= self.end_rule.guess_ms and self.guess_key != self.pause() \
                and (self.guess is None or self.guess.done()):  # one early guess per quiet stretch, one at short_ms
            self.guess = self.spawn(self.guess_end())
        elif self.cut.in_speech and self.cut.quiet_ms == 0 and (self.partial is None or self.partial.done()) \
                and self.partial_due(len(self.cut.heard())):
            self.partial_at = len(self.cut.heard())
            self.partial = self.spawn(self.say_partial(self.cut.heard()))

    def partial_due(self, heard: int) -> bool:
        """A partial transcript at 2 s of an utterance, then every PARTIAL_EVERY_S or 3x the last ASR time."""
        if heard < 2 * RATE:
            return False
        return self.partial_at == 0 or heard - self.partial_at >= max(PARTIAL_EVERY_S, 3 * self.asr_seconds) * RATE

    async def say_partial(self, samples: np.ndarray) -> None:
        text = await run_in_threadpool(self.transcribe, samples)
        if self.cut.in_speech and text:  # the utterance has not ended (and been answered) meanwhile
            await self.send("transcript", text=text, final=False)

    def pause(self) -> tuple[int, bool]:
        """Which guess the quiet now calls for: (speech frames heard so far, quiet reached short_ms)."""
        return self.cut.spoken, self.cut.quiet_ms >= self.end_rule.short_ms

    async def guess_end(self) -> None:
        """The end-of-turn rule (parley.voice.vad.EndOfTurn): the utterance so far, transcribed from
        the first pause on; if nothing was said since and it reads as finished, the turn ends once
        the quiet is `short_ms` long (now, or at a later frame: `hear`). An early guess that does
        not read as finished is made again on the audio of `short_ms` of quiet (Whisper may
        punctuate the longer pause). A guess made stale by more speech is made again at once if the
        next pause has begun meanwhile."""
        while True:
            self.guess_key = key = self.pause()
            job = asyncio.ensure_future(run_in_threadpool(self.recognize, self.cut.heard()))
            self.guess_job = (key[0], job)  # the turn waits for it, if the utterance ends first (answer)
            heard = await asyncio.shield(job)
            if not self.cut.in_speech:
                return  # the utterance was cut (and answered) meanwhile
            if self.cut.spoken != key[0]:  # the user went on: this guess is stale, and a pause heard
                if self.cut.quiet_ms >= self.end_rule.guess_ms:  # meanwhile (no new guess while this one
                    continue  # ran) gets one now, or a client that sends no more quiet waits for ever
                return
            self.guessed = (key[0], heard)
            await self.end_if_finished()
            if self.cut.in_speech:  # not ended by it: the turn is started now, kept if the transcript holds
                self.speculate(key[0], heard)
            if self.end_rule.finished(heard.text) or key[1] or self.pause() == key:
                return

    async def end_if_finished(self) -> None:
        if self.guessed and self.guessed[0] == self.cut.spoken and self.cut.quiet_ms >= self.end_rule.short_ms \
                and self.end_rule.finished(self.guessed[1].text):
            for utterance in self.cut.flush():
                await self.answer(utterance)

    def transcribe(self, samples: np.ndarray) -> str:
        return self.recognize(samples).text

    def recognize(self, samples: np.ndarray):
        from parley.voice.audio import Clip

        with self.asr_busy:
            start = time.perf_counter()
            heard = self.asr.transcribe(Clip(samples, RATE))
            self.asr_seconds = time.perf_counter() - start
            return heard

    async def retract(self) -> None:
        """The user went on speaking (words, by BargeIn) after a turn began but before any of its
        answer was shown: the pause was inside their sentence. The turn is stopped unsaved, and what it heard starts the
        next utterance (a `resumed` message says so)."""
        text, conversation, _ = self.open_turn
        self.open_turn, self.retracted, self.barged = None, True, True
        if self.running is not None:
            self.running.stop()
        self.carry, self.conversation = text, conversation
        await self.send("resumed", text=text)

    def answering(self) -> bool:
        """The assistant's turn generates or its audio still plays: speech now may be its own voice."""
        return self.running is not None or time.monotonic() < self.playing_until

    async def vet(self, samples: np.ndarray, start_s: float, over: Over, known: Transcription | None = None,
                  played: float | None = None) -> Transcription:
        """Decide whether speech over the answer is a barge-in (parley.voice.vad.BargeIn) on `known`,
        the utterance's transcription, or `samples` (from `start_s` of the stream) transcribed now,
        and on `played`, how much they sound like the audio played then (Playback.match, made now
        if None); act on a yes at once. Returns the transcription judged (its text and its own
        segments: see BargeIn.verdict)."""
        heard = known
        if heard is None or played is None:  # one wait for both: a frame read meanwhile may start the next Over
            heard, played = await run_in_threadpool(self.hearing, samples, start_s, heard, played)
        over.verdict = self.barge_rule.verdict(heard, " ".join(self.said), played)
        if not over.verdict and self.over is over:
            self.over = None
            resumed = self.open_turn is not None and \
                (over.at - self.open_turn[2]) * self.cut.vad.frame_ms < RESUME_S * 1000  # stream time, not wall
            await (self.retract() if resumed else self.barge_in())
        return heard

    def hearing(self, samples: np.ndarray, start_s: float, heard: Transcription | None,
                played: float | None) -> tuple[Transcription, float]:
        """What `vet` judges speech over the answer on: its transcription and its match with the
        audio played then (Playback.match), each made now unless given."""
        return (heard if heard is not None else self.recognize(samples),
                played if played is not None else self.played.match(samples, start_s))

    async def barge_in(self) -> None:
        """The user started speaking: stop the assistant if it is speaking (see the module docstring)."""
        if self.task is not None and not self.task.done():
            self.barged = True
            if self.running is not None:
                self.running.interrupt("barge-in")
            await self.send("interrupted", conversation=self.conversation)
        elif time.monotonic() < self.playing_until and self.last_answer is not None:
            self.playing_until, answer = 0.0, self.last_answer
            await run_in_threadpool(lambda: self.server.store().add_feedback(self.user.id, answer, -1,
                                                                              kind="barge-in"))
            await self.send("interrupted", conversation=self.conversation)

    # ------------------------------------------------------------------ answering

    async def answer(self, utterance) -> None:
        """Start the next turn once the previous one (interrupted, or still speaking) has ended;
        the guess's transcript is the turn's when nothing was said after it."""
        known = self.guessed[1] if self.guessed and self.guessed[0] == self.cut.spoken else None
        if known is None and self.guess_job and self.guess_job[0] == self.cut.spoken:
            known = self.guess_job[1]  # a transcription of all of it is under way: the turn waits for that one
        if self.guess is not None and not self.guess.done() and self.guess is not asyncio.current_task():
            self.guess.cancel()  # its decision would be stale: the utterance is cut already
        self.guess, self.guessed, self.guess_job, self.partial_at = None, None, None, 0
        decided = time.perf_counter()
        if self.spec is not None:
            spec, self.spec = self.spec, None
            if self.over is None and isinstance(known, Transcription) and spec.spoken == self.cut.spoken \
                    and spec.text == " ".join(filter(None, (self.carry, known.text))):
                spec.clock.mark("decided", decided)  # the transcript held: the turn already going is the turn
                self.carry = ""
                await spec.out.keep()
                return
            spec.out.drop()
        over, self.over = self.over, None
        if over is not None:  # spoken over the answer: a turn only if it is a barge-in
            self.deciding = self.spawn(self.answer_over(utterance, over, known, decided))
            return
        self.start_turn(utterance.clip.samples, known, decided)

    def start_turn(self, samples: np.ndarray, known: Transcription | asyncio.Future | None, decided: float) -> None:
        clock = TurnClock(self.last_speech, self.last_speech_frame)
        clock.mark("decided", decided)
        previous = self.task
        self.task = self.spawn(self.turn(samples, previous, known, clock, Outbox()))

    def speculate(self, spoken: int, heard: Transcription) -> None:
        """Start the turn on the guess made in a pause (`guess_end`) before the end-of-turn rule has
        decided that the user has finished: the model writes and the first piece is synthesized
        while the rest of the quiet is waited for. Its messages are held (Outbox) and its writes
        wait (RunningTurn.keep); `answer` keeps it if the final transcript is this one, and more
        speech, or another transcript, drops it (nothing of it sent or saved)."""
        text = " ".join(filter(None, (self.carry, heard.text)))
        if self.spec is not None:
            if self.spec.text == text:
                return
            self.drop_spec()
        if not heard.text or self.over is not None or self.overlong or self.ended or self.answering() \
                or (self.task is not None and not self.task.done()) \
                or (self.deciding is not None and not self.deciding.done()):
            return  # a turn or a barge-in decision is going: nothing is started over it
        clock = TurnClock(self.last_speech, self.last_speech_frame)
        clock.mark("speculated")
        self.spec = Spec(spoken, text, Outbox(held=True), clock)
        self.task = self.spawn(self.turn(None, self.task, heard, clock, self.spec.out))

    def drop_spec(self) -> None:
        self.spec.out.drop()
        self.spec = None

    async def answer_over(self, utterance, over: Over, known: Transcription | asyncio.Future | None,
                          decided: float) -> None:
        """An utterance that began over the answer has ended: answered if it was a barge-in."""
        if isinstance(known, asyncio.Future):
            known = await known
        if over.check is not None:
            await asyncio.gather(over.check, return_exceptions=True)
        played = await run_in_threadpool(self.played.match, utterance.clip.samples, utterance.start)
        self.over = over  # vet acts on it (barge_in) only while it is the one in question: it does not wait now
        heard = await self.vet(utterance.clip.samples, utterance.start, over, known, played)
        self.over = None
        if over.verdict:
            await self.send("ignored", text=heard.text, reason=over.verdict)
        else:
            self.start_turn(utterance.clip.samples, heard, decided)

    async def turn(self, samples: np.ndarray | None, previous: asyncio.Task | None,
                   known: Transcription | asyncio.Future | None, clock: TurnClock, out: Outbox) -> None:
        """Transcribe (unless `known`), answer and speak one turn; what it sends goes through `out`."""
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        self.barged = False
        clock.mark("previous_done")
        if isinstance(known, asyncio.Future):
            known = await known
        text = known.text if known is not None else await run_in_threadpool(self.transcribe, samples)
        clock.mark("transcribed")
        text = " ".join(filter(None, (self.carry, text)))
        if not out.tentative:  # a speculative turn takes the carried text once it is kept (answer)
            self.carry = ""
        if self.barged:  # the user went on before this turn began: it is said with the next utterance
            self.carry = text
            if text:
                await self.send("transcript", text=text, final=False)
            return
        await out.put(self.sender("transcript", text=text, final=True))
        if not text or out.dropped:
            return
        from parley.voice.tts import HeadStart

        head = HeadStart(self.tts, self.tts_busy, FIRST_CLAUSE, FIRST_WORDS, lambda: self.barged or out.dropped)
        try:
            clock.mark("turn_started")
            self.said, self.retracted, self.open_turn = [], False, (text, self.conversation, clock.spoke)
            self.running = running = self.server.turns.start(self.user, self.conversation, text, overrides={},
                                                             tentative=out.tentative, draft=head.drafts.put)
            out.running = running
        except QueueFull as e:
            await out.put(self.sender("error", message=str(e), code="busy"))
            return
        if self.ended:
            running.stop()
        elif self.barged:  # spoken over while its transcript was being sent: a barge-in at its start
            running.interrupt("barge-in")
        pieces: queue.Queue = queue.Queue()
        speaking = asyncio.create_task(self.speak(pieces, clock, out, head))
        done = None
        try:
            from parley.pipeline.frames import ShownText

            shown = ShownText()
            async for item in running.frames():
                clock.mark(f"frame:{type(item).__name__}")
                if isinstance(item, TurnStarted):
                    await out.put(self.began(item.conversation_id))
                elif isinstance(item, TurnDone):
                    done = item
                elif (piece := shown(item)) and not self.barged and not out.dropped:
                    pieces.put(piece)  # synthesized at once, sent when `out` sends
                    await out.put(self.shown(piece))
        except Exception as e:  # the turn failed: said as the HTTP routes would say it
            from parley.serve.errors import from_exception

            await out.put(self.sender("error", message=from_exception(e).message, code="turn_failed"))
        finally:
            pieces.put(None)
            head.close()
            self.running, self.open_turn = None, None
            await speaking
        if done is not None and not self.retracted:
            await out.put(self.ended_turn(done))

    def sender(self, kind: str, **fields):
        """A message to send when the turn's Outbox sends."""
        return lambda: self.send(kind, **fields)

    def shown(self, piece: str):
        async def send() -> None:
            self.open_turn = None  # shown: the turn stands (a held turn's text is not shown until sent)
            await self.send("text", text=piece)
        return send

    def began(self, conversation: int):
        async def send() -> None:
            self.conversation = conversation
            await self.send("turn", conversation=conversation)
        return send

    def ended_turn(self, done: TurnDone):
        async def send() -> None:
            self.conversation = done.conversation_id or self.conversation
            self.last_answer = done.message_id
            await self.send("done", turn_id=done.message_id, conversation=self.conversation, interrupted=self.barged)
        return send

    async def speak(self, pieces: queue.Queue, clock: TurnClock, out: Outbox, head) -> None:
        """Synthesize the answer sentence by sentence, in a thread, sending each as it is made; the
        first audio message carries the turn's `latency` (see the module docstring). The first
        piece is made from the model's draft while the safety stage still holds its sentence
        (parley.voice.tts.HeadStart), and sent once the checked text's first piece is the same."""
        from parley.voice.tts import TTSError, sentences, spoken

        loop, made = asyncio.get_running_loop(), asyncio.Queue()

        def synthesize():
            def text():
                while (piece := pieces.get()) is not None and not self.barged and not out.dropped:
                    yield piece

            try:
                first = True
                for sentence in sentences(text(), first_clause=FIRST_CLAUSE, first_words=FIRST_WORDS):
                    if not (words := spoken(sentence)):  # "..." alone has nothing to say
                        continue
                    ahead = head.take(sentence) if first else None  # the draft's clip, first sentence only
                    first = False
                    if ahead is not None:
                        clip, times = ahead
                    else:
                        # one synthesis at a time per voice, as /v1/audio/speech; held per sentence, not
                        # while the answer is written (another session's speech would wait for this answer)
                        with self.tts_busy:
                            start = time.perf_counter()
                            clip = self.tts.synthesize(words)
                        times = (start, time.perf_counter())
                    if self.barged or out.dropped:
                        break
                    loop.call_soon_threadsafe(made.put_nowait, (sentence, clip, times))
            except TTSError:
                pass  # nothing speakable left (text only): the answer's text has been sent
            finally:
                loop.call_soon_threadsafe(made.put_nowait, None)

        drafting = asyncio.ensure_future(run_in_threadpool(head.run))
        synthesis = asyncio.ensure_future(run_in_threadpool(synthesize))
        first = True
        while (item := await made.get()) is not None:
            sentence, clip, (started, made_at) = item
            if self.barged or out.dropped:
                continue
            if first:
                clock.mark("tts_started", started)
                clock.mark("tts_done", made_at)
            await out.put(self.audio_sender(sentence, clip, clock if first else None))
            first = False
        await synthesis
        await asyncio.gather(drafting, return_exceptions=True)  # its error, if any, met by `synthesize` too

    def audio_sender(self, sentence: str, clip, clock: TurnClock | None):
        """A piece of the answer's audio to send when the turn's Outbox sends; the turn's first
        (`clock` given) carries its `latency`, taken then."""
        async def send() -> None:
            if self.barged:
                return
            pcm = (clip.samples.clip(-1, 1) * 32767).round().astype("<i2").tobytes()
            heading = {"type": "audio", "text": sentence, "rate": clip.rate, "samples": len(clip.samples)}
            if clock is not None:
                clock.mark("sending")
                heading["latency"] = clock.report()
            self.said.append(sentence)
            # it plays once what was sent before it has played: its start on the stream's clock
            queued = max(0.0, self.playing_until - time.monotonic())
            self.played.add(self.cut.frames_seen * self.cut.vad.frame_ms / 1000 + queued, clip)
            async with self.send_lock:
                await self.ws.send_text(json.dumps(heading))
                await self.ws.send_bytes(pcm)
            self.playing_until = max(self.playing_until, time.monotonic()) + clip.seconds
        return send

    async def end(self) -> None:
        """The client has gone: a turn still going stops (a plain stop, not a barge-in)."""
        self.barged = self.ended = True
        if self.spec is not None:
            self.drop_spec()
        if self.running is not None:
            self.running.stop()
        for task in (self.deciding, self.task, self.partial, self.guess):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)


@dataclass
class TurnClock:
    """When each step of one turn happened, in perf_counter seconds: what the first audio message's
    `latency` reports, as ms after the last speech frame (see the module docstring)."""

    spoke_at: float  # the last frame heard as speech
    spoke: int  # its index in the stream (Endpointer.frames_seen)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, at: float | None = None) -> None:
        """The first time `name` happened (a later one is not the turn's latency)."""
        self.marks.setdefault(name, time.perf_counter() if at is None else at)

    def report(self) -> dict:
        def ms(a: str, b: str) -> int:
            return round((m[b] - m[a]) * 1000)

        m = {"spoke": self.spoke_at, **self.marks}
        return {"endpoint_ms": ms("spoke", "decided"), "asr_ms": ms("previous_done", "transcribed"),
                "first_text_ms": ms("turn_started", "tts_started"), "tts_ms": ms("tts_started", "tts_done"),
                "marks": {name: round((at - self.spoke_at) * 1000) for name, at in sorted(m.items(), key=lambda x: x[1])}}


class Outbox:
    """What one turn sends. A turn started on a guess (LiveSession.speculate) holds all of it
    until it is kept (`keep`: its writes go ahead and what was held is sent, in order) or dropped
    (`drop`: its generation is cancelled through the engine's cancellation, nothing of it is sent
    and nothing saved); a plain turn's outbox sends at once."""

    def __init__(self, held: bool = False):
        self.held, self.kept, self.dropped = held, False, False
        self.items: list = []  # async callables that send, in order, while held
        self.running: RunningTurn | None = None  # the turn's pipeline turn, once started

    async def put(self, send) -> None:
        if self.dropped:
            return
        if self.held:
            self.items.append(send)
        else:
            await send()

    @property
    def tentative(self) -> bool:
        """Neither kept nor dropped yet (a plain turn's never is)."""
        return self.held and not self.kept and not self.dropped

    async def keep(self) -> None:
        self.kept = True
        if self.running is not None:
            self.running.keep()
        while self.items:  # what is put while these are sent joins the queue: the order holds
            await self.items.pop(0)()
        self.held = False

    def drop(self) -> None:
        self.dropped, self.items = True, []
        if self.running is not None:
            self.running.drop()


@dataclass
class Spec:
    """A turn started on a guess of the transcript (LiveSession.speculate)."""

    spoken: int  # Endpointer.spoken when the guess's audio ended: more speech since drops it
    text: str  # what it answers (with any carried text)
    out: Outbox
    clock: TurnClock


@dataclass
class Over:
    """Speech that began while the assistant was answering: a barge-in once `verdict` is ''."""

    spoken: int  # Endpointer.spoken where it began
    at: int  # the stream's frame where it began
    check: asyncio.Task | None = None  # the transcription that decides, once min_ms of it is heard
    verdict: str | None = None  # None: not decided; '': a barge-in; else why not (BargeIn.verdict)


def _json(text: str | None) -> dict:
    # nested too deep, said as the HTTP routes say it (the parser recurses once per level: "[" * 100000)
    if text and (error := json_body_error(text.encode(), "a text message")):
        raise Closing(error.message, error.code)
    try:
        value = json.loads(text) if text else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise Closing("text messages must be JSON objects with a 'type'", "invalid_message")
    return value
