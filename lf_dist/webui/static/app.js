// lf-dist web UI: the forms are built from /api/info (the config schema's fields), everything else is JSON routes.
"use strict";
const $ = (id) => document.getElementById(id);
let INFO = null;
const loaded = { t: new Set(), c: new Set(), g: new Set(), e: new Set() }; // keys a loaded YAML set: written back even at defaults
let extra = {}; // the loaded YAML's other keys, written back unchanged
let planned = null; // the form the last fitting plan was made for
let current = null; // the run the run view follows
let chatHistory = [];

async function api(method, path, body) {
  const init = { method, headers: { "content-type": "application/json" } };
  if (body !== undefined) init.body = JSON.stringify(body);
  const res = await fetch(path, init);
  const data = await res.json();
  if (!res.ok) throw new Error(data.error && data.error.message ? data.error.message : data.error || res.statusText);
  return data;
}

function show(id, text) { $(id).textContent = text || ""; }

function makeField(prefix, key) {
  const spec = INFO.fields[key];
  const label = document.createElement("label");
  let input;
  if (spec.choices || (spec.kind === "bool" && spec.default === null)) {
    input = document.createElement("select");
    const options = spec.choices ? spec.choices : ["", "true", "false"];
    for (const v of options) {
      const o = document.createElement("option");
      o.value = v; o.textContent = v === "" ? "(default)" : v;
      input.appendChild(o);
    }
    if (spec.kind === "text" && spec.choices && spec.default !== null) input.value = spec.default;
  } else if (spec.kind === "bool") {
    input = document.createElement("input"); input.type = "checkbox"; input.checked = !!spec.default;
    label.className = "check";
  } else {
    input = document.createElement("input");
    input.type = spec.kind === "text" ? "text" : "number";
    if (spec.kind === "float") input.step = "any";
    if (spec.default !== null) input.placeholder = String(spec.default);
  }
  input.id = `${prefix}-${key}`; input.dataset.key = key;
  input.addEventListener("change", () => { if (prefix === "t") formChanged(); });
  label.append(key, input);
  return label;
}

function buildFields(prefix, container, keys) {
  for (const key of keys) container.appendChild(makeField(prefix, key));
}

function readForm(prefix, keys) {
  const form = {};
  for (const key of keys) {
    const input = $(`${prefix}-${key}`); const spec = INFO.fields[key];
    if (!input) continue;
    if (input.type === "checkbox") {
      if (input.checked !== !!spec.default || loaded[prefix].has(key)) form[key] = input.checked;
    } else if (input.value !== "") {
      const v = input.value;
      if (spec.kind === "int") form[key] = parseInt(v, 10);
      else if (spec.kind === "float") form[key] = parseFloat(v);
      else if (spec.kind === "bool") form[key] = v === "true";
      else if (spec.choices && v === spec.default && !loaded[prefix].has(key)) continue;
      else form[key] = v;
    }
  }
  return form;
}

function resetForm(prefix, keys) {
  loaded[prefix].clear();
  for (const key of keys) {
    const input = $(`${prefix}-${key}`); const spec = INFO.fields[key];
    if (!input) continue;
    if (input.type === "checkbox") input.checked = !!spec.default;
    else input.value = spec.choices && spec.kind === "text" && spec.default !== null ? spec.default : "";
  }
}

function fillForm(prefix, form) {
  for (const [key, value] of Object.entries(form)) {
    const input = $(`${prefix}-${key}`);
    if (!input) continue;
    if (value === null || value === undefined) { if (input.type !== "checkbox") input.value = ""; continue; }
    loaded[prefix].add(key);
    const text = Array.isArray(value) ? value.join(",") : String(value);
    if (input.tagName === "SELECT" && ![...input.options].some((o) => o.value === text)) {
      const o = document.createElement("option"); o.value = o.textContent = text; input.appendChild(o); // kept as given
    }
    if (input.type === "checkbox") input.checked = value === true || value === "true";
    else input.value = text;
  }
}

