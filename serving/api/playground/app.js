// moa-stack playground: plain JavaScript, no build step, no third-party code, nothing loaded from elsewhere.
// Everything it shows comes from the OpenAI-compatible API of the server that serves it:
//   GET /v1/models (targets and pipeline steps), POST /v1/chat/completions with `stream: true` and
//   `moa: {events, call_deltas, trace}` (docs/API.md: progress events), POST /v1/playground/votes.
// Model output is only ever set as textContent, never parsed as HTML.

const $ = (selector) => document.querySelector(selector);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function show(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

// -- HTTP --------------------------------------------------------------------------------------------

const KEY_STORE = "moa-playground-key";
const STATUS_OF_TYPE = { invalid_request_error: 400, authentication_error: 401, not_found_error: 404,
  rate_limit_error: 429, server_error: 500, service_unavailable: 503, timeout: 504 };

class HTTPError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
  toString() {
    const hint = { 401: " — enter the server's API key at the top right", 429: " — wait and send again",
      503: " — the engines are not ready; the page retries /ready" }[this.status] || "";
    return `${this.status}: ${this.message}${hint}`;
  }
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorOf(response) {
  let message = response.statusText || "request failed";
  let code = null;
  try {
    const body = await response.json();
    message = body.error?.message ?? message;
    code = body.error?.code ?? null;
  } catch { /* not JSON: keep the status text */ }
  const retry = response.headers.get("Retry-After");
  const wait = retry && !/retry/i.test(message) ? ` (retry after ${retry} s)` : "";
  return new HTTPError(response.status, message + wait, code);
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

async function postJSON(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// POST a streamed chat completion; `onChunk` sees each parsed SSE chunk. An error event inside the stream
// (the server answered 200, then a step failed) is thrown as an HTTPError like a status before it.
async function streamChat(body, onChunk, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new HTTPError(502, "the stream ended without [DONE]", null);
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          throw new HTTPError(STATUS_OF_TYPE[chunk.error.type] || 500, chunk.error.message, chunk.error.code);
        }
        onChunk(chunk);
      }
    }
  }
}

// -- Targets and readiness ---------------------------------------------------------------------------

const targets = new Map(); // id -> /v1/models entry

function describeStep(step) {
  const models = step.models ? ` — ${step.models.join(", ")}` : "";
  const settings = Object.entries(step).filter(([k]) => k !== "step" && k !== "models")
    .map(([k, v]) => `${k} ${Array.isArray(v) ? v.join("/") : v}`).join(", ");
  return `${step.step}${models}${settings ? ` (${settings})` : ""}`;
}

function fillSelect(select, preferred) {
  const previous = select.value;
  select.replaceChildren();
  const groups = { pipeline: el("optgroup", { label: "Pipelines" }), model: el("optgroup", { label: "Models" }) };
  for (const [id, entry] of targets) {
    const kind = entry.moa?.kind === "pipeline" ? "pipeline" : "model";
    // A target that cannot answer now is greyed (the server answers it 503), with why.
    const why = entry.moa?.ready === false ? BLOCKED[entry.moa.blocked]?.(entry.moa) || "unavailable" : "";
    groups[kind].append(el("option", { value: id, textContent: why ? `${id} (${why})` : id, disabled: Boolean(why),
                                       title: why ? "the server answers it 503 until this changes" : "" }));
  }
  for (const group of Object.values(groups)) if (group.children.length) select.append(group);
  const usable = (v) => v && targets.has(v) && targets.get(v).moa?.ready !== false;
  // A choice the user made is kept; one the page made while the preferred target was greyed is not.
  const kept = select.dataset.chosen ? previous : null;
  const wanted = [kept, preferred].find(usable) || [...targets.keys()].find(usable) || preferred;
  if (wanted && targets.has(wanted)) select.value = wanted;
}

const BLOCKED = {
  model_loading: (moa) => `starting: ${(moa.waiting_for || []).join(", ")}`,
  engines_failed: () => "the engines failed to start",
  known_answer_failed: () => "refused: failed its known-answer check",
};

function showSteps() {
  const entry = targets.get($("#run-target").value);
  const steps = entry?.moa?.steps || [];
  $("#run-steps").replaceChildren(...steps.map((s) => el("li", { textContent: describeStep(s) })));
  $("#run-steps").title = entry?.moa?.description || "";
}

