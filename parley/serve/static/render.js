/* Answers as safe rich text: Markdown (markdown-it, raw HTML off) -> sanitised DOM (DOMPurify)
   -> code blocks highlighted (highlight.js, common languages) with a copy button, links opening
   in a new tab, and each citation [n] a button that shows its source.

   renderMarkdown(box, text)                  // again and again while an answer streams in
   renderMarkdown(box, text, {cite: (n) => button or null})   // once it is saved, with sources

   Safety does not rest on one layer: markdown-it escapes any HTML in the text and refuses
   javascript:/vbscript:/data: links, DOMPurify then removes whatever script-bearing markup or
   URL is left, and the page's Content-Security-Policy runs no inline script at all. Images are
   shown as links: a picture from elsewhere would tell that site who reads the answer.

   Re-rendering keeps the blocks that did not change (compared with isEqualNode) and replaces
   only the rest, so a streaming answer grows without its finished paragraphs (or a code block
   being selected) flickering. */
"use strict";

const SAFE_URL = /^(?:https?:|mailto:|#)/i;

const markdown = window.markdownit({
  html: false, linkify: true, typographer: false,
  highlight(code, lang) {
    if (!lang || !hljs.getLanguage(lang)) return "";  // markdown-it escapes it as plain code
    try {
      return hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
    } catch {
      return "";
    }
  },
});
markdown.renderer.rules.image = (tokens, i) => {
  const t = tokens[i];
  const alt = markdown.utils.escapeHtml(t.content || "image");
  const src = markdown.utils.escapeHtml(t.attrGet("src") || "");
  return `<a href="${src}">${alt}</a>`;
};

function sanitize(html) {
  return DOMPurify.sanitize(html, {
    RETURN_DOM_FRAGMENT: true, ALLOWED_URI_REGEXP: SAFE_URL,
    FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe", "svg", "math"],
    FORBID_ATTR: ["style", "id", "name"],
  });
}

function renderMarkdown(box, text, options = {}) {
  const fragment = sanitize(markdown.render(text));
  for (const a of fragment.querySelectorAll("a[href]")) {
    a.setAttribute("target", "_blank");
    a.setAttribute("rel", "noopener noreferrer nofollow");
  }
  for (const pre of fragment.querySelectorAll("pre")) codeBlock(pre);
  for (const wide of fragment.querySelectorAll("pre, table")) wide.tabIndex = 0;  // may scroll sideways: keys too
  if (options.cite) citeNumbers(fragment, options.cite);
  const next = [...fragment.childNodes];
  const old = [...box.childNodes];
  let same = 0;
  while (same < old.length && same < next.length && old[same].isEqualNode(next[same])) same++;
  for (const node of old.slice(same)) node.remove();
  box.append(...next.slice(same));
}

/* <pre> -> <div class="code"> holding a head (language, copy button) and the <pre>. */
function codeBlock(pre) {
  const code = pre.querySelector("code");
  const lang = /\blanguage-([\w+#.-]+)/.exec(code?.className || "")?.[1] || "";
  if (code && lang) code.classList.add("hljs");
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "icon-button copy-code";
  copy.setAttribute("aria-label", `Copy code${lang ? ` (${lang})` : ""}`);
  copy.title = "Copy code";
  copy.append(icon("copy"));
  copy.addEventListener("click", () => copyText((code || pre).textContent, copy));
  const head = document.createElement("div");
  head.className = "code-head";
  head.append(Object.assign(document.createElement("span"), { textContent: lang || "code" }), copy);
  const box = document.createElement("div");
  box.className = "code";
  pre.replaceWith(box);
  box.append(head, pre);
}

/* [n] in running text (not in code or links) -> cite(n), where that gives a node. */
function citeNumbers(root, cite) {
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
    acceptNode: (n) => (n.parentElement?.closest("pre, code, a") ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT),
  });
  const texts = [];
  while (walker.nextNode()) if (/\[\d+\]/.test(walker.currentNode.data)) texts.push(walker.currentNode);
  for (const node of texts) {
    const parts = node.data.split(/(\[\d+\])/).map((part) => {
      const m = /^\[(\d+)\]$/.exec(part);
      return (m && cite(Number(m[1]))) || part;
    });
    node.replaceWith(...parts);
  }
}

/* The clipboard, or, where the page may not use it, a selection copied the old way. */
async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = Object.assign(document.createElement("textarea"), { value: text });
    area.setAttribute("aria-hidden", "true");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    const svg = button.querySelector("svg");
    svg?.replaceWith(icon("check"));
    button.dataset.copied = "true";
    setTimeout(() => { button.querySelector("svg")?.replaceWith(icon("copy")); delete button.dataset.copied; }, 1500);
  }
}
