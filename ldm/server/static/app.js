"use strict";
// The page of scripts/serve.py: one form for txt2img / img2img / inpaint against the A1111-style API, a progress bar
// and live preview polled while a request runs, and a gallery whose "Reuse" buttons refill the form.

const POLL_MS = 300;
const DEFAULT_SAMPLER = "Euler a"; // A1111's
const NUMBER_FIELDS = new Set(["steps", "cfg_scale", "width", "height", "seed", "batch_size", "denoising_strength",
  "mask_blur"]);
// Fields the request carries for every mode; the image modes add theirs in readRequest.
const COMMON_FIELDS = ["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width",
  "height", "seed", "batch_size"];

const $ = (id) => document.getElementById(id);
const form = $("gen-form");
const maskCanvas = $("mask-canvas");
const state = { initImage: null, maskPainted: false, run: 0, running: false };

class ApiError extends Error {
  constructor(detail, field) {
    super(detail);
    this.field = field;
  }
}

function detailText(detail) {
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

// GET when body is undefined, else POST it as JSON; a non-2xx answer throws the server's detail.
async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // not JSON (a proxy's error page): the text itself is the detail
  }
  if (!response.ok) {
    const detail = data && data.detail !== undefined ? detailText(data.detail) : text || response.statusText;
    throw new ApiError(`${detail} (HTTP ${response.status})`, data ? data.field : null);
  }
  return data;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const pngUrl = (b64) => `data:image/png;base64,${b64}`;
const field = (name) => form.elements.namedItem(name);

function currentMode() {
  return field("mode").value;
}

function showMode() {
  const mode = currentMode();
  $("init-section").hidden = mode === "txt2img";
  $("mask-tools").hidden = mode !== "inpaint";
  maskCanvas.hidden = mode !== "inpaint";
}

function showError(message, fieldName) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  const input = fieldName ? field(fieldName) : null;
  if (input) input.setAttribute("aria-invalid", "true");
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
}

function fillSelect(select, items, label) {
  select.replaceChildren(...items.map((item) => new Option(label(item), item.name)));
}

// Sets a form field, adding an option to a select that lacks the value (a sampler named by an alias).
function setField(name, value) {
  const input = field(name);
  if (!input || value === undefined || value === null) return;
  if (input.tagName === "SELECT" && ![...input.options].some((o) => o.value === String(value))) {
    input.add(new Option(String(value), String(value)));
  }
  input.value = String(value);
}

function readRequest(mode) {
  const request = { n_iter: 1 };
  const names = [...COMMON_FIELDS];
  if (mode !== "txt2img") {
    if (!state.initImage) throw new Error("Choose an init image first.");
    request.init_images = [state.initImage];
    names.push("denoising_strength");
  }
  if (mode === "inpaint") {
    if (!state.maskPainted) throw new Error("Paint the area to repaint on the image first (or use img2img).");
    request.mask = maskBase64();
    request.inpainting_fill = 1;
    request.inpaint_full_res = false; // A1111's page default, "Whole picture" (its API's default is "Only masked")
    names.push("mask_blur");
  }
  for (const name of names) {
    const input = field(name);
    // An empty number field is sent as null so that the server names the field in its error.
    request[name] = NUMBER_FIELDS.has(name) ? (input.value === "" ? null : Number(input.value)) : input.value;
  }
  return request;
}

// --- init image and mask -------------------------------------------------------------------------------------

function readFileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("The file is not an image the browser can read."));
    img.src = src;
  });
}

// Shows the init image and sizes the mask canvas to its pixels (the mask is sent at the image's resolution).
async function setInitImage(b64) {
  const img = await loadImage(pngUrl(b64));
  state.initImage = b64;
  $("init-preview").src = img.src;
  maskCanvas.width = img.naturalWidth;
  maskCanvas.height = img.naturalHeight;
  state.maskPainted = false;
  $("init-stage").hidden = false;
  return img;
}

function roundTo(value, multiple) {
  return Math.max(multiple, Math.round(value / multiple) * multiple);
}

