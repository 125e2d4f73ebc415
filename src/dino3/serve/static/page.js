// dino3's page: an image in, its PCA picture, (with an index) its nearest indexed images and (with an
// anomaly detector) its anomaly map and score out; with a dino.txt model and an index of its image
// embeddings, a text in, its nearest indexed images out.
// Every name and text from the server or the user is set as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

function apiKey() { return sessionStorage.getItem("dino3-key") || ""; }

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, body) {
  const headers = {};
  if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST", headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    $("key-row").hidden = false;
    throw new Error("this server needs an API key: type it above");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.readAsDataURL(file);
  });
}

async function loadInfo() {
  try {
    info = await (await api("/v1/info")).json();
    const index = info.index ? ", an index of " + info.index.size + " images" : ", no index";
    const detector = info.detector ? ", an anomaly detector" : "";
    $("served").textContent = info.model + index + detector;
    $("text-search").hidden = !(info.texts && info.index && info.index.pool === "text");
  } catch (e) {
    status(e.message, true);
  }
}

function done() {
  document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
}

async function showNeighbours(input, title) {
  $("neighbors").replaceChildren();
  const k = Math.min(8, info.index.size);
  const found = await (await api("/v1/search", { input: [input], k })).json();
  $("search-title").textContent = title;
  $("search").hidden = false;
  await Promise.all(found.data[0].neighbors.map(neighbour));
}

async function showAnomaly(dataUrl) {
  const found = (await (await api("/v1/anomaly", { input: [dataUrl], map: true })).json());
  const item = found.data[0];
  $("anomaly").src = item.map;
  const verdict = item.anomalous === null ? "" : item.anomalous ? " · anomalous" : " · good";
  const threshold = found.threshold === null ? "" : " (threshold " + found.threshold.toFixed(4) + ")";
  $("anomaly-caption").textContent = "anomaly score " + item.score.toFixed(4) + verdict + threshold;
  $("anomaly-caption").classList.toggle("anomalous", item.anomalous === true);
  $("anomaly-figure").hidden = false;
}

async function neighbour(item) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = item.path;
  const caption = document.createElement("figcaption");
  caption.textContent = item.score.toFixed(4) + " · " + item.path;
  figure.append(img, caption);
  $("neighbors").append(figure);
  try {
    const blob = await (await api("/v1/thumbnails/" + item.id)).blob();
    img.src = URL.createObjectURL(blob);
  } catch (e) {  // its file moved or went since it was indexed: say so under it, show the others
    figure.classList.add("missing");
    caption.textContent += " (" + e.message + ")";
  }
}

async function show(file) {
  if (!file) return;
  if (!info) await loadInfo();
  status("computing…");
  $("neighbors").replaceChildren();
  $("search").hidden = true;
  $("anomaly-figure").hidden = true;
  try {
    const dataUrl = await readAsDataURL(file);
    $("original").src = dataUrl;
    $("original").alt = file.name;
    const pca = await (await api("/v1/pca", { input: dataUrl })).json();
    $("pca").src = pca.image;
    $("pca-caption").textContent = "PCA of the patch features (" + pca.grid[0] + " × " + pca.grid[1] + " patches)";
    $("pictures").hidden = false;
    if (info && info.detector) await showAnomaly(dataUrl);
    if (info && info.index) await showNeighbours(dataUrl, "Nearest in the index");
    status("");
  } catch (e) {
    status(e.message, true);
  } finally {
    done();
  }
}

async function searchText(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  status("searching…");
  $("search").hidden = true;
  try {
    await showNeighbours(text, "Nearest to “" + text + "”");
    status("");
  } catch (e) {
    status(e.message, true);
  } finally {
    done();
  }
}

$("file").addEventListener("change", (event) => show(event.target.files[0]));
$("text-search").addEventListener("submit", searchText);
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  show(event.dataTransfer.files[0]);
});
$("key-save").addEventListener("click", () => {
  sessionStorage.setItem("dino3-key", $("key").value);
  $("key-row").hidden = true;
  info = null;
  loadInfo();
});
loadInfo();