async function loadTargets() {
  try {
    const listing = await getJSON("/v1/models");
    targets.clear();
    for (const entry of listing.data) targets.set(entry.id, entry);
    const pipelines = [...targets.values()].filter((e) => e.moa?.kind === "pipeline").map((e) => e.id);
    const models = [...targets.values()].filter((e) => e.moa?.kind !== "pipeline").map((e) => e.id);
    fillSelect($("#run-target"), pipelines[0] || models[0]);
    fillSelect($("#cmp-1"), pipelines[0] || models[0]);
    fillSelect($("#cmp-2"), models[models.length - 1] || pipelines[1]);
    showSteps();
    show($("#page-error"), "");
  } catch (error) {
    show($("#page-error"), `Could not list the models: ${error}`);
    if (error.status === 401) $("#api-key").focus();
  }
}

let readyTimer = null;
let lastEngines = null; // /ready's per-engine states at the last poll: the targets are listed again when they change
async function pollReady() {
  clearTimeout(readyTimer);
  try {
    const response = await fetch("/ready");
    const greyed = [...targets.values()].some((e) => e.moa?.ready === false);
    if (response.ok) {
      show($("#banner"), "");
      if (greyed) loadTargets(); // the last engines came up: un-grey their targets
      return;
    }
    const body = await response.json().catch(() => ({}));
    const engines = JSON.stringify(body.engines || null);
    if (targets.size && engines !== lastEngines) loadTargets(); // an engine came up: its targets become usable
    lastEngines = engines;
    if (body.error?.code === "engines_failed") { // for good: no point asking again
      show($("#banner"), `Not serving: ${body.error.message}`);
      return;
    }
    show($("#banner"), `Not ready: ${body.error?.message || response.status}. Greyed targets answer 503 until their engines are up; checking again in 3 s.`);
  } catch {
    show($("#banner"), "The server does not answer; checking again in 3 s.");
  }
  readyTimer = setTimeout(pollReady, 3000);
}

// -- Figures -----------------------------------------------------------------------------------------

const seconds = (s) => (s === null || s === undefined ? "–" : `${s.toFixed(2)} s`);
const dollars = (d) => (d ? `$${d.toFixed(6)}` : "$0");

function callFigures(e) {
  return `${e.prompt_tokens} prompt (${e.cached_prompt_tokens} cached) · ${e.completion_tokens} completion tokens · ` +
    `TTFT ${seconds(e.ttft_s)} · ${seconds(e.seconds)} · ${dollars(e.cost_usd)}`;
}

// -- Run view ----------------------------------------------------------------------------------------

const conversation = [];
let running = null; // AbortController of the request in flight

class RunDisplay {
  constructor(isPipeline) {
    this.isPipeline = isPipeline;
    this.layers = $("#run-layers");
    this.layers.replaceChildren();
    this.row = null;
    this.calls = new Map(); // call id -> {node, samples: [{node, text, finished}]}
    this.answer = "";
    this.started = performance.now();
    this.firstToken = null;
    $("#run-answer").textContent = "";
    show($("#run-answer-note"), "");
    $("#run-summary").textContent = "";
    $("#run-moa").textContent = "";
    $("#run-answer-box").hidden = false;
  }

  onChunk(chunk) {
    for (const choice of chunk.choices || []) {
      const text = choice.delta?.content;
      if (text) {
        this.firstToken ??= performance.now();
        this.answer += text;
        $("#run-answer").textContent = this.answer;
      }
    }
    if (chunk.usage && !this.isPipeline) this.usage = chunk.usage;
    if (!chunk.moa) return;
    const handler = this[`on_${chunk.moa.event}`];
    if (handler) handler.call(this, chunk.moa);
    else if (!chunk.moa.event) this.onSummary(chunk.moa, chunk.usage);
  }

  on_layer_started(e) {
    const title = el("h3", {}, `Layer ${e.layer} · ${e.step}`);
    this.row = el("section", { class: "layer", "data-layer": e.layer, "data-step": e.step },
      title, el("ul", { class: "notes" }), el("div", { class: "calls" }));
    this.heading = title;
    this.layers.append(this.row);
  }