async function onInitFile() {
  const file = $("init-image").files[0];
  if (!file) return;
  clearError();
  try {
    const img = await setInitImage(await readFileBase64(file));
    const multiple = Number(field("width").step) || 8;
    setField("width", roundTo(img.naturalWidth, multiple));
    setField("height", roundTo(img.naturalHeight, multiple));
  } catch (error) {
    showError(error.message);
  }
}

// The mask canvas holds white strokes on transparency; the server wants white (repaint) on black (keep).
function maskBase64() {
  const out = document.createElement("canvas");
  out.width = maskCanvas.width;
  out.height = maskCanvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(maskCanvas, 0, 0);
  return out.toDataURL("image/png").split(",", 2)[1];
}

// Draws a white-on-black mask PNG back onto the canvas as white strokes on transparency.
async function setMask(b64) {
  const img = await loadImage(pngUrl(b64));
  const ctx = maskCanvas.getContext("2d");
  ctx.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  ctx.drawImage(img, 0, 0, maskCanvas.width, maskCanvas.height);
  const pixels = ctx.getImageData(0, 0, maskCanvas.width, maskCanvas.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    pixels.data[i + 3] = pixels.data[i];
    pixels.data.fill(255, i, i + 3);
  }
  ctx.putImageData(pixels, 0, 0);
  state.maskPainted = true;
}

function clearMask() {
  maskCanvas.getContext("2d").clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  state.maskPainted = false;
}

function canvasPoint(event) {
  const rect = maskCanvas.getBoundingClientRect();
  return [
    ((event.clientX - rect.left) * maskCanvas.width) / rect.width,
    ((event.clientY - rect.top) * maskCanvas.height) / rect.height,
  ];
}

function setupBrush() {
  let last = null;
  const stroke = (event) => {
    const point = canvasPoint(event);
    const ctx = maskCanvas.getContext("2d");
    ctx.strokeStyle = "#fff";
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number($("brush-size").value);
    ctx.beginPath();
    ctx.moveTo(...(last || point));
    ctx.lineTo(...point);
    ctx.stroke();
    last = point;
    state.maskPainted = true;
  };
  maskCanvas.addEventListener("pointerdown", (event) => {
    maskCanvas.setPointerCapture(event.pointerId);
    last = null;
    stroke(event);
  });
  maskCanvas.addEventListener("pointermove", (event) => {
    if (last) stroke(event);
  });
  const stop = () => {
    last = null;
  };
  maskCanvas.addEventListener("pointerup", stop);
  maskCanvas.addEventListener("pointercancel", stop);
}

// --- progress ------------------------------------------------------------------------------------------------

function setProgress(fraction) {
  const percent = Math.round(Math.min(1, Math.max(0, fraction)) * 100);
  const bar = $("progress-bar");
  bar.style.width = `${percent}%`;
  bar.setAttribute("aria-valuenow", String(percent));
}

function showProgress(progress) {
  setProgress(progress.progress);
  const s = progress.state || {};
  const parts = [];
  if (s.sampling_steps) parts.push(`step ${s.sampling_step}/${s.sampling_steps}`);
  if (s.job_count > 1) parts.push(`image ${s.job_no + 1}/${s.job_count}`);
  if (progress.eta_relative > 0) parts.push(`ETA ${progress.eta_relative.toFixed(1)} s`);
  $("progress-text").textContent = progress.textinfo || parts.join(", ");
  if (progress.current_image) {
    $("preview").src = pngUrl(progress.current_image);
    $("preview").hidden = false;
  }
}

// Polls until run `run` ends; a failed poll is skipped (the request itself reports real failures).
async function pollProgress(run) {
  while (state.running && state.run === run) {
    try {
      const progress = await api("/sdapi/v1/progress");
      if (state.running && state.run === run) showProgress(progress);
    } catch {
      // the next poll tries again
    }
    await sleep(POLL_MS);
  }
}

