/* Parley's web page: plain JavaScript over the same HTTP API every client uses (no build step;
   the Markdown, sanitising and highlighting libraries are pinned copies in static/vendor/).

   POST /v1/chat/completions (stream: true)   the answer, as Server-Sent Events read with fetch;
        model "parley" answers in the conversation the X-Parley-Conversation header names, and
        its last chunk's "parley" object gives the conversation and the saved turn's ids;
        Stop aborts the request, which ends the generation on the server
   POST /api/turns/{id}/withdraw              before Regenerate and an edited message are sent
   GET  /api/turns/{id}/trace                 the trace panel, and what each citation [n] is
   GET  /api/chunks/{id}                      a cited chunk's text
   POST /api/turns/{id}/feedback              thumbs up/down and corrections
   /api/conversations (?q= search, PATCH rename, DELETE), /api/knowledge, /api/memory,
   /api/settings                              the lists and settings at the side

   Answers are rendered from Markdown by render.js (sanitised); everything else from the model or
   the server (messages, titles, sources, traces) is put in the page as text, never as HTML. The
   key lives in localStorage; without one, requests go without Authorization (--no-auth). */
"use strict";

const KEY_STORE = "parley.key";
const ASSISTANT = "parley";
// the server's embedding and speech models (serve/routes_audio.py): not chat models
const NOT_FOR_CHAT = new Set(["all-minilm-l6-v2", "whisper-1", "whisper-tiny.en", "tts-1", "tts-1-hd",
  "gpt-4o-mini-tts", "piper", "espeak"]);

const $ = (id) => document.getElementById(id);
const state = {
  conversation: null,  // id of the assistant conversation shown, null for a new one
  traces: new Map(),   // turn id -> trace
  controller: null,    // aborts the answer being streamed
  settings: null,      // GET /api/settings
  searching: 0,        // the timer of a search about to run
};

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || null;
    this.param = e.param || null;
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

/* A button showing only an icon: its name is the label (for screen readers) and the tooltip. */
function iconButton(name, label, onclick, props = {}) {
  return el("button", { type: "button", class: `icon-button ${props.class || ""}`.trim(), "aria-label": label,
                        title: label, onclick, ...Object.fromEntries(Object.entries(props).filter(([k]) => k !== "class")) },
            icon(name));
}

/* --- talking to the server ------------------------------------------------------------- */

async function request(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { error: { message: `cannot reach the server (${e.message}); is it running?` } });
  }
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new ApiError(response.status, body);
  }
  return response;
}

const getJSON = async (path, options) => (await request(path, options)).json();
const sendJSON = (method, path, body) => getJSON(path, {
  method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

function showError(e) {
  if (e.name === "AbortError") return;
  let text = e.message;
  if (e instanceof ApiError) {
    text = `Error${e.status ? ` ${e.status}` : ""}${e.code ? ` (${e.code})` : ""}: ${e.message}`;
    if (e.status === 401) text += " Enter your API key at the top of the page.";
  }
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

/* Reads a Server-Sent Events body; calls onData with each event's parsed JSON until [DONE]. */
async function readEvents(response, onData) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(null, chunk);  // an error after the stream began: no status
      onData(chunk);
    }
  }
}

/* --- the chat -------------------------------------------------------------------------- */

