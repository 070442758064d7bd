// mlic serve page: pick, drop or choose example images, POST them to /v1/predict in batches
// within the server's limits, show one card per image and, for the selected image, every
// label as a bar against its threshold (a slider moves them) and a label's heat map.
// Plain JavaScript, no external assets (works offline).
"use strict";

const MAX_PAGE_IMAGES = 48; // images per pick: bounds the photos and heat maps the page holds
const $ = (id) => document.getElementById(id);
// results: one per image of the current pick ({file, name, url, card, scores, heatmaps, error});
// run: bumped by each pick, so that answers to an older pick are dropped.
const state = { model: null, results: [], selected: -1, run: 0, exampleUrls: [] };

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
  if (!r.ok) {
    setStatus(`error ${r.status} reading the model's description`, true);
    return;
  }
  state.model = await r.json();
  $("model-name").textContent =
    `${state.model.name} · ${state.model.labels.length} labels · ${state.model.backend}`;
  $("threshold").disabled = false;
  if (!state.results.length) setStatus("");
  await loadExamples();
}

async function loadExamples() {
  // a few images of the run's own val split, offered by the server (none: the box stays hidden)
  const r = await fetch("/examples", { headers: headers() });
  const list = r.ok ? await r.json() : [];
  for (const url of state.exampleUrls) URL.revokeObjectURL(url);
  state.exampleUrls = [];
  const ul = $("examples");
  ul.textContent = "";
  for (const ex of list) {
    const got = await fetch(`/examples/${ex.index}`, { headers: headers() });
    if (!got.ok) continue;
    const blob = await got.blob();
    const file = new File([blob], ex.name, { type: blob.type });
    const url = URL.createObjectURL(blob);
    state.exampleUrls.push(url);
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.index = ex.index;
    button.title = ex.name + (ex.labels.length ? ` (true labels: ${ex.labels.join(", ")})` : "");
    const thumb = document.createElement("img");
    thumb.src = url;
    thumb.alt = ex.name;
    button.appendChild(thumb);
    button.addEventListener("click", () => predictFiles([file]));
    const li = document.createElement("li");
    li.appendChild(button);
    ul.appendChild(li);
    $("examples-box").hidden = false;
  }
  $("examples-box").hidden = ul.children.length === 0;
}

function thresholdFor(index) {
  if ($("calibrated").checked) return state.model.thresholds[index];
  return parseFloat($("threshold").value);
}

function labelsAbove(result) {
  // the labels at or above their threshold at the current slider position, most probable first
  const names = state.model.labels;
  return names
    .filter((n, i) => result.scores[n] >= thresholdFor(i))
    .sort((a, b) => result.scores[b] - result.scores[a]);
}

function render() {
  for (const result of state.results) renderCard(result);
  renderBars(state.results[state.selected]);
  renderStatus(state.results[state.selected]);
}

function renderCard(result) {
  const text = result.card.querySelector(".card-labels");
  result.card.classList.toggle("failed", Boolean(result.error));
  if (result.error) text.textContent = result.error;
  else if (!result.scores) text.textContent = "predicting…";
  else text.textContent = labelsAbove(result).join(", ") || "no label above its threshold";
}

function renderStatus(result) {
  // always describes what the bars show now (the selected image, the current thresholds)
  if (!result) return;
  const n = state.results.length;
  const which = n > 1 ? `${result.name} (${state.selected + 1} of ${n}): ` : "";
  if (result.error) setStatus(which + result.error, true);
  else if (!result.scores) setStatus(which + "predicting…");
  else {
    const on = labelsAbove(result);
    setStatus(which + (on.length ? "labels: " + on.join(", ") : "no label above its threshold"));
  }
}

function renderBars(result) {
  const list = $("labels");
  list.textContent = "";
  if (!result || !result.scores) return;
  const names = state.model.labels;
  const order = names.map((n, i) => i).sort((a, b) => result.scores[names[b]] - result.scores[names[a]]);
  for (const i of order) {
    const name = names[i];
    const p = result.scores[name];
    const t = thresholdFor(i);
    const li = document.createElement("li");
    li.className = p >= t ? "on" : "off";
    li.dataset.label = name;
    li.innerHTML = '<span class="name"></span><span class="bar"><span class="fill"></span>' +
      '<span class="mark"></span></span><span class="value"></span><span class="thr"></span>';
    li.querySelector(".name").textContent = name;
    li.querySelector(".name").title = name;
    li.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
    li.querySelector(".mark").style.left = (100 * t).toFixed(1) + "%";
    li.querySelector(".mark").title = "threshold " + t.toFixed(3);
    li.querySelector(".value").textContent = p.toFixed(3);
    li.querySelector(".value").title = "score";
    li.querySelector(".thr").textContent = t.toFixed(3);
    li.querySelector(".thr").title = "the threshold this label's score was compared with";
    li.addEventListener("click", () => { $("heat-label").value = name; showHeatmap(); });
    list.appendChild(li);
  }
}

