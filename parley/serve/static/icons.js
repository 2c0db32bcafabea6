/* The page's icons: inline SVG line drawings on a 24-unit grid, drawn in the text colour, so
   they need no icon font and no emoji font and follow the theme.

   icon("copy")                     -> <svg aria-hidden="true" ...>: put it in a button that has a name
   <button data-icon="send">Send</button>   gets its icon prepended when the page starts */
"use strict";

const ICONS = {
  send: "M12 19V5M5 12l7-7 7 7",
  stop: "M7 7h10v10H7z",
  copy: "M9 9h11v11H9zM5 15H4V4h11v1",
  check: "M5 12l5 5 9-11",
  regenerate: "M20 12a8 8 0 1 1-2.4-5.7M20 4v6h-6",
  pencil: "M4 20h4L19 9l-4-4L4 16zM13 7l4 4",
  up: "M7 10v10H4V10zM7 10l4-7c1.4 0 2.4 1 2.2 2.5L12.6 9H19a2 2 0 0 1 2 2.3l-1.3 7A2 2 0 0 1 17.7 20H7",
  down: "M7 14V4H4v10zM7 14l4 7c1.4 0 2.4-1 2.2-2.5L12.6 15H19a2 2 0 0 0 2-2.3l-1.3-7A2 2 0 0 0 17.7 4H7",
  trash: "M4 7h16M9 7V4h6v3M6 7l1 13h10l1-13M10 11v6M14 11v6",
  plus: "M12 5v14M5 12h14",
  trace: "M9 6h11M9 12h11M9 18h11M4 6h1M4 12h1M4 18h1",
  upload: "M12 16V4M6 10l6-6 6 6M4 20h16",
  close: "M6 6l12 12M18 6L6 18",
};

function icon(name) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  for (const [k, v] of Object.entries({ viewBox: "0 0 24 24", width: "20", height: "20", fill: "none",
    stroke: "currentColor", "stroke-width": "2", "stroke-linecap": "round", "stroke-linejoin": "round",
    "aria-hidden": "true", focusable: "false", class: "icon" })) svg.setAttribute(k, v);
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", ICONS[name]);
  svg.append(path);
  return svg;
}