// ---- Train page
const TRAIN_SECTIONS = ["model", "method", "dataset", "output", "train", "parallel"];
function trainKeys() {
  return INFO.sections.filter(([name]) => TRAIN_SECTIONS.includes(name)).flatMap(([, keys]) => keys);
}
function trainForm() {
  const form = readForm("t", trainKeys());
  form.ranks = parseInt($("t-ranks").value || "1", 10);
  form.extra = extra;
  return form;
}

function formChanged() {
  planned = null;
  $("launch-btn").disabled = true;
  show("launch-why", "the form changed: plan it again");
  refreshYaml();
}

async function refreshYaml() {
  try {
    const out = await api("POST", "/api/config/yaml", { form: trainForm() });
    show("yaml", out.yaml);
    show("yaml-where", `saved at launch as ${out.path}; the same run from a shell: ${out.command}`);
  } catch (err) { show("yaml-where", err.message); }
}

async function listDatasets() {
  const dir = $("t-dataset_dir").value || INFO.fields.dataset_dir.default;
  const box = $("datasets");
  try {
    const out = await api("GET", `/api/datasets?dataset_dir=${encodeURIComponent(dir)}`);
    const chosen = ($("t-dataset").value || "").split(",").map((s) => s.trim()).filter(Boolean);
    box.textContent = "";
    for (const d of out.datasets) {
      const label = document.createElement("label");
      const cb = document.createElement("input");
      cb.type = "checkbox"; cb.id = `ds-${d.name}`; cb.checked = chosen.includes(d.name);
      cb.addEventListener("change", () => {
        const names = out.datasets.map((x) => x.name).filter((n) => $(`ds-${n}`).checked);
        $("t-dataset").value = names.join(","); formChanged();
      });
      label.append(cb, `${d.name} (${d.formatting}${d.ranking ? ", pairs" : ""}${d.source === "hub" ? ", hub" : ""})`);
      box.appendChild(label);
    }
  } catch (err) { box.textContent = err.message; }
}

async function loadYaml() {
  show("train-error", "");
  try {
    const out = await api("POST", "/api/config/load", { path: $("load-path").value });
    const form = out.form; extra = form.extra || {}; delete form.extra;
    resetForm("t", trainKeys()); fillForm("t", form);
    await listDatasets(); formChanged();
  } catch (err) { show("train-error", err.message); }
}

async function previewData() {
  show("train-error", ""); const box = $("preview"); box.textContent = "rendering…";
  try {
    const out = await api("POST", "/api/preview", { form: trainForm() });
    box.textContent = "";
    for (const r of out.records) {
      const div = document.createElement("div"); div.className = "preview-rec";
      const head = document.createElement("b"); head.textContent = `${r.dataset} · ${r.tokens} tokens\n`;
      const answer = document.createElement("span"); answer.className = "answer"; answer.textContent = r.answer;
      div.append(head, r.prompt, answer); box.appendChild(div);
    }
  } catch (err) { box.textContent = ""; show("train-error", err.message); }
}

async function plan() {
  show("train-error", ""); show("plan", "planning…");
  const form = trainForm();
  try {
    const out = await api("POST", "/api/plan", { form });
    show("plan", out.lines.join("\n"));
    $("plan").className = out.fits ? "ok" : "bad";
    planned = out.fits ? JSON.stringify(form) : null;
    $("launch-btn").disabled = !out.fits;
    show("launch-why", out.fits ? "the plan fits" : "the plan does not fit: change the form and plan again");
  } catch (err) { show("plan", "not planned"); show("train-error", err.message); }
}

