"use strict";
const $ = (id) => document.getElementById(id);
const SENDABLE = ["image/jpeg", "image/png", "application/dicom"];
let classes = [];
let maxBytes = 20 * 1024 * 1024;
let previewUrl = null;
let requestSeq = 0;
let heatmapDrawn = false;
let pendingFile = null; // a file to send again once the user has entered an API key
const KEY = "covid-xray-api-key"; // sessionStorage: kept for this tab only, gone when it closes

// Every request but /ping carries the tab's API key, when it has one (servers without keys ignore it).
async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = { ...(options.headers || {}), ...(key ? { Authorization: "Bearer " + key } : {}) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) needKey(key);
  return response;
}

// A 401: the server needs a key, or did not accept the one sent (`sent`). Ask for one.
function needKey(sent) {
  if (sent !== null && sessionStorage.getItem(KEY) === sent) sessionStorage.removeItem(KEY);
  if (sent === null && !$("key-form").hidden) return; // already asking: keep what it says
  $("key-message").textContent = sent !== null ? "The server did not accept this API key. Enter a valid one."
    : "This server needs an API key (its operator gives them out). This page keeps it for this tab only.";
  $("key-form").hidden = false;
  $("api-key").focus();
}

function mb(bytes) { return (bytes / 1024 / 1024).toFixed(bytes < 10 * 1024 * 1024 ? 1 : 0) + " MB"; }

async function loadInfo() {
  try {
    const [ping, stats] = await Promise.all([fetch("ping"), api("stats")]);
    const info = await ping.json();
    if (stats.ok) {
      const s = await stats.json();
      if (s.settings && s.settings.max_body_bytes) { maxBytes = s.settings.max_body_bytes; $("limit").textContent = mb(maxBytes); }
      renderSite(s.site);
    }
    if (ping.ok) {
      classes = info.model.classes;
      $("model").textContent = `${info.model.backbone} · ${info.model.fingerprint}`;
      renderBars(null);
    } else if (info.status === "failed") {
      $("model").textContent = "model failed to load";
      showError(`The model could not be loaded: ${info.error}`);
    } else {
      $("model").textContent = "model loading…";
      setTimeout(loadInfo, 1000);
    }
  } catch (e) {
    $("model").textContent = "server unreachable";
    setTimeout(loadInfo, 3000);
  }
}

function contentType(file) {
  if (SENDABLE.includes(file.type)) return file.type;
  if (/\.(dcm|dicom)$/i.test(file.name)) return "application/dicom";
  return "application/x-image"; // the server sniffs the real format
}

function showError(message) { $("error").textContent = message; $("error").hidden = false; }
function clearError() { $("error").hidden = true; $("error").textContent = ""; }
function setStatus(html) { $("status").innerHTML = html; }

