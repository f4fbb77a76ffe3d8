// The demo page: draw on the canvas (pointer events: mouse, pen, touch) or upload a picture,
// POST it to /api/predict?details=true, show the probabilities, the prepared input and the feature maps.
"use strict";

const canvas = document.getElementById("canvas");
const pen = canvas.getContext("2d");
const modelSelect = document.getElementById("model");
const state = { models: [], drawing: false, last: null, inked: false, busy: null, last_input: null };

function clearCanvas() {
  // White paper, black ink: the server inverts it to MNIST's light-on-dark.
  pen.fillStyle = "#fff";
  pen.fillRect(0, 0, canvas.width, canvas.height);
  state.inked = false;
}

function canvasPoint(event) {
  // Pointer position in canvas pixels (the canvas may be displayed smaller or larger than 280x280).
  const box = canvas.getBoundingClientRect();
  return { x: (event.clientX - box.left) * canvas.width / box.width,
           y: (event.clientY - box.top) * canvas.height / box.height };
}

function strokeTo(point) {
  pen.strokeStyle = "#000";
  pen.lineWidth = canvas.width / 14;  // ~2 px once the digit is shrunk to MNIST's 20x20 box
  pen.lineCap = "round";
  pen.lineJoin = "round";
  pen.beginPath();
  pen.moveTo(state.last.x, state.last.y);
  pen.lineTo(point.x, point.y);
  pen.stroke();
  state.last = point;
  state.inked = true;
}

canvas.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  state.drawing = true;
  state.last = canvasPoint(event);
  strokeTo(state.last);  // a tap leaves a dot
});

canvas.addEventListener("pointermove", (event) => {
  if (!state.drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of (events.length ? events : [event])) strokeTo(canvasPoint(e));
});

function endStroke() {
  if (!state.drawing) return;
  state.drawing = false;
  if (state.inked) canvas.toBlob((blob) => predict(blob, "drawing.png"), "image/png");
}

function showUpload(file) {
  // Put the uploaded picture on the canvas (fitted, on white) so the learner sees what was sent;
  // the file itself, at full resolution, is what the server prepares.
  const url = URL.createObjectURL(file);
  const picture = new Image();
  picture.onload = () => {
    clearCanvas();
    const scale = Math.min(canvas.width / picture.width, canvas.height / picture.height);
    const w = picture.width * scale, h = picture.height * scale;
    pen.drawImage(picture, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
    URL.revokeObjectURL(url);
  };
  picture.onerror = () => URL.revokeObjectURL(url);  // not an image: the server's message explains
  picture.src = url;
}

function predictFile(file) {
  showUpload(file);
  predict(file, file.name);
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  clearCanvas();
  state.last_input = null;
  showResult(null);
});

document.getElementById("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) predictFile(file);
  event.target.value = "";  // choosing the same file again predicts again
});

canvas.addEventListener("dragover", (event) => event.preventDefault());
canvas.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (file) predictFile(file);
});

modelSelect.addEventListener("change", () => {
  describeModel();
  if (state.last_input) predict(state.last_input.blob, state.last_input.name);  // same picture, other model
});

// How each recipe (cnnlab.use.recipes) prepared the picture shown under "what the model saw".
const SEEN = {
  digits: "cropped to the ink, scaled into 20x20, centred by mass, light on dark",
  objects: "trimmed to the object, scaled to 28 pixels, sharpened, negated to light on dark",
  photos: "the middle square, resized, colours kept",
  "photos-grey": "the middle square, resized, in grey",
};

async function loadModels() {
  const response = await fetch("/api/model");
  const info = await response.json();
  state.models = info.models;
  state.maxUpload = info.max_upload_bytes;
  for (const model of info.models) {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = `${model.name} (${model.dataset})`;
    modelSelect.appendChild(option);
  }
  modelSelect.value = info.default;
  modelSelect.disabled = info.models.length < 2;
  describeModel();
}