async function launch() {
  const form = trainForm();
  if (JSON.stringify(form) !== planned) return formChanged();
  show("train-error", ""); $("launch-btn").disabled = true; show("launch-why", "launching…");
  try {
    const out = await api("POST", "/api/launch", { form });
    show("launch-why", `launched: ${out.output_dir}`);
    showPage("runs"); openRun(out.output_dir);
  } catch (err) { show("train-error", err.message); $("launch-btn").disabled = false; show("launch-why", ""); }
}

// ---- Runs page
async function listRuns() {
  const out = await api("GET", "/api/runs");
  show("runs-root", `runs under ${out.root}`);
  const body = $("runs-list"); body.textContent = "";
  for (const r of out.runs) {
    const tr = document.createElement("tr");
    const state = r.state + (r.error ? `: ${r.error}` : "");
    for (const text of [r.output_dir, state, r.started || ""]) {
      const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
    }
    const td = document.createElement("td"); const b = document.createElement("button");
    b.className = "alt"; b.textContent = "View"; b.addEventListener("click", () => openRun(r.output_dir));
    td.appendChild(b); tr.appendChild(td); body.appendChild(tr);
  }
}

function openRun(dir) {
  current = { dir, records: [], have: 0, lastStep: null };
  $("run-view").style.display = "block"; show("run-title", dir);
  poll();
}

function fmtTime(s) {
  if (s === undefined || s === null) return "";
  return typeof s === "string" ? s : `${Math.floor(s / 60)}:${String(Math.round(s % 60)).padStart(2, "0")}`;
}

async function poll() {
  if (!current || current.busy) return; // one request at a time: records are appended once
  const c = current; c.busy = true;
  try {
    const q = `output_dir=${encodeURIComponent(c.dir)}&have=${c.have}` + (c.lastStep === null ? "" : `&last_step=${c.lastStep}`);
    const out = await api("GET", `/api/run?${q}`);
    if (c !== current) return;
    if (out.reset) c.records = [];
    c.records.push(...out.records); c.have = out.count;
    c.lastStep = c.records.length ? c.records[c.records.length - 1].current_steps : null;
    renderRun(out);
  } catch (err) { show("run-error", err.message); }
  finally { c.busy = false; }
}

function renderRun(out) {
  const recs = current.records.filter((r) => r.loss !== undefined);
  const last = recs[recs.length - 1] || {};
  if (current.state !== out.state) { current.state = out.state; listRuns().catch(() => {}); }
  show("run-state", out.state); show("run-error", out.error || "");
  $("stop-btn").disabled = out.state !== "running";
  $("resume-btn").disabled = out.state === "running" || out.state === "finished";
  show("run-step", last.current_steps ? `step ${last.current_steps} / ${last.total_steps}` : "");
  show("run-eta", last.remaining_time !== undefined ? `elapsed ${fmtTime(last.elapsed_time)} · ETA ${fmtTime(last.remaining_time)}` : "");
  show("run-tps", last.tokens_per_second ? `${Math.round(last.tokens_per_second)} tokens/s` : "");
  show("run-lr", last.lr !== undefined ? `lr ${Number(last.lr).toExponential(2)}` : "");
  const mem = current.records.filter((r) => r.peak_memory_gb !== undefined).pop();
  show("run-mem", mem ? `peak memory ${mem.peak_memory_gb} GiB (planned ${mem.planned_peak_memory_gb ?? "?"} GiB)` : "");
  show("run-ckpt", out.checkpoints.length ? `checkpoints: ${out.checkpoints.join(", ")}` : "");
  const evals = current.records.filter((r) => r.eval_loss !== undefined);
  chart($("loss-chart"), [
    { name: "loss", color: "#2f6fe4", pts: recs.map((r) => [r.current_steps, r.loss]) },
    { name: "eval_loss", color: "#e07b00", pts: evals.map((r) => [r.current_steps, r.eval_loss]) },
  ]);
  chart($("lr-chart"), [{ name: "learning rate", color: "#1b7f3b", pts: recs.map((r) => [r.current_steps, r.lr]) }]);
  show("run-lines", out.lines.join("\n"));
}