  on_call_started(e) {
    const samples = [];
    const box = el("div", { class: "samples" });
    for (let i = 0; i < e.n; i++) {
      const text = el("div", { class: "text" });
      const badge = el("span", { class: "badge", textContent: "running" });
      const label = e.n > 1 ? `${e.model} · sample ${i + 1}/${e.n}` : e.model;
      const node = el("div", { class: "sample", "data-call": e.call, "data-index": i, "data-status": "running" },
        el("h4", {}, el("span", { textContent: label }), badge), text);
      samples.push({ node, text, badge, content: "", finished: false });
      box.append(node);
    }
    const stats = el("p", { class: "stats", textContent: `${e.step} · waiting for the engine…` });
    const node = el("div", { class: "call", "data-call": e.call, "data-model": e.model, "data-status": "running" },
      box, stats);
    this.calls.set(e.call, { node, samples, stats });
    (this.row?.querySelector(".calls") || this.layers).append(node);
  }

  on_call_delta(e) {
    const sample = this.calls.get(e.call)?.samples[e.index];
    if (!sample) return;
    sample.content += e.text;
    sample.text.textContent = sample.content;
    if (e.finish_reason) {
      sample.finished = true;
      sample.badge.textContent = e.finish_reason === "length" ? "done (max tokens)" : "done";
    }
  }

  on_call_finished(e) {
    const call = this.calls.get(e.call);
    if (!call) return;
    const failed = ["error", "timeout", "skipped"].includes(e.status);
    call.node.dataset.status = failed ? "failed" : e.status;
    for (const [k, v] of Object.entries({ promptTokens: e.prompt_tokens, cachedTokens: e.cached_prompt_tokens,
      completionTokens: e.completion_tokens, ttft: e.ttft_s ?? "", seconds: e.seconds ?? "", cost: e.cost_usd })) {
      call.node.dataset[k] = v;
    }
    call.stats.textContent = callFigures(e);
    if (e.note) call.stats.title = e.note;
    for (const sample of call.samples) {
      let status = "ok";
      let label = sample.badge.textContent === "running" ? "ok" : sample.badge.textContent;
      if (failed) [status, label] = ["failed", e.status];
      else if (e.status === "aborted") [status, label] = ["aborted", "aborted"];
      else if (!sample.finished) [status, label] = ["aborted", "aborted by quorum"];
      sample.node.dataset.status = status;
      sample.badge.textContent = label;
    }
    if (e.error) call.node.append(el("p", { class: "failure", textContent: e.error }));
  }

  on_check(e) {
    // A check step ran this sample's code against the question's examples (in the server's sandbox).
    const sample = this.calls.get(e.call)?.samples[e.index];
    if (!sample) return;
    const passed = e.total > 0 && e.passed === e.total;
    sample.node.dataset.checks = `${e.passed}/${e.total}`;
    sample.node.dataset.checked = passed ? "passed" : "failed";
    sample.node.querySelector(".check")?.remove();
    sample.node.querySelector("h4").append(el("span", { class: "check",
      textContent: `${passed ? "✓" : "✗"} ${e.passed}/${e.total} examples`,
      title: "checked against the examples in the question, in the sandbox" }));
  }

  on_decision(e) {
    this.row?.querySelector(".notes").append(el("li", { textContent: e.text }));
    if (e.text.includes("previous responses kept")) {
      this.row.dataset.fallback = "true";
      this.heading.append(el("span", { class: "fallback", textContent: "fallback: the layer before it was kept" }));
    }
  }

  on_layer_finished(e) {
    this.heading?.append(el("span", { class: "stats",
      textContent: `${e.responses} response${e.responses === 1 ? "" : "s"} · ${seconds(e.seconds)}` }));
  }

  on_answer_restarted(e) {
    this.answer = "";
    $("#run-answer").textContent = "";
    show($("#run-answer-note"), `Fallback: the call writing the answer failed after ${e.discarded} characters ` +
      `(${e.reason}); the answer the fault rules kept follows.`);
  }

  onSummary(moa, usage) {
    const u = moa.trace?.usage || {};
    $("#run-summary").textContent = `${moa.engine_calls} engine call${moa.engine_calls === 1 ? "" : "s"} · ` +
      `${u.prompt_tokens ?? usage?.prompt_tokens} prompt (${u.cached_prompt_tokens ?? 0} cached) · ` +
      `${u.completion_tokens ?? usage?.completion_tokens} completion tokens · ${dollars(moa.cost_usd)} · ` +
      `${seconds(moa.total_s)}`;
    $("#run-moa").textContent = JSON.stringify(moa, null, 1);
  }

