// deephash search page: upload / drop an image or pick a random database item, show the top-k.
// When the server accepts writes (/api/info says writable): add the chosen image, remove a result.
"use strict";

const $ = (id) => document.getElementById(id);
let lastQuery = null; // {kind: "file", file} or {kind: "item", id}
let queryUrl = null;
let writable = false;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function labelText(label) {
  if (label === null || label === undefined) return "?";
  return Array.isArray(label) ? label.join(", ") : String(label);
}

function sameLabel(a, b) {
  if (a === null || a === undefined || b === null || b === undefined) return null;
  if (Array.isArray(a) && Array.isArray(b)) return a.some((x) => b.includes(x));
  return a === b;
}

function showQuery(src, caption) {
  $("query").hidden = false;
  $("query-image").src = src;
  $("query-caption").textContent = caption;
}

function renderResults(data, queryLabel) {
  const list = $("results");
  list.replaceChildren();
  const marked = queryLabel !== null && queryLabel !== undefined;
  let correct = 0;
  data.results.forEach((hit, rank) => {
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.id = hit.id;
    const match = marked ? sameLabel(queryLabel, hit.label) : null;
    if (match !== null) {
      item.classList.add(match ? "correct" : "wrong");
      if (match) correct += 1;
    }
    let picture;
    if (hit.image_url) {
      picture = document.createElement("img");
      picture.src = hit.image_url;
      picture.alt = `item ${hit.id}`;
      picture.loading = "lazy";
    } else {
      picture = document.createElement("div");
      picture.className = "noimage";
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = labelText(hit.label);
    label.title = `id ${hit.id}`;
    const dist = document.createElement("span");
    dist.className = "distance";
    dist.textContent = `#${rank + 1} · d=${hit.distance}`;
    meta.append(label, dist);
    item.append(picture, meta);
    if (writable) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "remove";
      remove.title = `remove item ${hit.id} from the index`;
      remove.addEventListener("click", () => removeItem(hit.id));
      item.append(remove);
    }
    if (match !== null) {
      const mark = document.createElement("div");
      mark.className = "mark";
      mark.textContent = match ? "✓ same label" : "✗ other label";
      item.append(mark);
    }
    list.append(item);
  });
  let text = `${data.results.length} results, ${data.bits}-bit codes, ${data.took_ms.toFixed(1)} ms`;
  if (marked && data.results.length) text += ` — ${correct}/${data.results.length} with the query's label`;
  $("summary").textContent = text;
}

async function readError(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) {
    return response.statusText;
  }
}

async function search() {
  if (!lastQuery) return;
  const k = Number($("k").value);
  let response;
  setStatus("searching…");
  try {
    if (lastQuery.kind === "file") {
      const form = new FormData();
      form.append("image", lastQuery.file);
      form.append("k", String(k));
      response = await fetch("/api/search", { method: "POST", body: form });
    } else {
      response = await fetch("/api/search", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ id: lastQuery.id, k }),
      });
    }
  } catch (e) {
    setStatus(`request failed: ${e}`, true);
    return;
  }
  if (!response.ok) {
    setStatus(`error ${response.status}: ${await readError(response)}`, true);
    $("results").replaceChildren();
    $("summary").textContent = "No results.";
    return;
  }
  const data = await response.json();
  setStatus("");
  renderResults(data, lastQuery.kind === "item" ? data.query.label : null);
}

function setWriteStatus(text, isError = false) {
  $("write-status").textContent = text;
  $("write-status").classList.toggle("error", isError);
}

function authHeaders() {
  const token = $("token").value.trim();
  if (!token) {
    setWriteStatus("enter the write token first", true);
    return null;
  }
  return { Authorization: `Bearer ${token}` };
}

async function addItem(event) {
  event.preventDefault();
  if (!lastQuery || lastQuery.kind !== "file") {
    setWriteStatus("choose an image file first", true);
    return;
  }
  const headers = authHeaders();
  if (!headers) return;
  const form = new FormData();
  form.append("image", lastQuery.file);
  const label = $("add-label").value.trim();
  if (label) form.append("label", label);
  setWriteStatus("adding…");
  let response;
  try {
    response = await fetch("/api/items", { method: "POST", headers, body: form });
  } catch (e) {
    setWriteStatus(`request failed: ${e}`, true);
    return;
  }
  if (!response.ok) {
    setWriteStatus(`error ${response.status}: ${await readError(response)}`, true);
    return;
  }
  const added = await response.json();
  setWriteStatus(`added as item ${added.id}`);
  await loadInfo();
  search();
}

async function removeItem(id) {
  const headers = authHeaders();
  if (!headers) return;
  let response;
  try {
    response = await fetch(`/api/items/${id}`, { method: "DELETE", headers });
  } catch (e) {
    setWriteStatus(`request failed: ${e}`, true);
    return;
  }
  if (response.status !== 204) {
    setWriteStatus(`error ${response.status}: ${await readError(response)}`, true);
    return;
  }
  setWriteStatus(`removed item ${id}`);
  await loadInfo();
  search();
}

function useFile(file) {
  if (!file) return;
  $("add").disabled = false;
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  showQuery(queryUrl, `${file.name} (label unknown)`);
  lastQuery = { kind: "file", file };
  search();
}

async function useRandom() {
  const response = await fetch("/api/items/random");
  if (!response.ok) {
    setStatus(`error ${response.status}: ${await readError(response)}`, true);
    return;
  }
  const item = await response.json();
  showQuery(item.image_url || "", `database item ${item.id} — label ${labelText(item.label)}`);
  lastQuery = { kind: "item", id: item.id };
  $("add").disabled = true;
  search();
}

async function loadInfo() {
  const response = await fetch("/api/info");
  if (!response.ok) return;
  const info = await response.json();
  $("info").textContent = `${info.size} items · ${info.bits}-bit codes · ${info.factory} index · model ${info.model}`
    + (info.writable ? " · accepts adds and removes (token)" : "");
  writable = Boolean(info.writable);
  $("writes").hidden = !writable;
}

function setup() {
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  $("random").addEventListener("click", useRandom);
  $("k").addEventListener("change", search);
  $("writes").addEventListener("submit", addItem);
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((name) => drop.addEventListener(name, (e) => {
    e.preventDefault();
    drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => useFile(e.dataTransfer.files[0]));
  loadInfo();
}

setup();
