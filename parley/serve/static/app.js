/* Parley's web page: plain JavaScript over the same HTTP API every client uses.

   POST /v1/chat/completions (stream: true)   the answer, as Server-Sent Events read with fetch;
        model "parley" answers in the conversation the X-Parley-Conversation header names, and
        its last chunk's "parley" object gives the conversation and the saved turn's ids
   GET  /api/turns/{id}/trace                 the trace panel, and what each citation [n] is
   GET  /api/chunks/{id}                      a cited chunk's text
   POST /api/turns/{id}/feedback              thumbs up/down and corrections
   /api/conversations, /api/knowledge         the two lists at the side

   Text from the model or the server is only ever put in the page as text (textContent), never
   as HTML. The key lives in localStorage; without one, requests go without Authorization (a
   server run with --no-auth). */
"use strict";

const KEY_STORE = "parley.key";
const ASSISTANT = "parley";
const NOT_FOR_CHAT = new Set(["all-minilm-l6-v2"]);  // the server's embedding model

const $ = (id) => document.getElementById(id);
const state = {
  conversation: null,  // id of the assistant conversation shown, null for a new one
  history: [],         // messages so far, sent whole to a raw model (the assistant keeps its own)
  traces: new Map(),   // turn id -> trace
  controller: null,    // aborts the answer being streamed
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

function addMessage(role, text) {
  const item = el("li", { class: `msg ${role}` }, el("p", { class: "who", text: role === "user" ? "You" : "Parley" }),
                  el("div", { class: "text", text }));
  $("log").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

async function send(text) {
  const model = $("model").value;
  const assistant = model === ASSISTANT;
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  const body = answer.querySelector(".text");
  const headers = { "Content-Type": "application/json" };
  if (assistant && state.conversation) headers["X-Parley-Conversation"] = String(state.conversation);
  const messages = assistant ? [{ role: "user", content: text }] : [...state.history, { role: "user", content: text }];
  let ids = null;
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
      if (piece) body.append(piece);  // text nodes: shown as it comes
      if (chunk.parley) ids = chunk.parley;
    });
    body.textContent = body.textContent.trim() || "(no answer)";  // as the store keeps it
    if (!assistant) state.history.push({ role: "user", content: text }, { role: "assistant", content: body.textContent });
  } catch (e) {
    if (e.name === "AbortError") body.append(" [stopped]");
    else {
      answer.classList.add("failed");
      body.append(`${body.textContent ? "\n" : ""}(no answer: ${e.message})`);
      showError(e);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (ids?.conversation_id) state.conversation = ids.conversation_id;
  if (ids?.turn_id) {
    await finishAnswer(answer, ids.turn_id, true);
    loadConversations().catch(showError);
  }
}

function setBusy(busy) {
  $("log").setAttribute("aria-busy", String(busy));  // screen readers read the answer once it is whole
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

/* An answer the store has saved: its citations, feedback buttons and (if it is the latest) trace;
   reopened from history (`earlier`), also the feedback it was given then. */
async function finishAnswer(item, turnId, latest, earlier = false) {
  item.dataset.turn = turnId;
  const controls = feedbackControls(item, turnId);
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
  const parts = body.textContent.split(/(\[\d+\])/);
  body.replaceChildren(...parts.map((part) => {
    const m = /^\[(\d+)\]$/.exec(part);
    return m && sources.has(Number(m[1])) ? citeButton(sources.get(Number(m[1]))) : part;
  }));
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

/* --- feedback -------------------------------------------------------------------------- */

function feedbackControls(item, turnId) {
  const status = el("span", { class: "status", role: "status" });
  const rate = (rating, editedText) => postFeedback(turnId, rating, editedText, group, status);
  const thumb = (rating, icon, label) => el("button", { type: "button", "aria-pressed": "false", "data-rating": rating,
                                                       onclick: () => rate(Number(rating)) },
                                           el("span", { "aria-hidden": "true", text: icon }), ` ${label}`);
  const up = thumb("1", "👍", "Good");
  const down = thumb("-1", "👎", "Bad");
  const edit = el("button", { type: "button", text: "Edit", "aria-expanded": "false",
                              onclick: () => openEditor(item, edit, (text) => rate(Number(group.dataset.rating) || -1, text)) });
  const group = el("div", { class: "actions", role: "group", "aria-label": "Feedback on this answer" },
                   up, down, edit, status);
  return group;
}

async function postFeedback(turnId, rating, editedText, group, status) {
  const body = { rating };
  if (editedText) body.edited_text = editedText;
  try {
    await getJSON(`/api/turns/${turnId}/feedback`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
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
  area.value = item.querySelector(".text").textContent;
  const close = () => { form.remove(); button.setAttribute("aria-expanded", "false"); button.focus(); };
  const form = el("form", { class: "edit", onsubmit: (e) => { e.preventDefault(); save(area.value.trim()); close(); } },
    el("label", { for: id, text: "Corrected answer" }), area,
    el("button", { type: "submit", text: "Save correction" }),
    el("button", { type: "button", text: "Cancel", onclick: close }));
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
      el("pre", { text: JSON.stringify(s.evidence, null, 2) })))));
}

function toggleTrace() {
  const open = $("trace").hidden;
  $("trace").hidden = !open;
  $("trace-toggle").setAttribute("aria-expanded", String(open));
  if (open) $("trace-title").focus();
}

/* --- the lists at the side ------------------------------------------------------------- */

async function loadConversations() {
  const { data } = await getJSON("/api/conversations");
  $("conversations").replaceChildren(...data.map((c) => el("li", {},
    el("button", { type: "button", class: "open", "aria-current": String(c.id === state.conversation),
                   text: c.title || `Conversation ${c.id}`, onclick: () => openConversation(c.id).catch(showError) }),
    el("button", { type: "button", class: "delete", "aria-label": `Delete conversation ${c.title || c.id}`,
                   text: "Delete", onclick: () => deleteConversation(c.id).catch(showError) }))));
  if (!data.length) $("conversations").append(el("li", { class: "empty", text: "None yet." }));
}

async function openConversation(id) {
  const conv = await getJSON(`/api/conversations/${id}`);
  newChat();
  state.conversation = conv.id;
  $("model").value = ASSISTANT;  // conversations are the assistant's
  $("chat-title").textContent = conv.title || `Conversation ${conv.id}`;
  const answers = conv.turns.filter((t) => t.role === "assistant");
  for (const t of conv.turns) {
    const item = addMessage(t.role, t.content);
    if (t.role === "assistant") finishAnswer(item, t.id, t === answers[answers.length - 1], true);
  }
  loadConversations().catch(showError);
}

async function deleteConversation(id) {
  await getJSON(`/api/conversations/${id}`, { method: "DELETE" });
  if (state.conversation === id) newChat();
  await loadConversations();
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.conversation = null;
  state.history = [];
  $("log").replaceChildren();
  $("chat-title").textContent = "New conversation";
}

async function loadDocuments() {
  const { data } = await getJSON("/api/knowledge");
  $("documents").replaceChildren(...data.map((d) => el("li", {},
    el("span", { class: "name", text: d.collection === "default" ? d.name : `${d.name} (${d.collection})` }),
    el("button", { type: "button", class: "delete", "aria-label": `Delete document ${d.name}`, text: "Delete",
                   onclick: () => deleteDocument(d.id).catch(showError) }))));
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

async function deleteDocument(id) {
  await getJSON(`/api/knowledge/${id}`, { method: "DELETE" });
  await loadDocuments();
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
    await Promise.all([loadModels(), loadConversations(), loadDocuments()]);
  } catch (e) {
    showError(e);
  }
}

function start() {
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
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => { newChat(); loadConversations().catch(showError); $("message").focus(); });
  $("trace-toggle").addEventListener("click", toggleTrace);
  $("error-close").addEventListener("click", clearError);
  $("source-close").addEventListener("click", () => $("source").close());
  $("upload").addEventListener("submit", (e) => { e.preventDefault(); upload(e.target); });
  $("trace-title").tabIndex = -1;
  refresh();
}

document.addEventListener("DOMContentLoaded", start);