/* A message in the log; `item.raw` keeps its text as written (Markdown, for an answer). */
function addMessage(role, text, model) {
  const body = el("div", { class: role === "user" ? "text plain" : "text md" });
  const who = role === "user" ? "You" : "Parley";
  const item = el("article", { class: `msg ${role}`, "aria-label": who }, el("p", { class: "who", text: who }), body);
  item.raw = text;
  item.dataset.model = model;
  if (role === "user") {
    body.textContent = text;
    item.append(el("div", { class: "actions" }, iconButton("pencil", "Edit message", () => editMessage(item), {
      class: "edit-message", "aria-expanded": "false" })));
  } else {
    renderMarkdown(body, text);
  }
  $("log").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

/* The messages shown, as a raw model is sent them (the assistant keeps its own history). */
function transcript() {
  return [...$("log").querySelectorAll(".msg:not(.failed)")].map((m) => ({
    role: m.classList.contains("user") ? "user" : "assistant", content: m.raw })).filter((m) => m.content);
}

async function send(text, earlier = null) {
  const model = $("model").value;
  const assistant = model === ASSISTANT;
  const messages = assistant ? [{ role: "user", content: text }] : [...transcript(), { role: "user", content: text }];
  addMessage("user", text, model);
  const answer = addMessage("assistant", "", model);
  const body = answer.querySelector(".text");
  if (earlier) body.after(el("details", { class: "earlier" }, el("summary", { text: "Earlier answer (replaced)" }),
                              renderedText(earlier)));
  const headers = { "Content-Type": "application/json" };
  if (assistant && state.conversation) headers["X-Parley-Conversation"] = String(state.conversation);
  let ids = null, raw = "", frame = 0, answeredBy = model;
  const paint = () => { frame = 0; renderMarkdown(body, raw); };
  state.controller = new AbortController();
  setBusy(true);
  try {
    const response = await request("/v1/chat/completions", {
      method: "POST", headers, signal: state.controller.signal,
      body: JSON.stringify({ model, messages, stream: true }),
    });
    const conversation = response.headers.get("X-Parley-Conversation");
    if (conversation) state.conversation = Number(conversation);
    await readEvents(response, (chunk) => {
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) {
        raw += piece;
        frame ||= requestAnimationFrame(paint);  // one render a frame, however fast pieces come
      }
      if (chunk.model) answeredBy = chunk.model;
      if (chunk.parley) ids = chunk.parley;
    });
    answer.raw = raw.trim() || "(no answer)";  // as the store keeps it
  } catch (e) {
    answer.raw = raw.trim();
    if (e.name === "AbortError") answer.classList.add("stopped");
    else {
      answer.classList.add("failed");
      answer.raw += `${answer.raw ? "\n\n" : ""}(no answer: ${e.message})`;
      showError(e);
    }
  } finally {
    cancelAnimationFrame(frame);
    renderMarkdown(body, answer.raw);
    state.controller = null;
    setBusy(false);
  }
  answer.append(el("p", { class: "meta", text: answerLabel(answeredBy, ids) + (answer.classList.contains("stopped") ? " · stopped" : "") }));
  if (ids?.conversation_id) state.conversation = ids.conversation_id;
  let turnId = ids?.turn_id;
  if (!turnId && assistant && answer.classList.contains("stopped")) {
    const saved = await savedAnswer(answer.raw);
    if (saved) {
      turnId = saved.id;
      answer.raw = saved.content;
      renderMarkdown(body, answer.raw);
    }
  }
  if (turnId) await finishAnswer(answer, turnId, true);
  else answer.append(answerControls(answer, null));
  showRegenerate();
  if (assistant) loadConversations().catch(showError);
}

/* Which model (and version, where the server knows it) wrote an answer: for the assistant, as the
   server saved it with the answer (`ids.answered_by`: the version serving then), and whether the
   user's own adapter answered. */
function answerLabel(model, ids) {
  const s = state.settings;
  if (model !== ASSISTANT) return `Answered by ${model}`;
  const mine = ids?.adapter ? " with your own adapter" : "";
  if (ids?.answered_by) return `Answered by ${ids.answered_by}${mine} through the Parley assistant`;
  return s ? `Answered by ${s.model}${s.version ? ` (${s.version})` : ""}${mine} through the Parley assistant`
           : "Answered by the Parley assistant";
}

/* A stopped answer is saved by the server once it notices: looked up for a few seconds, its
   id, and its text as saved (which may hold words that were on their way to the page). */
async function savedAnswer(text) {
  if (!state.conversation || !text) return null;
  for (let i = 0; i < 20; i++) {
    const conv = await getJSON(`/api/conversations/${state.conversation}`).catch(() => null);
    const last = conv?.turns.at(-1);
    if (last?.role === "assistant" && last.content.startsWith(text) && !document.querySelector(`[data-turn="${last.id}"]`)) {
      return last;
    }
    await new Promise((r) => setTimeout(r, 300));
  }
  return null;
}

