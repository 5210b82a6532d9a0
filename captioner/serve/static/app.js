// The captioner page: send a photo to POST /caption, show the caption and the beam's
// alternatives, and draw a word's attention grid over the photo while the word is hovered.
"use strict";

const $ = (id) => document.getElementById(id);
let result = null; // the last answer of /caption

fetch("/info").then((r) => r.json()).then((info) => {
  const m = info.model;
  $("model-line").textContent = `${m.name}: ${m.encoder.name || m.encoder.class} + ${m.decoder}, ` +
    `vocabulary ${m.vocab_size}, ${m.grid[0]}×${m.grid[1]} attention grid, beam ${m.decode.beam_size} by default`;
  $("beam").value = m.decode.beam_size;
  $("beam").max = m.limits.max_beam_size;
  $("alternatives").value = Math.min(3, m.decode.beam_size);
}).catch(() => { $("model-line").textContent = "model info unavailable"; });

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function caption(file) {
  $("result").hidden = false;
  $("photo").src = URL.createObjectURL(file);
  $("caption").textContent = "";
  $("alternatives-list").textContent = "";
  clearHeat();
  setStatus("captioning…");
  const beam = Math.max(1, parseInt($("beam").value, 10) || 1);
  const form = new FormData();
  form.append("image", file);
  form.append("beam_size", String(beam));
  form.append("alternatives", String(Math.min(beam, Math.max(1, parseInt($("alternatives").value, 10) || 1))));
  form.append("attention", "true");
  let body;
  try {
    const response = await fetch("/caption", { method: "POST", body: form });
    body = await response.json();
    if (!response.ok) throw new Error(body.detail || response.statusText);
  } catch (e) {
    setStatus(`error: ${e.message}`, true);
    return;
  }
  result = body;
  setStatus("");
  showCaption(body);
}

function showCaption(body) {
  const caption = $("caption");
  caption.textContent = "";
  body.words.forEach((word, i) => {
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = word;
    span.tabIndex = 0;
    span.dataset.index = i;
    span.addEventListener("mouseenter", () => showHeat(i));
    span.addEventListener("focus", () => showHeat(i));
    span.addEventListener("mouseleave", clearHeat);
    span.addEventListener("blur", clearHeat);
    caption.append(span, " ");
  });
  if (!body.words.length) caption.textContent = "(empty caption)";
  const list = $("alternatives-list");
  list.textContent = "";
  body.alternatives.forEach((alt) => {
    const li = document.createElement("li");
    li.textContent = alt.caption || "(empty)";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = alt.score === null ? "" : `score ${alt.score.toFixed(2)}`;
    li.append(score);
    list.append(li);
  });
}

// The grid (rows × columns of weights) drawn as one cell per region on a small canvas, then
// scaled up smoothly over the photo; each cell's opacity follows its weight (the largest is
// 0.75 opaque), so the photo shows through everywhere.
function showHeat(i) {
  if (!result || !result.attention) return;
  const [rows, cols] = result.attention.grid;
  const weights = result.attention.weights[i];
  const top = Math.max(...weights, 1e-8);
  const cells = document.createElement("canvas");
  cells.width = cols;
  cells.height = rows;
  const c = cells.getContext("2d");
  const pixels = c.createImageData(cols, rows);
  weights.forEach((w, k) => {
    const v = w / top;
    pixels.data.set([255, Math.round(220 * (1 - v)), 0, Math.round(191 * v)], 4 * k);
  });
  c.putImageData(pixels, 0, 0);
  const heat = $("heat");
  const photo = $("photo");
  heat.width = photo.naturalWidth || photo.width;
  heat.height = photo.naturalHeight || photo.height;
  const ctx = heat.getContext("2d");
  ctx.clearRect(0, 0, heat.width, heat.height);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(cells, 0, 0, heat.width, heat.height);
  heat.dataset.word = String(i);
  document.querySelectorAll(".word").forEach((s) => s.classList.toggle("active", s.dataset.index === String(i)));
}

function clearHeat() {
  const heat = $("heat");
  heat.getContext("2d").clearRect(0, 0, heat.width, heat.height);
  delete heat.dataset.word;
  document.querySelectorAll(".word.active").forEach((s) => s.classList.remove("active"));
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) caption(e.target.files[0]); });
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files[0]) caption(e.dataTransfer.files[0]); });