function chart(svg, series) {
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), P = 36;
  const all = series.flatMap((s) => s.pts).filter((p) => Number.isFinite(p[1]));
  svg.dataset.points = String(series[0].pts.length);
  svg.innerHTML = "";
  if (!all.length) return;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-12);
  const X = (x) => P + ((x - x0) / (x1 - x0)) * (W - 2 * P), Y = (y) => H - P + ((y0 - y) / (y1 - y0)) * (H - 2 * P);
  const ns = "http://www.w3.org/2000/svg";
  const text = (x, y, t, color) => {
    const el = document.createElementNS(ns, "text");
    el.setAttribute("x", x); el.setAttribute("y", y); el.setAttribute("font-size", "11");
    el.setAttribute("fill", color || "#4a5468"); el.textContent = t; svg.appendChild(el);
  };
  text(4, P - 8, y1.toPrecision(3)); text(4, H - P + 4, y0.toPrecision(3)); text(W - P - 20, H - 8, `step ${x1}`);
  series.forEach((s, i) => {
    text(P + 120 * i, 14, s.name, s.color);
    if (!s.pts.length) return;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", s.pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", s.color); line.setAttribute("stroke-width", "2");
    line.setAttribute("class", `series-${s.name.replace(/\W/g, "_")}`);
    svg.appendChild(line);
    if (s.pts.length > 40) return;
    for (const p of s.pts) { // a marker per point: a single eval point shows too
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", X(p[0]).toFixed(1)); dot.setAttribute("cy", Y(p[1]).toFixed(1));
      dot.setAttribute("r", "2.5"); dot.setAttribute("fill", s.color); svg.appendChild(dot);
    }
  });
}

async function runAction(what) {
  show("run-error", "");
  try { await api("POST", `/api/run/${what}`, { output_dir: current.dir }); poll(); }
  catch (err) { show("run-error", err.message); }
}

async function chatWithRun() {
  try {
    const out = await api("GET", `/api/chat/run?output_dir=${encodeURIComponent(current.dir)}`);
    resetForm("c", CHAT_MODEL); fillForm("c", out.form); showPage("chat");
  } catch (err) { show("run-error", err.message); }
}

// ---- Chat page
const CHAT_MODEL = ["model_name_or_path", "adapter_name_or_path", "template", "trust_remote_code"];
const GEN = () => INFO.sections.find(([n]) => n === "generation")[1];

async function loadModel() {
  show("chat-error", ""); show("chat-model", "loading…"); $("chat-load-btn").disabled = true;
  try {
    const out = await api("POST", "/api/chat/load", { form: readForm("c", CHAT_MODEL) });
    show("chat-model", `loaded: ${out.model}`);
  } catch (err) { show("chat-model", ""); show("chat-error", err.message); }
  $("chat-load-btn").disabled = false;
}

function addMessage(role, text) {
  const div = document.createElement("div"); div.className = `msg ${role}`;
  const who = document.createElement("b"); who.textContent = role === "user" ? "User: " : "Assistant: ";
  const body = document.createElement("span"); body.textContent = text;
  div.append(who, body); $("chat-log").appendChild(div);
  return body;
}

async function send() {
  const text = $("chat-input").value.trim();
  if (!text) return;
  show("chat-error", ""); $("chat-input").value = ""; $("chat-send").disabled = true;
  addMessage("user", text);
  const body = addMessage("assistant", ""); body.parentElement.dataset.done = "false";
  const g = readForm("g", GEN());
  const req = { model: "lf-dist", messages: [...chatHistory, { role: "user", content: text }], stream: true };
  for (const k of ["do_sample", "temperature", "top_p", "top_k", "repetition_penalty"]) if (k in g) req[k] = g[k];
  if ("max_new_tokens" in g) req.max_tokens = g.max_new_tokens;
  let reply = "";
  try {
    const res = await fetch("/chat/v1/chat/completions", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(req) });
    if (!res.ok) { const e = await res.json(); throw new Error(e.error.message); }
    const reader = res.body.getReader(); const dec = new TextDecoder(); let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut).trim(); buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (piece) { reply += piece; body.textContent = reply; }
      }
    }
    chatHistory.push({ role: "user", content: text }, { role: "assistant", content: reply });
  } catch (err) { show("chat-error", err.message); }
  body.parentElement.dataset.done = "true"; $("chat-send").disabled = false;
}

