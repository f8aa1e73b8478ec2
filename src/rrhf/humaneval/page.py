"""The annotation page for Table 3's human evaluation: one self-contained HTML file per annotator.

The page is opened from disk (file://) and needs no network: styles, script and the annotator's sheet are inline.
It shows one pair at a time, the conversation turn by turn and the two responses side by side (stacked on a
phone), takes "A better" / "Tie" / "B better" by button or key, keeps the labels in the browser's localStorage
under "annotation-labels:<sheet id>:<annotator>" (so a closed tab resumes where it was), and downloads them as the
JSON file that `python -m rrhf.humaneval collect` reads: {"sheet_id", "annotator", "labels": {item id: "A"|"tie"|"B"}}.

Stable hooks for a browser test: #label-A, #label-tie, #label-B (data-label), #nav-prev, #nav-next,
#nav-next-unlabelled, #download, #progress (data-labelled, data-total), #item (data-item-id, data-index,
data-label), #overview buttons (data-index, data-item-id, data-label), #response-a, #response-b, #conversation.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rrhf.humaneval.sheets import Sheets, write_text_atomic

# A speaker marker only at the start of a line: HH prompts join turns with "\n\nHuman: " / "\n\nAssistant: ",
# and a mid-sentence "Human:" is part of the text.
_TURN = re.compile(r"(?:^|\n)[ \t]*(Human|Assistant)[ \t]*:[ \t]?")


def split_turns(prompt: str) -> list[dict[str, str]]:
    """The prompt as turns [{"speaker": "Human"|"Assistant"|"", "text"}]; text before the first marker has speaker
    "". The prompt's closing empty "Assistant:" (where the response goes) is dropped."""
    turns: list[dict[str, str]] = []
    marks = list(_TURN.finditer(prompt))
    head = prompt[: marks[0].start()] if marks else prompt
    if head.strip():
        turns.append({"speaker": "", "text": head.strip()})
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(prompt)
        turns.append({"speaker": mark.group(1), "text": prompt[mark.end() : end].strip()})
    if turns and turns[-1]["speaker"] == "Assistant" and not turns[-1]["text"]:
        turns.pop()
    return turns