function renderedText(text) {
  const box = el("div", { class: "text md" });
  renderMarkdown(box, text);
  return box;
}

function setBusy(busy) {
  $("log").setAttribute("aria-busy", String(busy));  // screen readers read the answer once it is whole
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  for (const b of $("log").querySelectorAll(".regenerate, .edit-message")) b.disabled = busy;
  if (!busy && document.activeElement === document.body) $("message").focus();
}

function stop() {
  if (state.controller) state.controller.abort();
}

/* An answer the store has saved: its controls, citations and (if it is the latest) trace;
   reopened from history (`earlier`), also the feedback it was given then. */
async function finishAnswer(item, turnId, latest, earlier = false) {
  item.dataset.turn = turnId;
  const controls = answerControls(item, turnId);
  item.append(controls);
  if (earlier) showEarlierFeedback(turnId, controls).catch(showError);
  try {
    const trace = await getTrace(turnId);
    const sources = sourcesOf(trace);
    if (sources.size) renderCitations(item, sources);
    if (latest) renderTrace(trace, turnId);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) showError(e);
  }
}

async function getTrace(turnId) {
  if (!state.traces.has(turnId)) state.traces.set(turnId, await getJSON(`/api/turns/${turnId}/trace`));
  return state.traces.get(turnId);
}

/* [n] -> {n, label, chunkId, evidence} from a trace: the respond stage lists the passages the
   model saw ("[1] rent.md, chunk 1"); the knowledge stage's relevant candidates, in order, are
   the chunks behind those of them that came from documents. */
function sourcesOf(trace) {
  const stage = (name) => (trace.stages || []).find((s) => s.stage === name);
  const lines = stage("respond")?.evidence.passages || [];
  const k = stage("knowledge")?.evidence || {};
  const chunks = (k.candidates || []).filter((c) => c.cosine >= k.min_similarity);
  const found = new Map();
  let next = 0;
  for (const line of lines) {
    const [, n, label] = /^\[(\d+)\] (.*)$/.exec(line) || [];
    if (!n) continue;
    const evidence = /chunk \d+$/.test(label) ? chunks[next++] : undefined;  // web pages have no chunk
    found.set(Number(n), { n: Number(n), label, chunkId: evidence?.chunk_id, evidence });
  }
  return found;
}

/* Each [n] in the answer, and a "Sources:" line, become buttons that show the source. */
function renderCitations(item, sources) {
  const body = item.querySelector(".text");
  renderMarkdown(body, item.raw, { cite: (n) => sources.has(n) && citeButton(sources.get(n)) });
  const line = el("p", { class: "sources" }, "Sources: ");
  [...sources.values()].forEach((s, i) => line.append(i ? "; " : "", citeButton(s), ` ${s.label}`));
  body.after(line);
}

function citeButton(source) {
  return el("button", { type: "button", class: "cite", "aria-label": `Show source ${source.n}: ${source.label}`,
                        "aria-haspopup": "dialog", text: `[${source.n}]`, onclick: () => showSource(source) });
}

async function showSource(source) {
  $("source-title").textContent = `[${source.n}] ${source.label}`;
  const ev = source.evidence;
  $("source-meta").textContent = ev ? `similarity ${ev.cosine}, keyword rank ${ev.bm25_rank ?? "–"}, ` +
    `meaning rank ${ev.dense_rank ?? "–"}` : "";
  const text = $("source-text");
  text.textContent = source.chunkId ? "Loading…" : "This source is not a stored document chunk.";
  $("source").showModal();
  if (!source.chunkId) return;
  try {
    text.textContent = (await getJSON(`/api/chunks/${source.chunkId}`)).text;
  } catch (e) {
    text.textContent = `The chunk's text is not available: ${e.message}`;
  }
}

/* --- an answer's controls: copy, regenerate, feedback ------------------------------------ */