function renderBars(probabilities) {
  const names = probabilities ? Object.keys(probabilities) : classes;
  const top = probabilities ? names.reduce((a, b) => (probabilities[b] > probabilities[a] ? b : a)) : null;
  $("bars").replaceChildren(...names.map((name) => {
    const p = probabilities ? probabilities[name] : 0;
    const li = document.createElement("li");
    li.className = name === top ? "top" : "";
    li.dataset.class = name;
    li.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span><span class="pct"></span>';
    li.querySelector(".name").textContent = name;
    li.querySelector(".pct").textContent = probabilities ? (100 * p).toFixed(1) + "%" : "";
    li.querySelector(".track").setAttribute("aria-label", `${name}: ${(100 * p).toFixed(1)} percent`);
    requestAnimationFrame(() => { li.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%"; });
    return li;
  }));
}

function resetResult() {
  $("result-label").textContent = "—";
  $("result-label").className = "placeholder";
  $("confidence").textContent = "Upload an image to see the model's prediction.";
  $("confidence").className = "placeholder";
  $("flags").replaceChildren();
  heatmapDrawn = false;
  syncHeatmap();
  renderBars(null);
}

function renderFlags(prediction) {
  // Later stages add fields to each prediction; show the ones a clinician must not miss.
  const flags = [];
  if (prediction.ood) flags.push("This image does not look like a chest X-ray the model knows: do not use this " +
                                 "prediction; refer the image to a radiologist.");
  else if (prediction.refer) flags.push("Refer this image to a radiologist: " +
                                        (prediction.refer_reasons || ["low confidence"]).join("; ") + ".");
  $("flags").replaceChildren(...flags.map((text) => {
    const div = document.createElement("div");
    div.className = "flag";
    div.textContent = "⚠ " + text;
    return div;
  }));
}

// The heatmap covers the whole image as the model saw it (resized to a square), so stretching it
// over the preview's box lines it up; kept in sync when the preview loads or the window resizes.
function syncHeatmap() {
  const canvas = $("heatmap"), preview = $("preview");
  canvas.style.width = preview.clientWidth + "px"; canvas.style.height = preview.clientHeight + "px";
  canvas.hidden = !(heatmapDrawn && $("show-heatmap").checked && !preview.hidden && preview.clientWidth);
}

function renderHeatmap(prediction, seq) {
  if (!prediction.heatmap) return;
  const img = new Image();
  img.onload = () => {
    if (seq !== requestSeq) return; // a newer image was chosen meanwhile
    const canvas = $("heatmap");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    canvas.getContext("2d").drawImage(img, 0, 0);
    heatmapDrawn = true;
    syncHeatmap();
  };
  img.src = prediction.heatmap.startsWith("data:") ? prediction.heatmap : "data:image/png;base64," + prediction.heatmap;
}

function showPreview(file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("hint").hidden = true;
  $("viewer").hidden = false;
  $("no-preview").hidden = true;
  const img = $("preview");
  img.hidden = false;
  img.onerror = () => { img.hidden = true; $("no-preview").hidden = false; syncHeatmap(); };
  img.onload = syncHeatmap;
  img.src = previewUrl;
}

async function analyse(file) {
  const seq = ++requestSeq;
  clearError();
  resetResult();
  $("filename").textContent = file.name;
  $("clear").disabled = false;
  showPreview(file);
  if (file.size === 0) { showError("This file is empty."); return; }
  if (file.size > maxBytes) { showError(`This file is ${mb(file.size)}; the server accepts up to ${mb(maxBytes)}.`); return; }
  setStatus('<span class="spinner"></span>Analysing…');
  let response, body;
  try {
    response = await api("invocations?heatmap=true", {
      method: "POST", body: file, headers: { "Content-Type": contentType(file), "Accept": "application/json" },
    });
    body = await response.json().catch(() => null);
  } catch (e) {
    if (seq === requestSeq) { setStatus(""); showError("Cannot reach the server. Check that it is running and try again."); }
    return;
  }
  if (seq !== requestSeq) return; // a newer image was chosen meanwhile
  setStatus("");
  if (response.status === 401) {
    pendingFile = file;
    showError("An API key is needed: enter it above, and this image is sent again.");
    return;
  }
  if (!response.ok) {
    const reason = body && body.error ? body.error : `HTTP ${response.status}`;
    showError(response.status === 503 ? `The server is busy or still loading (${reason}). Try again in a moment.`
                                      : `This file could not be analysed: ${reason}`);
    return;
  }
  const prediction = body.predictions[0];
  const p = prediction.probabilities[prediction.label];
  $("result-label").textContent = prediction.label;
  $("result-label").className = "";
  $("confidence").textContent = `Model probability ${(100 * p).toFixed(1)}%`;
  $("confidence").className = "";
  renderBars(prediction.probabilities);
  renderFlags(prediction);
  renderHeatmap(prediction, seq);
  refreshSite();
}

function renderSite(site) {
  // The server's check of its recent films: shifted means its answers may not hold for them.
  const banner = $("site-banner");
  banner.hidden = !(site && site.shifted);
  if (site && site.shifted) banner.textContent = `⚠ The last ${site.n} films this server answered do not look like ` +
    `the training data (${site.reasons.join("; ")}). Predictions may not hold for them: validate on labelled ` +
    `films of this site before acting on them.`;
}

async function refreshSite() {
  try {
    const stats = await api("stats");
    if (stats.ok) renderSite((await stats.json()).site);
  } catch (e) { /* the prediction is already shown; the banner waits for the next one */ }
}

function pick(files) {
  if (!files || !files.length) return;
  if (files.length > 1) showError("Several files were dropped; analysing the first one.");
  analyse(files[0]);
}

const drop = $("drop");
drop.addEventListener("click", () => $("file-input").click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file-input").click(); } });
$("choose").addEventListener("click", () => $("file-input").click());
$("show-heatmap").addEventListener("change", syncHeatmap);
new ResizeObserver(syncHeatmap).observe($("preview"));
$("file-input").addEventListener("change", (e) => { pick(e.target.files); e.target.value = ""; });
$("clear").addEventListener("click", () => {
  requestSeq++;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
  $("viewer").hidden = true; $("hint").hidden = false; $("filename").textContent = ""; $("clear").disabled = true;
  clearError(); setStatus(""); resetResult();
});
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("dragging"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("dragging"); }));
drop.addEventListener("drop", (e) => pick(e.dataTransfer.files));
// A file dropped outside the drop zone must not navigate away from the page.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  loadInfo();
  if (pendingFile) { const file = pendingFile; pendingFile = null; analyse(file); }
});

loadInfo();
