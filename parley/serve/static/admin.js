/* The admin page: /api/learn/* with the key the chat page keeps in localStorage. Text goes into
   the page with textContent only (never HTML). */
"use strict";

const KEY = "parley.key";  // the chat page's (app.js KEY_STORE)
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, body ? { method: "POST", headers, body: JSON.stringify(body) } : { headers });
  if (!response.ok) {
    const error = await response.json().catch(() => null);
    throw new Error(error?.error?.message || `HTTP ${response.status}`);
  }
  return response.headers.get("content-type")?.includes("json") ? response.json() : response.text();
}

function row(table, cells) {
  const tr = $(table).tBodies[0].insertRow();
  for (const cell of cells) {
    const td = tr.insertCell();
    if (cell instanceof Node) td.append(cell); else td.textContent = cell ?? "";
  }
}

function button(text, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", onclick);
  return b;
}

async function act(path, body) {
  try {
    const v = await api(path, body);
    $("status").textContent = `serving ${v.model} ${v.serving}`;
    await load();
  } catch (e) {
    $("status").textContent = e.message;
  }
}

async function load() {
  for (const t of ["versions", "rounds"]) $(t).tBodies[0].replaceChildren();
  try {
    const versions = await api("/api/learn/versions");
    $("status").textContent = `serving ${versions.model} ${versions.serving}`;
    for (const v of versions.data) {
      row("versions", [v.version, v.created_at, v.note, v.current ? "current" : "",
                       v.current ? "" : button(`Promote ${v.version}`, () => act("/api/learn/promote", { version: v.version }))]);
    }
    const rounds = await api("/api/learn/rounds");
    for (const r of rounds.data) {
      row("rounds", [r.round, r.at, `${r.counts.sft || 0} SFT targets, ${r.counts.pairs || 0} pairs, ${r.counts.skipped || 0} left out` +
                     (r.withdrawn ? `, ${r.withdrawn} withdrawn since` : ""),
                     r.promoted ? `promoted as ${r.version}` : "refused", (r.reasons || []).join("; "),
                     button(`Show round ${r.round}`, async () => { $("report").textContent = await api(`/api/learn/rounds/${r.round}/report`); })]);
    }
  } catch (e) {
    $("status").textContent = e.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("rollback").addEventListener("click", () => act("/api/learn/rollback", { version: "" }));
  load();
});
