// The page's behaviour: ask /api/ask, colour each streamed token by its draft source, then show stats.
// The stream is Server-Sent Events read with fetch rather than EventSource, so that an HTTP 400 (an empty
// question, a prompt too long for the model) still shows the server's message.
"use strict";

const form = document.getElementById("ask");
const input = document.getElementById("question");
const button = document.getElementById("submit");
const statusLine = document.getElementById("status");
const answer = document.getElementById("answer");
const stats = document.getElementById("stats");

// Source labels are "target", a drafter name, or several names joined by "+" (proposed by more than one).
const SOURCE_CLASSES = { ngram: "src-ngram", eagle: "src-eagle", target: "src-target" };
const SOURCE_NAMES = { ngram: "n-gram from the documents", eagle: "EAGLE head", target: "target (bonus token)" };
const TIME_PARTS = ["prefill", "draft", "verify", "other"];

function sourceClass(source) {
  return SOURCE_CLASSES[source] || (source.includes("+") ? "src-both" : "src-target");
}

function setState(state, message) {
  document.body.dataset.state = state;
  statusLine.textContent = message;
}

// Yields [event, data] for each "event: ...\ndata: {json}\n\n" block of a streamed response body.
async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice("event: ".length);
        else if (line.startsWith("data: ")) data += line.slice("data: ".length);
      }
      yield [event, JSON.parse(data)];
    }
  }
}

function addToken(piece) {
  if (!piece.text) return; // an incomplete multi-byte character: its text comes with the next token
  const span = document.createElement("span");
  span.className = `tok ${sourceClass(piece.source)}`;
  span.dataset.source = piece.source;
  span.title = `${SOURCE_NAMES[piece.source] || piece.source} · target forward ${piece.step + 1}`;
  span.textContent = piece.text;
  answer.append(span);
}

function row(list, term, ...content) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = term;
  dd.append(...content);
  list.append(dt, dd);
}

function chip(className, text) {
  const span = document.createElement("span");
  span.className = `chip ${className}`;
  span.textContent = text;
  return span;
}

function showStats(done) {
  const s = done.stats;
  const list = document.getElementById("stats-list");
  list.replaceChildren();
  row(list, "τ (tokens per target forward)", s.tau.toFixed(2));
  row(list, "Speed", `${s.tokens_per_s.toFixed(1)} tokens/s (${s.new_tokens} tokens in ${s.steps} forwards)`);
  const accepted = Object.entries(s.accepted_by_source).sort();
  row(list, "Accepted drafts by source",
    ...(accepted.length ? accepted.map(([src, n]) => chip(sourceClass(src), `${src} ${n}`)) : ["none"]));
  row(list, "Time", ...TIME_PARTS.map((part) => chip(`time-${part}`, `${part} ${s[`${part}_s`].toFixed(2)} s`)));
  row(list, "Stopped by", s.stop_reason);

  const total = TIME_PARTS.reduce((sum, part) => sum + s[`${part}_s`], 0) || 1;
  document.getElementById("time-bar").replaceChildren(...TIME_PARTS.map((part) => {
    const bar = document.createElement("span");
    bar.className = `time-${part}`;
    bar.style.width = `${(100 * s[`${part}_s`]) / total}%`;
    return bar;
  }));

  const sources = document.getElementById("sources");
  sources.replaceChildren(...done.sources.map((chunk) => {
    const item = document.createElement("li");
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = `${chunk.source} (similarity ${chunk.score.toFixed(2)})`;
    details.append(summary, chunk.text);
    item.append(details);
    return item;
  }));
  if (!done.sources.length) sources.textContent = "No document matched; the answer has no context.";
  stats.hidden = false;
}

async function ask(question) {
  answer.replaceChildren();
  stats.hidden = true;
  button.disabled = true;
  setState("streaming", "Retrieving passages and generating…");
  history.replaceState(null, "", `?q=${encodeURIComponent(question)}`);
  try {
    const response = await fetch(`/api/ask?q=${encodeURIComponent(question)}`);
    if (!response.ok) throw new Error((await response.json()).error);
    for await (const [event, data] of readEvents(response.body)) {
      if (event === "token") addToken(data);
      else if (event === "error") throw new Error(data.error);
      else if (event === "done") {
        showStats(data);
        setState("done", `Answered in ${data.stats.total_s.toFixed(1)} s.`);
      }
    }
    if (document.body.dataset.state !== "done") throw new Error("The answer stream ended early.");
  } catch (err) {
    setState("error", `Error: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  ask(input.value);
});

// A link like /?q=Who+designed+the+Eiffel+Tower%3F asks at once (used by scripts/check_web_page.sh).
const initial = new URLSearchParams(location.search).get("q");
if (initial !== null) {
  input.value = initial;
  ask(initial);
}