  finish() {
    if (this.isPipeline) return;
    const total = (performance.now() - this.started) / 1000;
    const ttft = this.firstToken ? (this.firstToken - this.started) / 1000 : null;
    const u = this.usage || {};
    $("#run-summary").textContent = `1 engine call · ${u.prompt_tokens ?? "–"} prompt ` +
      `(${u.prompt_tokens_details?.cached_tokens ?? 0} cached) · ${u.completion_tokens ?? "–"} completion tokens · ` +
      `TTFT ${seconds(ttft)} · ${seconds(total)} (measured in the page)`;
  }
}

function renderConversation() {
  $("#conversation").replaceChildren(...conversation.map((m) =>
    el("li", { "data-role": m.role, textContent: m.content })));
}

function setRunning(controller) {
  running = controller;
  $("#run-send").disabled = Boolean(controller);
  $("#run-stop").disabled = !controller;
}

async function sendRun(event) {
  event?.preventDefault();
  if (running) return;
  const prompt = $("#run-prompt").value.trim();
  const target = $("#run-target").value;
  if (!prompt || !target) return;
  const isPipeline = targets.get(target)?.moa?.kind === "pipeline";
  const system = $("#run-system").value.trim();
  conversation.push({ role: "user", content: prompt });
  renderConversation();
  $("#run-prompt").value = "";
  show($("#run-error"), "");
  let display = null; // made at the first chunk: a refused request leaves the previous run on screen
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation];
  const body = { model: target, messages, max_tokens: Number($("#run-max-tokens").value) || 256 };
  if (isPipeline) body.moa = { events: true, call_deltas: true, trace: true };
  const controller = new AbortController();
  setRunning(controller);
  document.body.dataset.run = "running";
  try {
    await streamChat(body, (chunk) => {
      display ??= new RunDisplay(isPipeline);
      display.onChunk(chunk);
    }, controller.signal);
    display ??= new RunDisplay(isPipeline);
    display.finish();
    conversation.push({ role: "assistant", content: display.answer });
    renderConversation();
    document.body.dataset.run = "done";
  } catch (error) {
    conversation.pop(); // the turn did not happen: its text goes back into the box
    renderConversation();
    $("#run-prompt").value = prompt;
    const stopped = error.name === "AbortError";
    show($("#run-error"), stopped ? "Stopped: the request was cancelled (the server aborts its engine work)."
      : `The request failed: ${error}`);
    document.body.dataset.run = "failed";
  } finally {
    setRunning(null);
  }
}

// -- Compare view ------------------------------------------------------------------------------------

let duel = null; // {messages, sides: {a: {target, answer, ...}, b: ...}}

function pane(side) {
  const node = $(`#pane-${side}`);
  return { node, title: node.querySelector("h2"), status: node.querySelector(".status"),
    text: node.querySelector(".text"), stats: node.querySelector(".stats") };
}

async function answerSide(side, entry, messages, maxTokens) {
  const view = pane(side);
  const started = performance.now();
  const result = { target: entry, id: null, answer: "", completion_tokens: null, seconds: null, ok: false };
  view.status.textContent = "answering…";
  try {
    // A pipeline's answer that breaks off restarts with its fallback only for a client that takes events
    // (a plain stream ends in an error instead): ask for them, so the duel still gets an answer to vote on.
    const body = { model: entry, messages, max_tokens: maxTokens };
    if (targets.get(entry)?.moa?.kind === "pipeline") body.moa = { events: true };
    await streamChat(body, (chunk) => {
      result.id = chunk.id || result.id; // what the vote names: the server records the answer it sent
      for (const choice of chunk.choices || []) {
        if (choice.delta?.content) {
          result.answer += choice.delta.content;
          view.text.textContent = result.answer;
        }
      }
      if (chunk.moa?.event === "answer_restarted") {
        result.answer = "";
        view.text.textContent = "";
      }
      if (chunk.usage) result.completion_tokens = chunk.usage.completion_tokens;
    });
    result.seconds = (performance.now() - started) / 1000;
    result.ok = true;
    view.status.textContent = "done";
  } catch (error) {
    view.status.textContent = `failed — ${error}`;
    result.error = String(error);
  }
  view.node.dataset.state = result.ok ? "done" : "failed";
  return result;
}

