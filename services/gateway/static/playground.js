// The InternLM2 playground: plain browser JavaScript against the gateway's own HTTP API
// (/v1/chat/completions, /score, /v1/internlm2/jobs). No build step, no third-party code.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#2f6fde", "#d64545", "#1f9d55", "#c98a04", "#8e44ad", "#16a2b8"];
const state = {
  messages: [],          // the chat history as sent to the API (user / assistant turns)
  controller: null,      // AbortController of the answer being streamed
  jobId: null,           // the job shown in the detail pane
  jobStream: null,       // AbortController of its event stream
  series: {},            // metric name -> stage -> [[step, value], ...]
};

// ---------------------------------------------------------------- HTTP helpers

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function errorText(status, body) {
  const e = (body && body.error) || {};
  const param = e.param ? ` (${e.param})` : "";
  return `${status} ${e.type || "error"}${param}: ${e.message || "request failed"}`;
}

async function api(path, body, signal) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(errorText(response.status, data));
  }
  return response;
}

// Server-sent events from a fetch() response (EventSource cannot send the Authorization header).
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new Error(errorText("stream", parsed));
        yield parsed;
      }
    }
  }
}

function setStatus(text, bad = false) {
  $("status").textContent = text;
  $("status").className = "status" + (bad ? " bad" : "");
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- tabs and settings

document.querySelectorAll(".tab").forEach((button) => {
  button.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b === button));
    document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === "tab-" + button.dataset.tab));
    if (button.dataset.tab === "jobs") loadJobs();
  });
});

$("api-key").value = localStorage.getItem("internlm2-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("internlm2-api-key", $("api-key").value.trim());
  loadModels();
});
$("use-tools").addEventListener("change", () => { $("tools").hidden = !$("use-tools").checked; });
$("response-format").addEventListener("change", () => { $("schema").hidden = $("response-format").value !== "json_schema"; });