function answerControls(item, turnId) {
  const group = el("div", { class: "actions", role: "group", "aria-label": "Answer actions" });
  group.append(iconButton("copy", "Copy answer", (e) => copyText(item.raw, e.currentTarget)),
               iconButton("regenerate", "Regenerate answer", () => regenerate(item).catch(showError),
                          { class: "regenerate" }));
  if (turnId) {
    const status = el("span", { class: "status", role: "status" });
    const rate = (rating, editedText) => postFeedback(turnId, rating, editedText, group, status);
    const thumb = (rating, name, label) => iconButton(name, label, () => rate(Number(rating)),
                                                      { "aria-pressed": "false", "data-rating": rating });
    const edit = iconButton("pencil", "Edit", () => openEditor(item, edit, (text) => rate(Number(group.dataset.rating) || -1, text)),
                            { "aria-expanded": "false", title: "Correct this answer" });
    group.append(thumb("1", "up", "Good"), thumb("-1", "down", "Bad"), edit, status);
  }
  return group;
}

/* Only the latest answer can be regenerated (an earlier one: edit the message after it). */
function showRegenerate() {
  const answers = [...$("log").querySelectorAll(".msg.assistant")];
  answers.forEach((a, i) => {
    const b = a.querySelector(".regenerate");
    if (b) b.hidden = i !== answers.length - 1;
  });
}

/* The question again, for a new answer; the old one stays in the store as a rejected
   alternative (and on the page, folded under the new one). */
async function regenerate(answer) {
  if (state.controller) return;
  const asked = answer.previousElementSibling;
  let question = asked?.raw;
  if (answer.dataset.model === ASSISTANT && answer.dataset.turn) {
    question = (await sendJSON("POST", `/api/turns/${answer.dataset.turn}/withdraw`, { reason: "regenerate" })).question ?? question;
  }
  if (!question) return;
  removeFrom(asked || answer);
  await send(question, answer.raw);
}

/* Edit a message of yours and send it again: it and everything after it leave the conversation. */
function editMessage(item) {
  if (item.querySelector(".edit") || state.controller) return item.querySelector(".edit textarea")?.focus();
  const button = item.querySelector(".edit-message");
  const id = `edit-message-${[...$("log").children].indexOf(item)}`;
  const area = el("textarea", { id, rows: "3", required: "" });
  area.value = item.raw;
  const close = () => { form.remove(); button.setAttribute("aria-expanded", "false"); button.focus(); };
  const form = el("form", { class: "edit", onsubmit: (e) => { e.preventDefault(); resend(item, area.value.trim()).catch(showError); } },
    el("label", { for: id, text: "Edit your message" }), area,
    el("div", { class: "buttons" }, el("button", { type: "submit", text: "Send edited message" }),
       el("button", { type: "button", text: "Cancel", onclick: close })));
  area.addEventListener("keydown", (e) => { if (e.key === "Escape") { e.stopPropagation(); close(); } });
  item.append(form);
  button.setAttribute("aria-expanded", "true");
  area.focus();
}

async function resend(item, text) {
  if (!text || state.controller) return;
  const answer = item.nextElementSibling;
  const turn = item.dataset.turn || answer?.dataset.turn;
  if (item.dataset.model === ASSISTANT && turn) await sendJSON("POST", `/api/turns/${turn}/withdraw`, { reason: "edit" });
  removeFrom(item);
  await send(text);
}

function removeFrom(item) {
  while (item.nextElementSibling) item.nextElementSibling.remove();
  item.remove();
}

async function postFeedback(turnId, rating, editedText, group, status) {
  const body = { rating };
  if (editedText) body.edited_text = editedText;
  try {
    await sendJSON("POST", `/api/turns/${turnId}/feedback`, body);
  } catch (e) {
    showError(e);
    return;
  }
  markRating(group, rating);
  status.textContent = editedText ? "Correction saved." : "Feedback saved.";
}

