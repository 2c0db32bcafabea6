/* Talking to Parley: the Talk button streams the microphone over the live voice route
   (/api/voice, serve/routes_voice.py), shows what it hears as it hears it, plays the answer
   sentence by sentence as it is synthesized, and stops it when the user speaks over it (the
   server's endpointer decides; it interrupts the turn and says "interrupted").

   Audio goes out as 16 kHz mono PCM16 frames of 32 ms (the end of speech waits for its frame to
   fill before the server hears it: a 128 ms frame cost 64 ms a turn on average); the capture AudioContext runs at 16 kHz,
   so the browser resamples the microphone. Echo cancellation keeps the answer's own sound from
   counting as the user's speech. Uses app.js's state, el, icon, addMessage, finishAnswer. */
"use strict";

ICONS.mic = "M12 3a3 3 0 0 0-3 3v6a3 3 0 0 0 6 0V6a3 3 0 0 0-3-3zM5 11a7 7 0 0 0 14 0M12 18v3";

const voice = {
  socket: null,     // the WebSocket of the session
  capture: null,    // {ctx, stream, node}: the microphone
  out: null,        // the AudioContext the answer plays in
  sources: [],      // scheduled sentences, stopped on barge-in
  nextTime: 0,      // where the next sentence starts, in out.currentTime
  heading: null,    // the "audio" message whose PCM comes next
  answer: null,     // the answer being spoken, in the log
  played: 0,        // sentences played (the browser test reads it)
};

function voiceStatus(text, transcript = "") {
  $("voice-status").textContent = text;
  $("voice-transcript").textContent = transcript;
}

async function startVoice() {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/voice`);
  socket.binaryType = "arraybuffer";
  const ctx = new AudioContext({ sampleRate: 16000 });
  const node = ctx.createScriptProcessor(512, 1, 1);
  node.onaudioprocess = (e) => {
    if (socket.readyState === WebSocket.OPEN && voice.ready) socket.send(pcm16(e.inputBuffer.getChannelData(0)));
  };
  ctx.createMediaStreamSource(stream).connect(node);
  node.connect(ctx.destination);  // a script processor runs only when connected; it outputs silence
  Object.assign(voice, { socket, capture: { ctx, stream, node }, out: new AudioContext(), ready: false, nextTime: 0 });
  socket.onopen = () => socket.send(JSON.stringify({
    type: "start", api_key: localStorage.getItem(KEY_STORE) || undefined, conversation: state.conversation }));
  socket.onmessage = (e) => onVoiceMessage(e.data);
  socket.onclose = (e) => stopVoice(e.code === 1000 || e.code === 1005 ? "" : `voice session closed (${e.reason || e.code})`);
  $("mic").setAttribute("aria-pressed", "true");
  voiceStatus("Connecting…");
}

function stopVoice(why = "") {
  const { socket, capture } = voice;
  voice.socket = voice.capture = null;
  voice.ready = false;
  if (socket && socket.readyState <= WebSocket.OPEN) socket.close(1000);
  if (capture) {
    capture.stream.getTracks().forEach((t) => t.stop());
    capture.node.disconnect();
    capture.ctx.close();
  }
  $("mic").setAttribute("aria-pressed", "false");
  voiceStatus(why ? `Voice stopped: ${why}` : "");
}

function pcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = Math.max(-1, Math.min(1, samples[i])) * 32767;
  return out.buffer;
}

function play(pcm, rate) {
  const ints = new Int16Array(pcm);
  const buffer = voice.out.createBuffer(1, ints.length, rate);
  const data = buffer.getChannelData(0);
  for (let i = 0; i < ints.length; i++) data[i] = ints[i] / 32768;
  const source = voice.out.createBufferSource();
  source.buffer = buffer;
  source.connect(voice.out.destination);
  voice.nextTime = Math.max(voice.nextTime, voice.out.currentTime);
  source.start(voice.nextTime);  // sentences back to back, each as soon as it arrives
  voice.nextTime += buffer.duration;
  voice.sources.push(source);
  source.onended = () => { voice.sources = voice.sources.filter((s) => s !== source); };
  voice.played += 1;
}

function silence() {
  for (const s of voice.sources) s.stop();
  voice.sources = [];
  voice.nextTime = 0;
}

function onVoiceMessage(data) {
  if (data instanceof ArrayBuffer) {
    if (voice.heading) play(data, voice.heading.rate);
    voice.heading = null;
    return;
  }
  const m = JSON.parse(data);
  if (m.type === "ready") {
    voice.ready = true;
    voiceStatus("Listening…");
  } else if (m.type === "speech_started") {
    voiceStatus("Hearing you…");
  } else if (m.type === "transcript") {
    voiceStatus(m.final ? "Heard:" : "Hearing you…", m.text);
    if (m.final && m.text) {
      addMessage("user", m.text, ASSISTANT);
      voice.answer = addMessage("assistant", "", ASSISTANT);
    }
  } else if (m.type === "turn") {
    state.conversation = m.conversation;
  } else if (m.type === "text" && voice.answer) {
    voice.answer.raw += m.text;
    renderMarkdown(voice.answer.querySelector(".text"), voice.answer.raw);
  } else if (m.type === "audio") {
    voice.heading = m;
  } else if (m.type === "interrupted") {
    silence();
    if (voice.answer) voice.answer.classList.add("interrupted");
    voiceStatus("Interrupted: listening…");
  } else if (m.type === "resumed") {  // the user went on: that turn is taken back, its text said again
    if (voice.answer) voice.answer.previousElementSibling?.remove();
    voice.answer?.remove();
    voice.answer = null;
    voiceStatus("Hearing you…", m.text);
  } else if (m.type === "done") {
    const answer = voice.answer;
    voice.answer = null;
    if (!answer) return;
    answer.append(el("p", { class: "meta", text: `Spoken by the Parley assistant${m.interrupted ? " · interrupted" : ""}` }));
    if (m.turn_id) finishAnswer(answer, m.turn_id, true).catch(showError);
    loadConversations().catch(showError);
  } else if (m.type === "error") {
    showError(new Error(`${m.message} (${m.code})`));
  }
}

function setupVoice() {
  if (!navigator.mediaDevices?.getUserMedia || !window.WebSocket) return;  // no microphone API: no button
  const mic = el("button", { type: "button", id: "mic", "aria-pressed": "false", title: "Talk: speak, and speak again to interrupt" },
                 icon("mic"), "Talk");
  mic.addEventListener("click", () => {
    if (voice.socket) stopVoice();
    else startVoice().catch((e) => { stopVoice(e.message); showError(e); });
  });
  $("send").after(mic);
  $("ask").after(el("p", { id: "voice-status", class: "voice-status", role: "status" }),
                 el("p", { id: "voice-transcript", class: "voice-transcript", "aria-live": "polite" }));
}

document.addEventListener("DOMContentLoaded", setupVoice);
