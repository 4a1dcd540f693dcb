// lorakit serve's page: the playground (every chosen model answers the same prompt, streaming, side by
// side) and the compare view (base and adapters on a data file, measured as `lorakit eval` measures).
//
// Plain JavaScript, no build step, no third-party code. It talks only to this server's API:
//   GET  /v1/models                       the base and every adapter (hot-loaded ones included)
//   POST /v1/chat/completions | /v1/completions   stream: true, one request per model, sent at once
//   GET  /v1/lorakit/data_files, POST /v1/lorakit/compare   the compare view
// With an API key the page asks for it and keeps it in this tab only (sessionStorage).
// Text from models and files is always set as textContent; only the server's own report HTML
// (escaped on the server) is inserted as markup.
"use strict";

const COLORS = ["#64748b", "#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#dc2626"];
const KEY_STORE = "lorakit.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  models: [],          // [{id, parent}] as /v1/models lists them
  chosen: new Set(),   // model ids ticked in the list
  mode: "chat",        // "chat" | "text"
  histories: {},       // model id -> chat messages of that model's conversation
  cards: {},           // model id -> card elements
  running: null,       // AbortController of the requests in flight
  compare: null,       // AbortController of the comparison in flight
  dataFiles: null,     // /v1/lorakit/data_files answer
};

// -- the API ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
  } catch (err) { /* not JSON: use the text */ }
  return text || `HTTP ${response.status}`;
}

// Server-sent events of a fetch response: calls onData with each parsed `data:` payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

function failed(err) {
  if (err instanceof ApiError && err.status === 401) askForKey(err.message);
}

// -- connection, key and models --------------------------------------------------------------------

function setStatus(ok, text) {
  $("status-dot").className = "dot " + (ok ? "ok" : "bad");
  $("status-text").textContent = text;
}

async function connect() {
  try {
    const body = await (await api("v1/models")).json();
    state.models = body.data.map((m) => ({ id: m.id, parent: m.parent, context: m.max_model_len }));
    const base = state.models.find((m) => !m.parent);
    const adapters = state.models.length - 1;
    setStatus(true, `${base ? base.id : "?"} · ${adapters} adapter${adapters === 1 ? "" : "s"}`);
    $("key-button").hidden = !apiKey();
    if (state.chosen.size === 0) state.models.forEach((m) => state.chosen.add(m.id));
    for (const id of [...state.chosen]) if (!state.models.some((m) => m.id === id)) state.chosen.delete(id);
    renderModels();
    return true;
  } catch (err) {
    setStatus(false, err instanceof ApiError && err.status === 401 ? "API key needed" : "not connected: " + err.message);
    failed(err);
    return false;
  }
}

function askForKey(message) {
  const dialog = $("key-dialog");
  $("key-message").textContent = message || "";
  $("key-input").value = "";
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

async function saveKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
  $("key-dialog").close();
  if (await connect()) loadDataFiles();
}

function colorOf(id) {
  const i = state.models.findIndex((m) => m.id === id);
  return COLORS[(i < 0 ? 0 : i) % COLORS.length];
}