async function loadModels() {
  try {
    const data = await (await api("/v1/models")).json();
    const select = $("model");
    select.innerHTML = "";
    for (const m of data.data.filter((m) => m.task !== "reward")) select.append(new Option(m.id, m.id));
    setStatus(`${data.data.length} model(s)`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

// ---------------------------------------------------------------- chat

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function chatBody() {
  const body = {
    model: $("model").value,
    messages: [],
    temperature: number("temperature"),
    top_p: number("top_p"),
    max_tokens: number("max_tokens"),
    seed: number("seed"),
    stream: $("stream").checked,
  };
  const system = $("system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  body.messages.push(...state.messages);
  const stops = $("stop-strings").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stops.length) body.stop = stops;
  if (body.stream) body.stream_options = { include_usage: true };
  if ($("use-tools").checked) body.tools = JSON.parse($("tools").value);
  const format = $("response-format").value;
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") {
    body.response_format = { type: "json_schema", json_schema: { name: "output", schema: JSON.parse($("schema").value) } };
  }
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

function addBubble(role, text) {
  const bubble = el("div", "msg " + role);
  bubble.append(el("span", "role", role));
  const content = el("span", "content", text);
  bubble.append(content);
  $("transcript").append(bubble);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return { bubble, content };
}

function showToolCalls(bubble, calls) {
  for (const call of calls) {
    let args = call.function.arguments;
    try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (e) { /* shown as sent */ }
    bubble.append(el("div", "tool-call", `tool call ${call.id || ""}: ${call.function.name}(${args})`));
  }
}

function showJson(bubble, text) {
  const box = el("div", "json-output");
  try {
    box.textContent = "JSON output ✓\n" + JSON.stringify(JSON.parse(text), null, 2);
  } catch (e) {
    box.textContent = "not valid JSON: " + e.message;
    box.classList.add("invalid");
  }
  bubble.append(box);
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  state.messages.push({ role: "user", content: text });
  addBubble("user", text);
  const body = chatBody();
  const { bubble, content } = addBubble("assistant", "");
  bubble.classList.add("pending");
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let answer = "";
  let calls = [];
  let finish = "";
  let usage = null;
  try {
    const response = await api("/v1/chat/completions", body, state.controller.signal);
    if (body.stream) {
      for await (const chunk of events(response)) {
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.index !== 0) continue;
          const delta = choice.delta || {};
          if (delta.content) { answer += delta.content; content.textContent = answer; }
          if (delta.tool_calls) calls = calls.concat(delta.tool_calls);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        $("transcript").scrollTop = $("transcript").scrollHeight;
      }
    } else {
      const data = await response.json();
      const choice = data.choices[0];
      answer = choice.message.content || "";
      calls = choice.message.tool_calls || [];
      finish = choice.finish_reason;
      usage = data.usage;
      content.textContent = answer;
    }
    if (calls.length) showToolCalls(bubble, calls);
    if (body.response_format) showJson(bubble, answer);
    bubble.append(el("span", "meta", `finish: ${finish}` + (usage ? ` · ${usage.completion_tokens} tokens` : "")));
    if (usage) $("usage").textContent = `prompt ${usage.prompt_tokens} · completion ${usage.completion_tokens} tokens`;
    const turn = { role: "assistant", content: answer };
    if (calls.length) turn.tool_calls = calls.map(({ id, type, function: f }) => ({ id, type, function: f }));
    state.messages.push(turn);
  } catch (e) {
    if (e.name === "AbortError") {
      bubble.append(el("span", "meta", "stopped"));
      state.messages.push({ role: "assistant", content: answer });
    } else {
      bubble.classList.add("error");
      content.textContent = e.message;
      state.messages.pop();  // the user turn was not answered
    }
  } finally {
    bubble.classList.remove("pending");
    bubble.classList.add("done");
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("chat-form").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => { state.messages = []; $("transcript").innerHTML = ""; });

// ---------------------------------------------------------------- reward

$("score").addEventListener("click", async () => {
  const answers = $("reward-answers").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const body = { text_1: $("reward-prompt").value, text_2: answers };
  const condition = $("reward-condition").value.trim();
  if (condition) body.condition = condition;
  const tbody = $("ranking").querySelector("tbody");
  tbody.innerHTML = "";
  try {
    const data = await (await api("/score", body)).json();
    const scores = data.data.map((d) => d.score);
    const lo = Math.min(...scores), hi = Math.max(...scores);
    data.ranking.forEach((index, rank) => {
      const row = el("tr");
      row.append(el("td", "", String(rank + 1)), el("td", "", answers[index]), el("td", "score", scores[index].toFixed(4)));
      const bar = el("div", "bar");
      const fill = el("span");
      fill.style.width = (hi > lo ? 10 + 90 * (scores[index] - lo) / (hi - lo) : 100) + "%";
      bar.append(fill);
      const cell = el("td");
      cell.append(bar);
      row.append(cell);
      tbody.append(row);
    });
  } catch (e) {
    const row = el("tr");
    const cell = el("td", "error", e.message);
    cell.colSpan = 4;
    row.append(cell);
    tbody.append(row);
  }
});

// ---------------------------------------------------------------- jobs

function progressBar(fraction) {
  const bar = el("div", "bar");
  const fill = el("span");
  fill.style.width = Math.round(100 * (fraction || 0)) + "%";
  bar.append(fill);
  return bar;
}

async function loadJobs() {
  const tbody = $("jobs-table").querySelector("tbody");
  try {
    const data = await (await api("/v1/internlm2/jobs?page_size=50")).json();
    tbody.innerHTML = "";
    for (const job of data.data) {
      const row = el("tr", "selectable" + (job.job_id === state.jobId ? " selected" : ""));
      row.dataset.jobId = job.job_id;
      const cell = el("td");
      cell.append(progressBar(job.progress));
      row.append(el("td", "", job.job_id.slice(0, 12)), el("td", "", job.name || "—"),
                 (() => { const td = el("td"); td.append(el("span", "state " + job.state, job.state)); return td; })(), cell);
      row.addEventListener("click", () => selectJob(job.job_id));
      tbody.append(row);
    }
    if (!data.data.length) {
      const row = el("tr");
      const td = el("td", "", "no jobs yet: submit one with `internlm2 train submit`");
      td.colSpan = 4;
      row.append(td);
      tbody.append(row);
    }
  } catch (e) {
    tbody.innerHTML = "";
    const row = el("tr");
    const td = el("td", "error", e.message);
    td.colSpan = 4;
    row.append(td);
    tbody.append(row);
  }
}

function renderStages(job) {
  $("job-title").textContent = `${job.name || job.job_id} — ${job.state}`;
  const box = $("job-stages");
  box.innerHTML = "";
  for (const stage of job.stages) {
    const row = el("div", "stage");
    row.dataset.stage = stage.name;
    row.append(el("span", "", `${stage.name} (${stage.stage})`), el("span", "state " + stage.state, stage.state),
               progressBar(stage.progress), el("span", "pct", Math.round(100 * stage.progress) + "%"));
    box.append(row);
  }
}

async function refreshJob() {
  if (!state.jobId) return;
  try {
    renderStages(await (await api(`/v1/internlm2/jobs/${encodeURIComponent(state.jobId)}`)).json());
  } catch (e) {
    $("job-title").textContent = e.message;
  }
}

async function selectJob(jobId) {
  if (state.jobStream) state.jobStream.abort();
  state.jobId = jobId;
  state.series = {};
  $("job-log").textContent = "";
  $("job-detail").hidden = false;
  document.querySelectorAll("#jobs-table tr").forEach((r) => r.classList.toggle("selected", r.dataset.jobId === jobId));
  await refreshJob();
  drawCurve();
  const controller = new AbortController();
  state.jobStream = controller;
  try {
    const response = await api(`/v1/internlm2/jobs/${encodeURIComponent(jobId)}/events`, undefined, controller.signal);
    for await (const event of events(response)) {
      if (event.metrics) {
        for (const [name, value] of Object.entries(event.metrics.values || {})) {
          const byStage = (state.series[name] = state.series[name] || {});
          (byStage[event.stage] = byStage[event.stage] || []).push([Number(event.metrics.step), value]);
        }
        drawCurve();
      } else if (event.log) {
        $("job-log").textContent += `[${event.stage || "job"}] ${event.log.level} ${event.log.message}\n`;
      } else if (event.progress || event.state_changed) {
        refreshJob();
        if (event.state_changed) loadJobs();
      }
    }
    await refreshJob();
  } catch (e) {
    if (e.name !== "AbortError") $("job-log").textContent += e.message + "\n";
  }
}

function drawCurve() {
  const select = $("metric");
  const names = Object.keys(state.series).sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)));
  const current = select.value;
  select.innerHTML = "";
  for (const name of names) select.append(new Option(name, name));
  if (names.includes(current)) select.value = current;
  const name = select.value;
  const box = $("curve");
  if (!name) { box.textContent = "no metrics reported yet"; return; }
  const series = state.series[name];
  const points = Object.values(series).flat();
  const steps = points.map((p) => p[0]), values = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  const [y0, y1] = [Math.min(...values), Math.max(...values)];
  const W = 640, H = 260, L = 56, R = 12, T = 14, B = 30;
  const sx = (x) => L + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (W - L - R);
  const sy = (y) => T + (y1 > y0 ? (y1 - y) / (y1 - y0) : 0.5) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.dataset.metric = name;
  const line = (a, b, c, d) => {
    const l = document.createElementNS(ns, "line");
    Object.entries({ x1: a, y1: b, x2: c, y2: d, class: "axis" }).forEach(([k, v]) => l.setAttribute(k, v));
    svg.append(l);
  };
  const label = (x, y, text, anchor = "start") => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor);
    t.textContent = text;
    svg.append(t);
  };
  line(L, H - B, W - R, H - B);
  line(L, T, L, H - B);
  label(L - 4, T + 4, y1.toPrecision(4), "end");
  label(L - 4, H - B, y0.toPrecision(4), "end");
  label(L, H - 10, `step ${x0}`);
  label(W - R, H - 10, `step ${x1}`, "end");
  Object.entries(series).forEach(([stage, pts], i) => {
    const poly = document.createElementNS(ns, "polyline");
    poly.setAttribute("class", "line");
    poly.setAttribute("stroke", COLORS[i % COLORS.length]);
    poly.setAttribute("points", pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "));
    poly.dataset.stage = stage;
    poly.dataset.steps = pts.map((p) => p[0]).join(",");
    poly.dataset.values = pts.map((p) => p[1]).join(",");
    svg.append(poly);
    const last = pts[pts.length - 1];
    label(W - R - 4, T + 14 + 14 * i, `${stage || "job"} ${name} ${last[1].toPrecision(4)} @ ${last[0]}`, "end");
  });
  box.innerHTML = "";
  box.append(svg);
}

$("metric").addEventListener("change", drawCurve);
$("refresh-jobs").addEventListener("click", loadJobs);
setInterval(() => { if ($("tab-jobs").classList.contains("active")) loadJobs(); }, 3000);

loadModels();