function clearChat() { chatHistory = []; $("chat-log").textContent = ""; }

// ---- Export page
const EXPORT = ["model_name_or_path", "adapter_name_or_path", "template", "trust_remote_code", "export_dir", "export_size"];
async function exportModel() {
  show("export-error", ""); show("export-result", "exporting…");
  try {
    const out = await api("POST", "/api/export", { form: readForm("e", EXPORT) });
    show("export-result", `exported to ${out.export_dir}\n${out.lines.join("\n")}`);
  } catch (err) { show("export-result", ""); show("export-error", err.message); }
}

// ---- pages
function showPage(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("on", b.dataset.page === name);
  for (const s of document.querySelectorAll("section.page")) s.classList.toggle("on", s.id === `page-${name}`);
  if (name === "runs") listRuns().catch((e) => show("run-error", e.message));
}

async function start() {
  INFO = await api("GET", "/api/info");
  show("version", `lf-dist ${INFO.version} · ${INFO.cwd}`);
  const box = $("train-fields");
  for (const [name, keys] of INFO.sections.filter(([n]) => TRAIN_SECTIONS.includes(n))) {
    const fs = document.createElement("fieldset"); const lg = document.createElement("legend"); lg.textContent = name;
    const grid = document.createElement("div"); grid.className = "grid"; fs.append(lg, grid); box.appendChild(fs);
    buildFields("t", grid, keys);
    if (name === "parallel") {
      const label = document.createElement("label"); const input = document.createElement("input");
      input.type = "number"; input.min = "1"; input.value = "1"; input.id = "t-ranks";
      input.addEventListener("change", formChanged);
      label.append("ranks (processes on this machine; NPROC_PER_NODE)", input); grid.appendChild(label);
    }
  }
  $("t-dataset_dir").addEventListener("change", listDatasets);
  buildFields("c", $("chat-fields"), CHAT_MODEL);
  buildFields("g", $("gen-fields"), GEN());
  buildFields("e", $("export-fields"), EXPORT);
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showPage(b.dataset.page));
  $("load-btn").addEventListener("click", loadYaml);
  $("preview-btn").addEventListener("click", previewData);
  $("plan-btn").addEventListener("click", plan);
  $("launch-btn").addEventListener("click", launch);
  $("runs-refresh").addEventListener("click", () => listRuns());
  $("stop-btn").addEventListener("click", () => runAction("stop"));
  $("resume-btn").addEventListener("click", () => runAction("resume"));
  $("chat-run-btn").addEventListener("click", chatWithRun);
  $("chat-load-btn").addEventListener("click", loadModel);
  $("chat-send").addEventListener("click", send);
  $("chat-clear").addEventListener("click", clearChat);
  $("export-btn").addEventListener("click", exportModel);
  setInterval(poll, 1000);
  if (INFO.mode === "webchat") {
    for (const b of document.querySelectorAll("#tabs button")) b.style.display = b.dataset.page === "chat" ? "" : "none";
    $("chat-load-btn").parentElement.parentElement.style.display = "none";
    showPage("chat"); show("chat-error", "");
    const out = await api("GET", "/api/chat/sampling"); fillForm("g", out.sampling);
  } else {
    await listDatasets(); refreshYaml();
  }
}
start().catch((err) => { document.body.textContent = `lf-dist web UI failed to start: ${err.message}`; });