function renderModels() {
  const list = $("model-list");
  list.replaceChildren();
  for (const model of state.models) {
    const item = document.createElement("li");
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = model.id;
    box.checked = state.chosen.has(model.id);
    box.addEventListener("change", () => {
      if (box.checked) state.chosen.add(model.id); else state.chosen.delete(model.id);
      renderCards();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colorOf(model.id);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = model.id;
    name.title = model.id + (model.context ? ` · context ${model.context} tokens` : "");
    const badge = document.createElement("span");
    badge.className = "badge" + (model.parent ? "" : " base");
    badge.textContent = model.parent ? "adapter" : "base";
    label.append(box, swatch, name, badge);
    item.append(label);
    list.append(item);
  }
  renderCards();
}

function chosenModels() { return state.models.filter((m) => state.chosen.has(m.id)).map((m) => m.id); }

// -- the playground --------------------------------------------------------------------------------

function card(id) {
  if (state.cards[id]) return state.cards[id];
  const root = document.createElement("article");
  root.className = "card answer-card";
  root.dataset.model = id;
  root.dataset.state = "idle";
  const head = document.createElement("div");
  head.className = "answer-head";
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.style.background = colorOf(id);
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = id;
  const badge = document.createElement("span");
  const model = state.models.find((m) => m.id === id);
  badge.className = "badge" + (model && model.parent ? "" : " base");
  badge.textContent = model && model.parent ? "adapter" : "base";
  head.append(swatch, name, badge);
  const body = document.createElement("div");
  body.className = "answer-body";
  const foot = document.createElement("div");
  foot.className = "answer-foot";
  root.append(head, body, foot);
  state.cards[id] = { root, body, foot };
  return state.cards[id];
}

function renderCards() {
  const area = $("answers");
  const ids = chosenModels();
  for (const [id, c] of Object.entries(state.cards)) if (!ids.includes(id)) c.root.remove();
  ids.forEach((id) => area.append(card(id).root));
  $("answers-empty").hidden = Object.values(state.cards).some((c) => c.root.isConnected && c.body.childElementCount);
}

function addTurn(c, role, text) {
  const turn = document.createElement("div");
  turn.className = "turn " + role;
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  turn.append(span);
  c.body.append(turn);
  c.body.scrollTop = c.body.scrollHeight;
  return span;
}

function setFoot(c, parts) {
  c.foot.replaceChildren();
  for (const [label, value, cls] of parts) {
    const item = document.createElement("span");
    if (cls) {
      item.className = "finish " + cls;
      item.textContent = value;
    } else {
      const b = document.createElement("b");
      b.textContent = value;
      item.append(b, " " + label);
    }
    c.foot.append(item);
  }
}

function newChat() {
  if (state.running) return;
  state.histories = {};
  for (const c of Object.values(state.cards)) {
    c.body.replaceChildren();
    c.foot.replaceChildren();
    c.root.dataset.state = "idle";
  }
  renderCards();
}

async function send(event) {
  if (event) event.preventDefault();
  const prompt = $("prompt").value;
  const ids = chosenModels();
  if (!prompt.trim() || !ids.length || state.running) return;
  const controller = new AbortController();
  state.running = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  $("prompt").value = "";
  const settings = {
    temperature: parseFloat($("temperature").value),
    max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 256),
  };
  const system = $("system").value.trim();
  // One request per model, all sent before any is awaited: the engine admits them together.
  const jobs = ids.map((id) => {
    const c = card(id);
    let path, body;
    if (state.mode === "chat") {
      const history = state.histories[id] || (state.histories[id] = []);
      history.push({ role: "user", content: prompt });
      const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
      path = "v1/chat/completions";
      body = Object.assign({ model: id, messages }, settings);
      addTurn(c, "user", prompt);
    } else {
      c.body.replaceChildren();
      path = "v1/completions";
      body = Object.assign({ model: id, prompt }, settings);
      addTurn(c, "prompt", prompt);
    }
    body.stream = true;
    body.stream_options = { include_usage: true };
    return stream(c, id, path, body, controller.signal);
  });
  renderCards();
  await Promise.allSettled(jobs);
  state.running = null;
  $("send").disabled = false;
  $("stop").disabled = true;
  $("prompt").focus();
}

async function stream(c, id, path, body, signal) {
  const chat = path.endsWith("chat/completions");
  const out = addTurn(c, "assistant", "");
  const turn = out.parentElement;
  c.root.dataset.state = "streaming";
  c.root.dataset.finish = "";
  setFoot(c, [["", "streaming…", "pending"]]);
  const started = performance.now();
  let first = null, text = "", tokens = 0, usage = null, finish = null;
  try {
    const response = await api(path, { method: "POST", body: JSON.stringify(body), signal });
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new ApiError(chunk.error.code === "model_not_found" ? 404 : 500, chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      const piece = chat ? choice.delta && choice.delta.content : choice.text;
      if (piece) {
        if (first === null) first = performance.now();
        text += piece;
        tokens += 1;
        out.textContent = text;
        c.body.scrollTop = c.body.scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    if (chat) state.histories[id].push({ role: "assistant", content: text });
    const ended = performance.now();
    const n = usage ? usage.completion_tokens : tokens;
    const rate = first !== null && n > 1 && ended > first ? (n - 1) / ((ended - first) / 1000) : null;
    c.root.dataset.state = "done";
    c.root.dataset.finish = finish || "";
    c.root.dataset.tokens = String(n);
    setFoot(c, [
      ["tokens", String(n)],
      ["tok/s", rate === null ? "–" : rate.toFixed(1)],
      ["s to first token", first === null ? "–" : ((first - started) / 1000).toFixed(2)],
      ["", finish || "?", finish || "error"],
    ]);
  } catch (err) {
    if (chat) state.histories[id].pop();  // the question stays on screen, not in the history
    const aborted = err.name === "AbortError";
    c.root.dataset.state = aborted ? "cancelled" : "error";
    c.root.dataset.finish = aborted ? "cancelled" : "error";
    if (!aborted) {
      const message = document.createElement("span");
      message.className = "error-text";
      message.textContent = (text ? "\n" : "") + err.message;
      turn.append(message);
      failed(err);
    }
    setFoot(c, [["", aborted ? "stopped" : "error", aborted ? "cancelled" : "error"]]);
  }
}

function stop() {
  if (state.running) state.running.abort();
}

function setMode(mode) {
  state.mode = mode;
  for (const b of document.querySelectorAll("#mode button")) b.classList.toggle("on", b.dataset.mode === mode);
  $("system-field").hidden = mode !== "chat";
  $("composer-hint").textContent = mode === "chat"
    ? "Chat: the model's chat template is applied, as /v1/chat/completions does."
    : "Text completion: the prompt is sent as it is to /v1/completions, and the models continue it.";
  newChat();
}

// -- the compare view ------------------------------------------------------------------------------

async function loadDataFiles() {
  try {
    state.dataFiles = await (await api("v1/lorakit/data_files")).json();
  } catch (err) {
    failed(err);
    return;
  }
  const info = state.dataFiles;
  const select = $("server-file");
  select.replaceChildren();
  for (const file of info.data) {
    const option = document.createElement("option");
    option.value = JSON.stringify({ root: file.root, path: file.path });
    option.textContent = `${file.root}: ${file.path}  (${formatBytes(file.bytes)})`;
    select.append(option);
  }
  const none = info.roots.length === 0;
  $("server-source").classList.toggle("disabled", none || !info.data.length);
  $("server-source").querySelector("input").disabled = none || !info.data.length;
  select.disabled = none || !info.data.length;
  $("server-hint").textContent = none ? "start the server with --data-root DIR to pick files here"
    : info.data.length ? `${info.data.length} file${info.data.length === 1 ? "" : "s"} under ${info.roots.map((r) => "--" + r + "-root").join(" and ")}`
      : "no data files under " + info.roots.map((r) => "--" + r + "-root").join(" and ");
  $("upload-hint").textContent = `${info.upload_suffixes.join(", ")} in any format lorakit eval reads, up to ${formatBytes(info.max_upload_bytes)}`;
}

function formatBytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
  return (n / 1024 / 1024).toFixed(1) + " MB";
}

function compareError(message) {
  $("compare-error").textContent = message;
  $("compare-error").hidden = !message;
}

async function runCompare() {
  compareError("");
  const models = chosenModels();
  if (!models.length) return compareError("Choose at least one model on the left.");
  const body = { models };
  const limit = parseInt($("limit").value, 10);
  const budget = parseInt($("compare-max-tokens").value, 10);
  if (limit > 0) body.limit = limit;
  if (budget > 0) body.max_new_tokens = budget;
  const source = document.querySelector("input[name=source]:checked").value;
  if (source === "upload") {
    const file = $("upload").files[0];
    if (!file) return compareError("Choose a file to upload, or a file on the server.");
    const max = state.dataFiles ? state.dataFiles.max_upload_bytes : Infinity;
    if (file.size > max) {
      return compareError(`${file.name} is ${formatBytes(file.size)}; this server takes files up to ${formatBytes(max)} (--max-body-bytes).`);
    }
    body.upload = { name: file.name, content: await file.text() };
  } else {
    if (!$("server-file").value) return compareError("This server lists no data files.");
    body.file = JSON.parse($("server-file").value);
  }
  const controller = new AbortController();
  state.compare = controller;
  $("run-compare").disabled = true;
  $("cancel-compare").hidden = false;
  $("compare-progress").hidden = false;
  showProgress(0, 0);
  try {
    const response = await api("v1/lorakit/compare", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    await readEvents(response, (event) => {
      if (event.error) throw new ApiError(500, event.error.message);
      if (event.object === "lorakit.compare.progress") showProgress(event.done, event.total);
      if (event.object === "lorakit.compare.report") {
        $("compare-result").innerHTML = event.html;  // the server's escaped report (lorakit.evaluate.html)
      }
    });
  } catch (err) {
    if (err.name !== "AbortError") {
      compareError(err.message);
      failed(err);
    }
  } finally {
    state.compare = null;
    $("run-compare").disabled = false;
    $("cancel-compare").hidden = true;
    $("compare-progress").hidden = true;
  }
}

function showProgress(done, total) {
  $("compare-bar").style.width = total ? (100 * done / total).toFixed(1) + "%" : "0";
  $("compare-progress-text").textContent = total ? `${done} / ${total} answers and rows` : "reading the file…";
}

function showView(view) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("on", tab.dataset.view === view);
  $("view-play").hidden = view !== "play";
  $("view-compare").hidden = view !== "compare";
  $("play-settings").hidden = view !== "play";
  $("compare-settings").hidden = view !== "compare";
  if (view === "compare" && !state.dataFiles) loadDataFiles();
}

// -- wiring ----------------------------------------------------------------------------------------

function init() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  for (const b of document.querySelectorAll("#mode button")) b.addEventListener("click", () => setMode(b.dataset.mode));
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
  $("refresh-models").addEventListener("click", connect);
  $("key-form").addEventListener("submit", saveKey);
  $("key-button").addEventListener("click", () => askForKey(""));
  $("run-compare").addEventListener("click", runCompare);
  $("cancel-compare").addEventListener("click", () => state.compare && state.compare.abort());
  window.addEventListener("focus", () => { if (!state.running) connect(); });
  connect();
}

document.addEventListener("DOMContentLoaded", init);