function markRating(group, rating) {
  group.dataset.rating = String(rating);
  for (const b of group.querySelectorAll("[data-rating]")) b.setAttribute("aria-pressed", String(b.dataset.rating === String(rating)));
}

async function showEarlierFeedback(turnId, group) {
  let saved;
  try {
    saved = await getJSON(`/api/turns/${turnId}/feedback`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return;  // none given
    throw e;
  }
  markRating(group, saved.rating);
  group.querySelector(".status").textContent = saved.edited_text ? "Corrected earlier." : "Rated earlier.";
}

function openEditor(item, button, save) {
  if (item.querySelector(".edit")) return item.querySelector(".edit textarea").focus();
  const id = `edit-${item.dataset.turn}`;
  const area = el("textarea", { id, rows: "4", required: "" });
  area.value = item.raw;
  const close = () => { form.remove(); button.setAttribute("aria-expanded", "false"); button.focus(); };
  const form = el("form", { class: "edit", onsubmit: (e) => { e.preventDefault(); save(area.value.trim()); close(); } },
    el("label", { for: id, text: "Corrected answer" }), area,
    el("div", { class: "buttons" }, el("button", { type: "submit", text: "Save correction" }),
       el("button", { type: "button", text: "Cancel", onclick: close })));
  item.append(form);
  button.setAttribute("aria-expanded", "true");
  area.focus();
}

/* --- the trace panel ------------------------------------------------------------------- */

function renderTrace(trace, turnId) {
  $("trace-summary").textContent = `Answer ${turnId}: ${trace.stages.length} stages, ${trace.total_ms} ms in all.`;
  $("trace-stages").replaceChildren(...trace.stages.map((s) => el("li", {},
    el("details", {},
      el("summary", {}, el("strong", { text: s.stage }), ` ${s.decision} `, el("span", { class: "ms", text: `${s.ms} ms` })),
      el("pre", { tabindex: "0", text: JSON.stringify(s.evidence, null, 2) })))));
}

function toggleTrace() {
  const open = $("trace").hidden;
  $("trace").hidden = !open;
  $("trace-toggle").setAttribute("aria-expanded", String(open));
  if (open) $("trace-title").focus();
}

/* --- conversations: list, search, rename, delete ------------------------------------------ */

async function loadConversations() {
  const q = $("search").value.trim();
  const { data } = await getJSON(`/api/conversations${q ? `?q=${encodeURIComponent(q)}` : ""}`);
  if (q !== $("search").value.trim()) return;  // typed on meanwhile: a newer search follows
  $("conversations").replaceChildren(...data.map(conversationItem));
  if (!data.length) $("conversations").append(el("li", { class: "empty", text: q ? `No conversation mentions “${q}”.` : "None yet." }));
}

function conversationItem(c) {
  const title = c.title || `Conversation ${c.id}`;
  const item = el("li", { "data-id": c.id });
  item.append(
    el("button", { type: "button", class: "open", "aria-current": String(c.id === state.conversation),
                   text: title, onclick: () => openConversation(c.id).catch(showError) }),
    iconButton("pencil", `Rename conversation ${title}`, () => renameForm(item, c.id, title)),
    iconButton("trash", `Delete conversation ${title}`, () => deleteConversation(c.id, title).catch(showError),
               { class: "delete", "aria-haspopup": "dialog" }));
  return item;
}

function renameForm(item, id, title) {
  const input = el("input", { type: "text", value: title, maxlength: "200", required: "",
                              "aria-label": `New title for conversation ${title}` });
  const cancel = () => loadConversations().catch(showError);
  const form = el("form", { class: "rename", onsubmit: async (e) => {
    e.preventDefault();
    const name = input.value.trim();
    if (!name) return;
    try {
      const saved = await sendJSON("PATCH", `/api/conversations/${id}`, { title: name });
      if (id === state.conversation) $("chat-title").textContent = saved.title;
      await loadConversations();
      $("conversations").querySelector(`[data-id="${id}"] .open`)?.focus();
    } catch (err) {
      showError(err);
    }
  } }, input, iconButton("check", "Save title", null, { type: "submit" }), iconButton("close", "Cancel renaming", cancel));
  input.addEventListener("keydown", (e) => { if (e.key === "Escape") { e.stopPropagation(); cancel(); } });
  item.replaceChildren(form);
  input.select();
}

async function openConversation(id) {
  const conv = await getJSON(`/api/conversations/${id}`);
  newChat();
  state.conversation = conv.id;
  $("model").value = ASSISTANT;  // conversations are the assistant's
  $("chat-title").textContent = conv.title || `Conversation ${conv.id}`;
  const answers = conv.turns.filter((t) => t.role === "assistant");
  for (const t of conv.turns) {
    const item = addMessage(t.role, t.content, ASSISTANT);
    item.dataset.turn = t.id;
    if (t.role === "assistant")  // which model wrote it, as the server saved it with the answer
      item.append(el("p", { class: "meta", text: t.model ? `Answered by ${t.model} through the Parley assistant`
                                                         : "Answered by the Parley assistant (model not recorded)" }));
    if (t.role === "assistant") finishAnswer(item, t.id, t === answers.at(-1), true).then(showRegenerate);
  }
  loadConversations().catch(showError);
}

/* Asks first, in the page's own dialog; resolves to whether the user said yes. */
function confirmed(text) {
  $("confirm-text").textContent = text;
  const dialog = $("confirm");
  return new Promise((resolve) => {
    const done = (yes) => () => { dialog.close(); resolve(yes); };
    $("confirm-ok").onclick = done(true);
    $("confirm-cancel").onclick = done(false);
    dialog.oncancel = () => resolve(false);
    dialog.showModal();
  });
}

async function deleteConversation(id, title) {
  if (!(await confirmed(`Delete the conversation “${title}” with all its messages? This cannot be undone.`))) return;
  await getJSON(`/api/conversations/${id}`, { method: "DELETE" });
  if (state.conversation === id) newChat();
  await loadConversations();
}

function newChat() {
  stop();
  state.conversation = null;
  $("log").replaceChildren();
  $("chat-title").textContent = "New conversation";
}

/* --- documents, memory and settings ------------------------------------------------------ */

async function loadDocuments() {
  const { data } = await getJSON("/api/knowledge");
  $("documents").replaceChildren(...data.map((d) => el("li", {},
    el("span", { class: "name", text: d.collection === "default" ? d.name : `${d.name} (${d.collection})` }),
    iconButton("trash", `Delete document ${d.name}`, () => deleteDocument(d.id, d.name).catch(showError),
               { class: "delete", "aria-haspopup": "dialog" }))));
  if (!data.length) $("documents").append(el("li", { class: "empty", text: "None yet." }));
}

async function upload(form) {
  const status = $("upload-status");
  status.textContent = "Uploading…";
  try {
    const result = await getJSON("/api/knowledge", { method: "POST", body: new FormData(form) });
    status.textContent = `${result.name}: ${result.status === "stored" ? `stored, ${result.chunks} chunks` : result.status}` +
      (result.message ? ` (${result.message})` : "");
    form.elements.file.value = "";
    await loadDocuments();
  } catch (e) {
    status.textContent = "Upload failed.";
    showError(e);
  }
}

async function deleteDocument(id, name) {
  if (!(await confirmed(`Delete the document “${name}”? Answers will no longer draw on it.`))) return;
  await getJSON(`/api/knowledge/${id}`, { method: "DELETE" });
  await loadDocuments();
}

async function loadMemory() {
  const { data } = await getJSON("/api/memory");
  $("memory").replaceChildren(...data.map((f) => el("li", {}, el("span", { class: "name", text: f.text }),
    iconButton("trash", `Forget: ${f.text}`, () => forget(f.id).catch(showError), { class: "delete" }))));
  if (!data.length) $("memory").append(el("li", { class: "empty", text: "Nothing yet." }));
}

/* The user's own LoRA adapter (`parley learn user=NAME`): its state, and opting out or back in. */
async function loadAdapter() {
  const p = await getJSON("/api/me/personalization");
  const a = p.adapter;
  $("adapter").textContent = !p.on ? "Off: nothing you write is trained on, and you have no adapter."
    : !a ? "On: no adapter of yours yet (an operator trains one from your edits and ratings)."
    : `On: trained in round ${a.round} on ${a.base} ${a.base_version} (rank ${a.rank}); `
      + (p.serving ? "it answers your messages." : "not serving (it was made for another version).");
  $("adapter-switch").textContent = p.on ? "Turn personalization off" : "Turn personalization on";
  $("adapter-switch").onclick = () => switchAdapter(!p.on).catch(showError);
}

async function switchAdapter(on) {
  if (!on && !(await confirmed("Turn personalization off? Your adapter is deleted and your feedback is taken "
                               + "out of the training data, for good."))) return;
  await sendJSON("PUT", "/api/me/personalization", { on });
  await loadAdapter();
}

async function forget(id) {
  await getJSON(`/api/memory/${id}`, { method: "DELETE" });
  await loadMemory();
  $("fact").focus();
}

async function remember(form) {
  await sendJSON("POST", "/api/memory", { text: form.elements.text.value.trim() });
  form.reset();
  await loadMemory();
}

async function loadSettings() {
  const s = state.settings = await getJSON("/api/settings");
  const rows = [["Model", s.model], ["Version", s.version || "not recorded (the model was not loaded from the registry)"],
                ["Persona", s.persona], ["Stages", s.stages.join(" → ")], ["Longest answer", `${s.max_tokens} tokens`]];
  $("server-settings").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  $("server-settings").append(el("dd", { class: "help", text: "Set when the server starts: parley serve persona=\"...\" stages=[...]" }));
}

async function loadModels() {
  const { data } = await getJSON("/v1/models");
  const chosen = $("model").value;
  const names = data.map((m) => m.id).filter((n) => !NOT_FOR_CHAT.has(n));
  $("model").replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  $("model").value = names.includes(chosen) ? chosen : ASSISTANT;
}

/* --- start ----------------------------------------------------------------------------- */

async function refresh() {
  clearError();
  try {
    await Promise.all([loadModels(), loadSettings(), loadConversations(), loadDocuments(), loadMemory(),
                       loadAdapter()]);
  } catch (e) {
    showError(e);
  }
}

function shortcuts(e) {
  const key = e.key.toLowerCase();
  if ((e.ctrlKey || e.metaKey) && e.shiftKey && key === "o") {
    e.preventDefault();
    $("new-chat").click();
  } else if (e.key === "Escape" && e.shiftKey) {
    e.preventDefault();
    $("message").focus();
  } else if (e.key === "Escape" && state.controller && !document.querySelector("dialog[open]")) {
    e.preventDefault();
    stop();
  }
}

function start() {
  for (const b of document.querySelectorAll("[data-icon]")) b.prepend(icon(b.dataset.icon));
  $("key").value = localStorage.getItem(KEY_STORE) || "";
  $("settings").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    refresh();
  });
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("message").value.trim();
    if (!text || state.controller) return;
    $("message").value = "";
    clearError();
    send(text);
  });
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("ask").requestSubmit();
    }
  });
  document.addEventListener("keydown", shortcuts);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => { newChat(); loadConversations().catch(showError); $("message").focus(); });
  $("trace-toggle").addEventListener("click", toggleTrace);
  $("error-close").addEventListener("click", clearError);
  $("source-close").addEventListener("click", () => $("source").close());
  $("upload").addEventListener("submit", (e) => { e.preventDefault(); upload(e.target); });
  $("remember").addEventListener("submit", (e) => { e.preventDefault(); remember(e.target).catch(showError); });
  $("search-form").addEventListener("submit", (e) => e.preventDefault());
  $("search").addEventListener("input", () => {
    clearTimeout(state.searching);
    state.searching = setTimeout(() => loadConversations().catch(showError), 200);
  });
  $("trace-title").tabIndex = -1;
  refresh();
}

document.addEventListener("DOMContentLoaded", start);