function describeModel() {
  const model = state.models.find((m) => m.name === modelSelect.value);
  if (!model) return;
  const accuracy = model.test_accuracy == null ? "not tested" : `${(100 * model.test_accuracy).toFixed(1)}% test accuracy`;
  document.getElementById("model-info").textContent =
    `${model.dataset} · ${model.classes.length} classes · ${model.parameters.toLocaleString("en")} parameters · ${accuracy}`;
  document.getElementById("seen-caption").textContent =
    `what the model saw: your picture prepared like the training images (${SEEN[model.recipe] || SEEN.digits})`;
  document.getElementById("hint").textContent = {
    objects: "Upload a photo of one clothing item or shoe on a plain background (or draw one).",
    photos: `Upload a photo of one of: ${model.classes.join(", ")} (the middle square is used).`,
  }[model.recipe] || "Draw one large digit on the white square; it is predicted when you lift the pen.";
}

async function predict(blob, name) {
  if (state.maxUpload && blob.size > state.maxUpload) {
    showError(`${name} is too large: the limit is ${(state.maxUpload / 1048576).toFixed(0)} MB`);
    return;
  }
  state.last_input = { blob, name };
  const form = new FormData();
  form.append("file", blob, name);
  form.append("model", modelSelect.value);
  const request = Symbol(name);
  state.busy = request;  // only the latest request's answer is shown
  document.body.classList.add("busy");
  try {
    const response = await fetch("/api/predict?details=true", { method: "POST", body: form });
    const body = await response.json().catch(() => ({ error: `the server answered ${response.status}` }));
    if (state.busy !== request) return;
    if (!response.ok) showError(body.error || `the server answered ${response.status}`);
    else showResult(body);
  } catch (error) {
    if (state.busy === request) showError(`no answer from the server (${error.message})`);
  } finally {
    if (state.busy === request) document.body.classList.remove("busy");
  }
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = false;
}

function showResult(result) {
  document.getElementById("error").hidden = true;
  const bars = document.getElementById("bars");
  const image = document.getElementById("input-image");
  const maps = document.getElementById("feature-maps");
  bars.replaceChildren();
  maps.replaceChildren();
  if (!result) {
    document.getElementById("prediction").textContent = "—";
    image.hidden = true;
    return;
  }
  const top = result.probabilities[result.class_name];
  document.getElementById("prediction").textContent = `${result.class_name} (${(100 * top).toFixed(1)}%)`;
  const ranked = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]).slice(0, 5);
  for (const [name, p] of ranked) bars.appendChild(bar(name, p, name === result.class_name));
  image.src = result.input_image;
  image.hidden = false;
  for (const layer of result.feature_maps || []) maps.appendChild(layerPanel(layer));
}

function bar(name, probability, best) {
  const item = document.createElement("li");
  item.className = best ? "bar best" : "bar";
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = name;
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = `${(100 * probability).toFixed(1)}%`;
  track.appendChild(fill);
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = `${(100 * probability).toFixed(1)}%`;
  item.append(label, track, value);
  return item;
}

function layerPanel(layer) {
  const panel = document.createElement("div");
  panel.className = "layer";
  const title = document.createElement("h3");
  const shown = layer.maps.length < layer.count ? `${layer.maps.length} of ${layer.count}` : `${layer.count}`;
  title.textContent = `${layer.title}: ${shown} maps, ${layer.height}x${layer.width}`;
  const grid = document.createElement("div");
  grid.className = "grid";
  layer.maps.forEach((src, i) => {
    const map = document.createElement("img");
    map.src = src;
    map.alt = `${layer.layer} map ${i}`;
    map.title = `${layer.layer} map ${i}`;
    grid.appendChild(map);
  });
  panel.append(title, grid);
  return panel;
}

clearCanvas();
loadModels().catch((error) => showError(`could not load the model description (${error.message})`));