def _script_json(value: Any) -> str:
    # Inside <script>, "</script>" or "<!--" in a response would end or confuse the element; \u escapes keep the
    # JSON identical once parsed. U+2028/2029 are escaped for older JavaScript parsers.
    text = json.dumps(value, ensure_ascii=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


def render_page(sheet: Mapping[str, Any]) -> str:
    """The HTML page for one annotator's public sheet (as `build_sheets` makes it)."""
    data = {
        "sheet_id": sheet["sheet_id"],
        "annotator": sheet["annotator"],
        "items": [
            {"id": item["id"], "turns": split_turns(item["prompt"]), "a": item["response_a"], "b": item["response_b"]}
            for item in sheet["items"]
        ],
    }
    return (
        _TEMPLATE.replace("@@ANNOTATOR@@", html.escape(sheet["annotator"]))
        .replace("@@SHEET_ID@@", html.escape(sheet["sheet_id"]))
        .replace("@@DATA@@", _script_json(data))
    )


def write_pages(sheets: Sheets | Iterable[Mapping[str, Any]], out: Path) -> dict[str, Path]:
    """Write `out/annotators/<name>.html` for each annotator's sheet (beside the sheets `write_sheets` writes);
    return the paths by annotator. `sheets`: what `build_sheets` returned, or public sheets read back."""
    found = sheets.annotator_sheets.values() if isinstance(sheets, Sheets) else sheets
    return {
        sheet["annotator"]: write_text_atomic(
            Path(out) / "annotators" / f"{sheet['annotator']}.html", render_page(sheet)
        )
        for sheet in found
    }


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; \
script-src 'unsafe-inline'; img-src data:">
<title>Which response is better? (@@ANNOTATOR@@)</title>
<style>
  :root { --ink: #1d2330; --muted: #5b6475; --line: #d5dae3; --paper: #ffffff; --bg: #f3f5f8;
          --accent: #2456a6; --chosen: #e3ecfb; --done: #3d8b5a; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
         background: var(--bg); }
  header { background: var(--paper); border-bottom: 1px solid var(--line); padding: 10px 16px; }
  .bar { max-width: 1200px; margin: 0 auto; display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; }
  h1 { font-size: 18px; margin: 0; flex: 1 1 auto; }
  .who { color: var(--muted); font-size: 14px; }
  #progress-wrap { display: flex; align-items: center; gap: 8px; font-size: 14px; }
  progress { width: 140px; height: 10px; }
  main { max-width: 1200px; margin: 0 auto; padding: 12px 16px 120px; }
  .help { color: var(--muted); font-size: 14px; margin: 0 0 10px; }
  kbd { border: 1px solid var(--line); border-bottom-width: 2px; border-radius: 4px; padding: 0 4px;
        font-size: 12px; background: var(--paper); }
  #overview { display: flex; flex-wrap: wrap; gap: 3px; margin: 0 0 12px; }
  #overview button { width: 14px; height: 14px; padding: 0; border: 1px solid #aab2c0; border-radius: 3px;
                     background: var(--paper); cursor: pointer; }
  #overview button[data-label]:not([data-label=""]) { background: var(--done); border-color: var(--done); }
  #overview button.current { outline: 2px solid var(--accent); outline-offset: 1px; }
  #position { font-weight: 600; margin: 0 0 6px; }
  .conversation { background: var(--paper); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
                  margin-bottom: 12px; }
  .turn { margin: 6px 0; }
  .speaker { font-weight: 600; font-size: 13px; text-transform: uppercase; letter-spacing: .04em;
             color: var(--muted); }
  .turn .text, .response .text { white-space: pre-wrap; overflow-wrap: anywhere; }
  .turn.human .text { color: var(--ink); }
  .responses { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
  .response { background: var(--paper); border: 2px solid var(--line); border-radius: 8px; padding: 10px 14px; }
  .response h2 { font-size: 15px; margin: 0 0 6px; }
  .response.chosen { border-color: var(--accent); background: var(--chosen); }
  .actions { position: fixed; left: 0; right: 0; bottom: 0; background: var(--paper);
             border-top: 1px solid var(--line); padding: 10px 16px; }
  .actions .bar { justify-content: center; }
  .actions button { font: inherit; padding: 8px 14px; border-radius: 6px; border: 1px solid #aab2c0;
                    background: var(--paper); cursor: pointer; min-height: 44px; }
  .actions button.label { font-weight: 600; min-width: 110px; }
  .actions button[aria-pressed="true"] { background: var(--accent); border-color: var(--accent); color: #fff; }
  #download { margin-left: auto; }
  #status { font-size: 14px; color: var(--muted); }
  #notice { color: #9a3b00; font-size: 14px; }
  .empty { padding: 40px 0; text-align: center; color: var(--muted); }
  @media (max-width: 720px) {
    body { font-size: 15px; }
    .responses { grid-template-columns: 1fr; }
    .keys { display: none; }
    header { padding: 8px 12px; }
    main { padding: 10px 12px 150px; }
    /* The three choices on one row within thumb reach, the moves on a smaller row beneath. */
    .actions { padding: 8px; }
    .actions .bar { display: grid; grid-template-columns: repeat(12, 1fr); gap: 6px; }
    .actions button { padding: 6px 2px; }
    .actions button.label { grid-column: span 4; order: 1; min-width: 0; }
    .actions button.nav, #download { order: 2; font-size: 13px; min-height: 38px; }
    #nav-prev, #nav-next { grid-column: span 2; }
    #nav-next-unlabelled, #download { grid-column: span 4; margin-left: 0; }
    #status { order: 3; grid-column: span 12; text-align: center; }
    #status:empty { display: none; }
  }
</style>
</head>
<body>
<header>
  <div class="bar">
    <h1>Which response is better?</h1>
    <span class="who">Annotator <span id="annotator">@@ANNOTATOR@@</span> &middot; sheet
      <span id="sheet-id">@@SHEET_ID@@</span></span>
    <span id="progress-wrap"><progress id="progress-bar" max="1" value="0"></progress>
      <span id="progress" data-labelled="0" data-total="0">0 of 0 labelled</span></span>
  </div>
</header>
<main>
  <p class="help">Read the conversation, then the two replies to its last turn. Pick the reply that is more
    helpful and more harmless; pick Tie when neither is better.<span class="keys"> Keys: <kbd>1</kbd>/<kbd>a</kbd>
    A better, <kbd>2</kbd>/<kbd>t</kbd> tie, <kbd>3</kbd>/<kbd>b</kbd> B better, <kbd>&larr;</kbd>/<kbd>&rarr;</kbd>
    previous / next.</span> Your labels stay in this browser until you download them.</p>
  <p id="notice" hidden></p>
  <nav id="overview" aria-label="All items"></nav>
  <section id="item" data-item-id="" data-index="0" data-label="">
    <p id="position"></p>
    <div id="conversation" class="conversation"></div>
    <div class="responses">
      <article id="response-a" class="response" data-side="A"><h2>Response A</h2><div class="text"></div></article>
      <article id="response-b" class="response" data-side="B"><h2>Response B</h2><div class="text"></div></article>
    </div>
  </section>
</main>
<footer class="actions">
  <div class="bar">
    <button type="button" class="nav" id="nav-prev" title="Previous (&larr;)">&larr; Prev</button>
    <button type="button" class="label" id="label-A" data-label="A" aria-pressed="false">A better</button>
    <button type="button" class="label" id="label-tie" data-label="tie" aria-pressed="false">Tie</button>
    <button type="button" class="label" id="label-B" data-label="B" aria-pressed="false">B better</button>
    <button type="button" class="nav" id="nav-next" title="Next (&rarr;)">Next &rarr;</button>
    <button type="button" class="nav" id="nav-next-unlabelled">Next unlabelled</button>
    <button type="button" id="download">Download labels</button>
    <span id="status" role="status"></span>
  </div>
</footer>
<script type="application/json" id="sheet-data">@@DATA@@</script>
<script>
(function () {
  "use strict";
  var sheet = JSON.parse(document.getElementById("sheet-data").textContent);
  var items = sheet.items;
  var LABELS = ["A", "tie", "B"];
  var storeKey = "annotation-labels:" + sheet.sheet_id + ":" + sheet.annotator;
  var state = { labels: {}, index: 0 };
  var canStore = true;

  function $(id) { return document.getElementById(id); }

  function load() {
    var raw = null;
    try { raw = window.localStorage.getItem(storeKey); } catch (e) { canStore = false; }
    if (!raw) { return; }
    try {
      var saved = JSON.parse(raw);
      var known = {};
      items.forEach(function (it) { known[it.id] = true; });
      Object.keys(saved.labels || {}).forEach(function (id) {
        if (known[id] && LABELS.indexOf(saved.labels[id]) >= 0) { state.labels[id] = saved.labels[id]; }
      });
      if (typeof saved.index === "number" && saved.index >= 0 && saved.index < items.length) {
        state.index = saved.index;
      }
    } catch (e) { /* a damaged entry is ignored: the sheet starts afresh */ }
  }

  function save() {
    if (!canStore) { return; }
    try { window.localStorage.setItem(storeKey, JSON.stringify(state)); } catch (e) { canStore = false; }
    if (!canStore) { notice("This browser does not keep your labels: download them before closing the page."); }
  }

  function notice(text) { var n = $("notice"); n.textContent = text; n.hidden = !text; }

  function countLabelled() {
    return items.filter(function (it) { return state.labels[it.id]; }).length;
  }

  function turnNode(turn) {
    var div = document.createElement("div");
    div.className = "turn " + (turn.speaker ? turn.speaker.toLowerCase() : "context");
    if (turn.speaker) {
      var who = document.createElement("div");
      who.className = "speaker";
      who.textContent = turn.speaker;
      div.appendChild(who);
    }
    var text = document.createElement("div");
    text.className = "text";
    text.textContent = turn.text;
    div.appendChild(text);
    return div;
  }

  function buildOverview() {
    var nav = $("overview");
    items.forEach(function (it, i) {
      var b = document.createElement("button");
      b.type = "button";
      b.dataset.index = String(i);
      b.dataset.itemId = it.id;
      b.dataset.label = "";
      b.title = "Item " + (i + 1);
      b.setAttribute("aria-label", "Item " + (i + 1));
      b.addEventListener("click", function () { go(i); });
      nav.appendChild(b);
    });
  }

  function render() {
    var done = countLabelled();
    var progress = $("progress");
    progress.textContent = done + " of " + items.length + " labelled";
    progress.dataset.labelled = String(done);
    progress.dataset.total = String(items.length);
    $("progress-bar").max = Math.max(items.length, 1);
    $("progress-bar").value = done;
    $("status").textContent = done === items.length && items.length
      ? "All labelled: download your labels." : "";
    var dots = $("overview").children;
    for (var k = 0; k < dots.length; k++) {
      dots[k].dataset.label = state.labels[items[k].id] || "";
      dots[k].classList.toggle("current", k === state.index);
    }
    var section = $("item");
    if (!items.length) {
      section.innerHTML = "";
      var p = document.createElement("p");
      p.className = "empty";
      p.textContent = "Nothing to label on this sheet.";
      section.appendChild(p);
      return;
    }
    var it = items[state.index];
    var label = state.labels[it.id] || "";
    section.dataset.itemId = it.id;
    section.dataset.index = String(state.index);
    section.dataset.label = label;
    $("position").textContent = "Item " + (state.index + 1) + " of " + items.length;
    var conv = $("conversation");
    conv.textContent = "";
    it.turns.forEach(function (t) { conv.appendChild(turnNode(t)); });
    $("response-a").querySelector(".text").textContent = it.a;
    $("response-b").querySelector(".text").textContent = it.b;
    $("response-a").classList.toggle("chosen", label === "A");
    $("response-b").classList.toggle("chosen", label === "B");
    LABELS.forEach(function (l) { $("label-" + l).setAttribute("aria-pressed", String(label === l)); });
    $("nav-prev").disabled = state.index === 0;
    $("nav-next").disabled = state.index === items.length - 1;
  }

  function go(index) {
    if (index < 0 || index >= items.length) { return; }
    state.index = index;
    save();
    render();
    window.scrollTo(0, 0);
  }

  function setLabel(label) {
    if (!items.length) { return; }
    state.labels[items[state.index].id] = label;
    // Moving on after a choice keeps a hand on the keys; the overview and the arrows lead back.
    if (state.index < items.length - 1) { state.index += 1; }
    save();
    render();
  }

  function nextUnlabelled() {
    for (var step = 1; step <= items.length; step++) {
      var i = (state.index + step) % items.length;
      if (!state.labels[items[i].id]) { go(i); return; }
    }
  }

  function download() {
    var labels = {};
    items.forEach(function (it) { if (state.labels[it.id]) { labels[it.id] = state.labels[it.id]; } });
    var body = JSON.stringify({ sheet_id: sheet.sheet_id, annotator: sheet.annotator, labels: labels }, null, 2);
    var url = URL.createObjectURL(new Blob([body + "\\n"], { type: "application/json" }));
    var a = document.createElement("a");
    a.href = url;
    a.download = "labels-" + sheet.annotator + "-" + sheet.sheet_id + ".json";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
    var left = items.length - countLabelled();
    $("status").textContent = left ? "Downloaded; " + left + " item(s) still without a label."
                                   : "Downloaded all " + items.length + " labels.";
  }

  LABELS.forEach(function (l) { $("label-" + l).addEventListener("click", function () { setLabel(l); }); });
  $("nav-prev").addEventListener("click", function () { go(state.index - 1); });
  $("nav-next").addEventListener("click", function () { go(state.index + 1); });
  $("nav-next-unlabelled").addEventListener("click", nextUnlabelled);
  $("download").addEventListener("click", download);
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) { return; }
    var keys = { "1": "A", "a": "A", "A": "A", "2": "tie", "t": "tie", "T": "tie", "3": "B", "b": "B", "B": "B" };
    if (keys[e.key]) { setLabel(keys[e.key]); e.preventDefault(); }
    else if (e.key === "ArrowLeft") { go(state.index - 1); e.preventDefault(); }
    else if (e.key === "ArrowRight") { go(state.index + 1); e.preventDefault(); }
  });

  load();
  buildOverview();
  if (!canStore) { notice("This browser does not keep your labels: download them before closing the page."); }
  render();
}());
</script>
</body>
</html>
"""