function showHeatmap() {
  const result = state.results[state.selected];
  const url = result && result.heatmaps ? result.heatmaps[$("heat-label").value] : null;
  if (url && $("heat-show").checked) $("heatmap").src = url;
  else $("heatmap").removeAttribute("src");
}

function select(index) {
  state.selected = index;
  const result = state.results[index];
  state.results.forEach((r, k) => r.card.classList.toggle("selected", k === index));
  $("photo").src = result.url;
  const menu = $("heat-label");
  const keep = menu.value; // the same label's map on the next image, when it has one
  menu.textContent = "";
  const maps = result.heatmaps || {};
  const names = Object.keys(maps).sort((a, b) => result.scores[b] - result.scores[a]);
  for (const n of names) {
    const opt = document.createElement("option");
    opt.value = n;
    opt.textContent = `${n} (${result.scores[n].toFixed(2)})`;
    menu.appendChild(opt);
  }
  if (names.includes(keep)) menu.value = keep;
  $("heat-controls").hidden = names.length === 0;
  render();
  showHeatmap();
}

function clearResults() {
  for (const r of state.results) URL.revokeObjectURL(r.url);
  state.results = [];
  state.selected = -1;
  $("cards").textContent = "";
  $("labels").textContent = "";
  $("photo").removeAttribute("src");
  $("heatmap").removeAttribute("src");
  $("heat-controls").hidden = true;
}

function newResult(file, index) {
  const result = { file, name: file.name || `image ${index + 1}`, url: URL.createObjectURL(file) };
  const card = document.createElement("li");
  card.dataset.index = index;
  card.innerHTML = '<img class="thumb" alt=""><div class="card-name"></div>' +
    '<div class="card-labels"></div>';
  const thumb = card.querySelector(".thumb");
  thumb.addEventListener("error", () => { thumb.hidden = true; }); // not an image: no broken icon
  thumb.src = result.url;
  card.querySelector(".card-name").textContent = result.name;
  card.addEventListener("click", () => select(index));
  $("cards").appendChild(card);
  result.card = card;
  return result;
}

async function predictBatch(items, heat, run) {
  // one request for several images; a 4xx for one bad file fails them all, so then each
  // is sent alone and only the bad one shows the error
  const form = new FormData();
  for (const it of items) form.append("images", it.file, it.name);
  let r = null;
  let body = {};
  try {
    r = await fetch(`/v1/predict?scores=all&heatmaps=${heat}`,
      { method: "POST", body: form, headers: headers() });
    body = await r.json().catch(() => ({}));
  } catch (e) {
    body = { detail: String(e) };
  }
  if (run !== state.run) return;
  if (r && r.ok) {
    body.results.forEach((res, k) => {
      items[k].scores = res.scores;
      items[k].heatmaps = res.heatmaps || {};
    });
  } else if (r && items.length > 1 && r.status >= 400 && r.status < 500 && r.status !== 401) {
    for (const it of items) {
      await predictBatch([it], heat, run);
      if (run !== state.run) return;
    }
    return;
  } else {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    for (const it of items) it.error = r ? `error ${r.status}: ${detail}` : detail;
  }
  if (items.includes(state.results[state.selected])) select(state.selected);
  else render();
}

async function predictFiles(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  if (!state.model) await loadModel();
  if (!state.model) return;
  const run = ++state.run;
  clearResults();
  const taken = files.slice(0, MAX_PAGE_IMAGES);
  $("note").hidden = files.length <= MAX_PAGE_IMAGES;
  $("note").textContent = `only the first ${MAX_PAGE_IMAGES} of ${files.length} images were taken`;
  state.results = taken.map(newResult);
  select(0);
  const heat = state.model.heatmaps ? (state.model.labels.length <= 32 ? "all" : "true") : "false";
  // batches within the server's limits: images per request, and heat maps per answer
  let size = state.model.max_images_per_request || 1;
  if (heat !== "false") size = Math.min(size, state.model.max_heatmap_images || 1);
  for (let start = 0; start < taken.length; start += size) {
    await predictBatch(state.results.slice(start, start + size), heat, run);
    if (run !== state.run) return;
  }
}

$("file").addEventListener("change", (e) => {
  const files = Array.from(e.target.files);
  e.target.value = ""; // picking the same files again is a new pick
  predictFiles(files);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  predictFiles(e.dataTransfer.files);
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