async function sendCompare(event) {
  event?.preventDefault();
  const prompt = $("#cmp-prompt").value.trim();
  const first = $("#cmp-1").value;
  const second = $("#cmp-2").value;
  if (!prompt || !first || !second || $("#cmp-send").disabled) return;
  const order = Math.random() < 0.5 ? [first, second] : [second, first];
  const messages = [{ role: "user", content: prompt }];
  const maxTokens = Number($("#cmp-max-tokens").value) || 256;
  for (const side of ["a", "b"]) {
    const view = pane(side);
    view.title.textContent = `Assistant ${side.toUpperCase()}`;
    view.text.textContent = "";
    view.stats.textContent = "";
    delete view.node.dataset.target;
  }
  show($("#cmp-error"), "");
  $("#vote-result").textContent = "";
  $("#vote").hidden = true;
  $("#cmp-send").disabled = true;
  document.body.dataset.compare = "running";
  const [a, b] = await Promise.all([answerSide("a", order[0], messages, maxTokens),
    answerSide("b", order[1], messages, maxTokens)]);
  $("#cmp-send").disabled = false;
  duel = { messages, sides: { a, b } };
  if (a.ok && b.ok) {
    $("#vote").hidden = false;
    $("#vote button").focus();
    document.body.dataset.compare = "voting";
  } else {
    show($("#cmp-error"), "One side failed, so there is nothing to vote on; the names are shown below.");
    reveal();
    document.body.dataset.compare = "failed";
  }
}

function reveal() {
  for (const side of ["a", "b"]) {
    const view = pane(side);
    const result = duel.sides[side];
    view.title.textContent = `Assistant ${side.toUpperCase()}: ${result.target}`;
    view.node.dataset.target = result.target;
    if (result.ok) {
      view.stats.textContent = `${result.completion_tokens ?? "–"} completion tokens · ${seconds(result.seconds)}`;
    }
  }
}

async function vote(verdict) {
  if (!duel) return;
  $("#vote").hidden = true;
  try {
    const recorded = await postJSON("/v1/playground/votes", { a: { id: duel.sides.a.id }, b: { id: duel.sides.b.id },
      verdict });
    $("#vote-result").textContent = `Vote recorded (${recorded.winner ? `${recorded.winner} preferred` : verdict.replace("_", " ")}).`;
    document.body.dataset.compare = "voted";
  } catch (error) {
    $("#vote-result").textContent = error.code === "votes_off" ? `Not recorded: ${error.message}` : "";
    if (error.code !== "votes_off") show($("#cmp-error"), `The vote was not recorded: ${error}`);
    document.body.dataset.compare = "vote-failed";
  }
  reveal();
  duel = null;
}

// -- Wiring ------------------------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of ["run", "compare"]) {
    const selected = tab === name;
    $(`#tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`#tab-${tab}`).tabIndex = selected ? 0 : -1;
    $(`#view-${tab}`).hidden = !selected;
  }
  $(`#tab-${name}`).focus();
}

function sendOnCtrlEnter(textarea, send) {
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) send(event);
  });
}

function init() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    loadTargets();
  });
  $("#tab-run").addEventListener("click", () => selectTab("run"));
  $("#tab-compare").addEventListener("click", () => selectTab("compare"));
  $("nav").addEventListener("keydown", (event) => {
    if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      selectTab($("#tab-run").getAttribute("aria-selected") === "true" ? "compare" : "run");
    }
  });
  $("#run-target").addEventListener("change", showSteps);
  for (const id of ["#run-target", "#cmp-1", "#cmp-2"]) {
    $(id).addEventListener("change", (event) => { event.target.dataset.chosen = "true"; });
  }
  $("#run-form").addEventListener("submit", sendRun);
  sendOnCtrlEnter($("#run-prompt"), sendRun);
  $("#run-stop").addEventListener("click", () => running?.abort());
  $("#run-new").addEventListener("click", () => {
    running?.abort();
    conversation.length = 0;
    renderConversation();
    $("#run-layers").replaceChildren();
    $("#run-answer-box").hidden = true;
    show($("#run-error"), "");
    $("#run-prompt").focus();
  });
  $("#cmp-form").addEventListener("submit", sendCompare);
  sendOnCtrlEnter($("#cmp-prompt"), sendCompare);
  for (const button of document.querySelectorAll("#vote button")) {
    button.addEventListener("click", () => vote(button.dataset.verdict));
  }
  pollReady();
  loadTargets().then(() => { document.body.dataset.loaded = "true"; });
}

init();
