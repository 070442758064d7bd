// mlic serve page: pick or drop an image, POST it to /v1/predict, draw label bars against
// thresholds, move a threshold slider, show a chosen label's heat map over the photo.
// Plain JavaScript, no external assets (works offline).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, scores: null, heatmaps: {}, photoUrl: null };

function headers() {
  const token = $("token").value || localStorage.getItem("mlic-token") || "";
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModel() {
  const r = await fetch("/v1/model", { headers: headers() });
  if (r.status === 401) {
    $("token-box").hidden = false;
    $("token-box").open = true;
    setStatus("this server needs an access token", true);
    return;
  }
  state.model = await r.json();
  $("model-name").textContent =
    `${state.model.name} · ${state.model.labels.length} labels · ${state.model.backend}`;
  $("threshold").disabled = false;
}

function thresholdFor(index) {
  if ($("calibrated").checked) return state.model.thresholds[index];
  return parseFloat($("threshold").value);
}

function render() {
  const list = $("labels");
  list.textContent = "";
  if (!state.scores) return;
  const names = state.model.labels;
  const order = names.map((n, i) => i).sort((a, b) => state.scores[names[b]] - state.scores[names[a]]);
  for (const i of order) {
    const name = names[i];
    const p = state.scores[name];
    const t = thresholdFor(i);
    const li = document.createElement("li");
    li.className = p >= t ? "on" : "off";
    li.dataset.label = name;
    li.innerHTML = '<span class="name"></span><span class="bar"><span class="fill"></span>' +
      '<span class="mark"></span></span><span class="value"></span>';
    li.querySelector(".name").textContent = name;
    li.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
    li.querySelector(".mark").style.left = (100 * t).toFixed(1) + "%";
    li.querySelector(".mark").title = "threshold " + t.toFixed(2);
    li.querySelector(".value").textContent = p.toFixed(3);
    li.addEventListener("click", () => { $("heat-label").value = name; showHeatmap(); });
    list.appendChild(li);
  }
}

function showHeatmap() {
  const name = $("heat-label").value;
  const url = state.heatmaps[name];
  if (url && $("heat-show").checked) $("heatmap").src = url;
  else $("heatmap").removeAttribute("src");
}

async function predict(file) {
  if (!state.model) await loadModel();
  if (!state.model) return;
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  $("photo").src = state.photoUrl;
  $("heatmap").removeAttribute("src");
  setStatus("predicting…");
  const form = new FormData();
  form.append("images", file, file.name);
  const heat = state.model.heatmaps ? (state.model.labels.length <= 32 ? "all" : "true") : "false";
  const r = await fetch(`/v1/predict?scores=all&heatmaps=${heat}`,
    { method: "POST", body: form, headers: headers() });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    setStatus(`error ${r.status}: ${detail}`, true);
    return;
  }
  const result = body.results[0];
  state.scores = result.scores;
  state.heatmaps = result.heatmaps || {};
  const labels = result.labels.map((l) => l.label);
  setStatus(labels.length ? "labels: " + labels.join(", ") : "no label above its threshold");
  const select = $("heat-label");
  select.textContent = "";
  const names = Object.keys(state.heatmaps).sort((a, b) => state.scores[b] - state.scores[a]);
  for (const n of names) {
    const opt = document.createElement("option");
    opt.value = n;
    opt.textContent = `${n} (${state.scores[n].toFixed(2)})`;
    select.appendChild(opt);
  }
  $("heat-controls").hidden = names.length === 0;
  render();
  showHeatmap();
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) predict(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) predict(e.dataTransfer.files[0]);
});
$("threshold").addEventListener("input", () => {
  $("calibrated").checked = false;
  $("threshold-value").textContent = parseFloat($("threshold").value).toFixed(2);
  render();
});
$("calibrated").addEventListener("change", () => {
  $("threshold-value").textContent = $("calibrated").checked
    ? "calibrated" : parseFloat($("threshold").value).toFixed(2);
  render();
});
$("heat-label").addEventListener("change", showHeatmap);
$("heat-show").addEventListener("change", showHeatmap);
$("token").addEventListener("change", () => {
  localStorage.setItem("mlic-token", $("token").value);
  loadModel();
});
loadModel();