// --- generation and gallery ----------------------------------------------------------------------------------

function setRunning(running) {
  state.running = running;
  $("generate").disabled = running;
  $("interrupt").disabled = !running;
  form.setAttribute("aria-busy", String(running));
}

// `sent` is the request as this page sent it: the server's `parameters` leave the init image and mask out.
function addResults(data, mode, sent) {
  const info = typeof data.info === "string" ? JSON.parse(data.info) : data.info || {};
  const seeds = info.all_seeds || [];
  const texts = info.infotexts || [];
  const template = $("result-template");
  const made = { ...sent, ...data.parameters, init_images: sent.init_images, mask: sent.mask };
  const figures = data.images.map((b64, i) => {
    const figure = template.content.firstElementChild.cloneNode(true);
    const seed = seeds[i] ?? info.seed;
    figure.querySelector("[data-testid=result-image]").src = pngUrl(b64);
    figure.querySelector("[data-testid=seed]").textContent = String(seed);
    figure.querySelector("[data-testid=infotext]").textContent = texts[i] ?? "";
    figure.querySelector("[data-testid=reuse]").addEventListener("click", () => reuse(mode, made, seed));
    return figure;
  });
  $("gallery").prepend(...figures);
}

async function reuse(mode, parameters, seed) {
  clearError();
  form.querySelector(`input[name=mode][value=${mode}]`).checked = true;
  showMode();
  try {
    if (parameters.init_images) await setInitImage(parameters.init_images[0]);
    if (parameters.mask) await setMask(parameters.mask);
  } catch (error) {
    showError(error.message);
  }
  for (const name of [...COMMON_FIELDS, "denoising_strength", "mask_blur"]) setField(name, parameters[name]);
  setField("seed", seed);
  $("prompt").focus();
}

async function generate(event) {
  event.preventDefault();
  if (state.running) return;
  clearError();
  const mode = currentMode();
  let request;
  try {
    request = readRequest(mode);
  } catch (error) {
    showError(error.message);
    return;
  }
  const run = ++state.run;
  setRunning(true);
  setProgress(0);
  $("progress-text").textContent = "Waiting for the server…";
  const polling = pollProgress(run);
  try {
    const data = await api(mode === "txt2img" ? "/sdapi/v1/txt2img" : "/sdapi/v1/img2img", request);
    addResults(data, mode, request);
    setProgress(1);
    $("progress-text").textContent = "Done.";
  } catch (error) {
    setProgress(0);
    $("progress-text").textContent = "";
    showError(error.message, error.field);
  } finally {
    setRunning(false);
    $("preview").hidden = true;
    await polling;
  }
}

async function interrupt() {
  try {
    await api("/sdapi/v1/interrupt", {});
  } catch (error) {
    showError(error.message);
  }
}

async function setup() {
  form.addEventListener("submit", generate);
  form.querySelectorAll("input[name=mode]").forEach((el) => el.addEventListener("change", showMode));
  $("interrupt").addEventListener("click", interrupt);
  $("init-image").addEventListener("change", onInitFile);
  $("clear-mask").addEventListener("click", clearMask);
  setupBrush();
  showMode();
  try {
    const [samplers, schedulers, model] = await Promise.all(
      ["/sdapi/v1/samplers", "/sdapi/v1/schedulers", "/ldm/v1/model"].map((path) => api(path)),
    );
    fillSelect($("sampler"), samplers, (s) => s.name);
    if (samplers.some((s) => s.name === DEFAULT_SAMPLER)) setField("sampler_name", DEFAULT_SAMPLER);
    fillSelect($("scheduler"), schedulers, (s) => s.label || s.name);
    $("model-title").textContent = model.title;
    for (const name of ["width", "height"]) {
      field(name).step = String(model.size_multiple);
      field(name).min = String(model.size_multiple);
      setField(name, model[`default_${name}`]);
    }
    document.body.dataset.ready = "true";
  } catch (error) {
    showError(`Could not load the server's options: ${error.message}`);
  }
}

setup();
