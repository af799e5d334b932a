// The genserve console: a client of the public HTTP API and nothing else.
// Every text that came from a user or the service is set with textContent, never as HTML.
import { fetchEventSource } from "./vendor/fetch-event-source/index.js";

const $ = (id) => document.getElementById(id);
const KEY = "genserve.apiKey";
// What the console saw, for people debugging it and for its tests: progress events per job.
window.genserve = { progress: {}, ready: false };

// --- the API, with the key from this tab's session storage --------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(typeof body?.detail === "string" ? body.detail : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, { method = "GET", body } = {}) {
  const headers = authHeaders();
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401) {
    askForKey("The service needs an API key (or the one given was refused).");
  }
  if (!response.ok) {
    let detail = null;
    try { detail = await response.json(); } catch { /* not JSON */ }
    throw new ApiError(response.status, detail);
  }
  return response;
}

const getJson = async (path) => (await api(path)).json();

// Media through blob URLs: <img> and <video> cannot send an Authorization header.
const blobUrls = new Map();
async function mediaUrl(path) {
  if (!blobUrls.has(path)) {
    const blob = await (await api(path)).blob();
    blobUrls.set(path, URL.createObjectURL(blob));
  }
  return blobUrls.get(path);
}

function askForKey(message) {
  $("key-button").hidden = false;
  $("key-error").textContent = message || "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

function setupKey() {
  $("key-button").addEventListener("click", () => askForKey(""));
  $("key-form").addEventListener("submit", () => {
    sessionStorage.setItem(KEY, $("key-input").value.trim());
    $("key-input").value = "";
    blobUrls.clear();
    route();
  });
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    $("key-dialog").close();
  });
}

// --- small DOM helpers ---------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

const fmt = (value, digits = 3) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));

// --- catalogue: models, LoRAs, controls ------------------------------------------------------------

const catalogue = { models: [], defaultModel: null, videoModels: [], defaultVideoModel: null, loras: [], controls: [] };

async function loadCatalogue() {
  const [models, loras, controls] = await Promise.all([
    getJson("/v1/models"), getJson("/v1/loras"), getJson("/v1/controls"),
  ]);
  catalogue.models = models.models;
  catalogue.defaultModel = models.default_model;
  catalogue.videoModels = models.video_models || [];
  catalogue.defaultVideoModel = models.default_video_model;
  const videoSelect = $("f-video_model");
  videoSelect.replaceChildren(...catalogue.videoModels.map((model) => el("option", {
    value: model.id, text: model.id === catalogue.defaultVideoModel ? `${model.id} (default)` : model.id })));
  videoSelect.value = catalogue.defaultVideoModel ?? "";
  onVideoModelChange();
  catalogue.loras = loras.loras;
  catalogue.controls = controls.controls;
  const select = $("f-model");
  select.replaceChildren(...catalogue.models.map((model) =>
    el("option", { value: model.id, text: model.id === catalogue.defaultModel ? `${model.id} (default)` : model.id })));
  select.value = catalogue.defaultModel;
  onModelChange();
}

const currentModel = () => catalogue.models.find((model) => model.id === $("f-model").value);

function onModelChange() {
  const model = currentModel();
  if (!model) return;
  const steps = $("f-num_inference_steps");
  steps.min = model.min_steps; steps.max = model.max_steps; steps.placeholder = model.default_steps;
  $("hint-num_inference_steps").textContent = `${model.min_steps}-${model.max_steps}, default ${model.default_steps}`;
  const [low, high] = model.guidance_range;
  const guidance = $("f-guidance_scale");
  guidance.min = low; guidance.max = high; guidance.placeholder = model.default_guidance;
  guidance.disabled = low === high;
  $("hint-guidance_scale").textContent = low === high ? `fixed at ${low} (distilled)` : `${low}-${high}`;
  $("f-width").placeholder = model.default_width;
  $("f-height").placeholder = model.default_height;
  $("hint-model").textContent = model.description;
  $("hint-negative_prompt").textContent = model.uses_negative_prompt ? "" : `${model.id} does not use a negative prompt`;
  const families = catalogue.loras.filter((lora) => lora.family === model.family);
  $("hint-loras").textContent = model.supports_loras
    ? (families.length ? `${families.length} available for ${model.family}` : `none configured for ${model.family}`)
    : `${model.id} takes no LoRAs`;
  $("add-lora").disabled = !model.supports_loras || families.length === 0;
  $("loras").replaceChildren();
  showReferences();
  const controlTypes = model.control_types || [];
  $("control-fieldset").hidden = controlTypes.length === 0 || kind() !== "image";
  $("f-control-type").replaceChildren(el("option", { value: "", text: "none" }),
    ...controlTypes.map((type) => el("option", { value: type, text: type })));
}

const currentVideoModel = () => catalogue.videoModels.find((model) => model.id === $("f-video_model").value);

// What the chosen video model takes: its frame and size rules, and whether it animates an image,
// makes text-to-video natively (the prompt goes to it, also beside an image) or through a keyframe.
function onVideoModelChange() {
  const model = currentVideoModel();
  if (!model) return;
  const mode = model.text_to_video === "native" ? "text-to-video from the prompt"
    : model.text_to_video === "keyframe" ? "text-to-video through a keyframe drawn from the prompt" : "no text-to-video";
  $("hint-video_model").textContent = `${model.description} ${model.frames}; sizes: ${model.size}; ${mode}.`;
  $("f-num_frames").placeholder = model.default_num_frames;
  $("f-fps").placeholder = model.default_fps;
  if (kind() === "video") {
    $("f-width").placeholder = model.default_width;
    $("f-height").placeholder = model.default_height;
  }
}

function addLora(name = "", scale = 1) {
  const model = currentModel();
  const row = el("div", { class: "row lora" });
  const select = el("select", { "aria-label": "LoRA" },
    ...catalogue.loras.filter((lora) => lora.family === model.family)
      .map((lora) => el("option", { value: lora.name, text: lora.name })));
  if (name) select.value = name;
  const weight = el("input", { type: "number", step: "0.1", min: "-2", max: "2", value: String(scale),
                                "aria-label": "LoRA scale" });
  const remove = el("button", { type: "button", text: "Remove" });
  remove.addEventListener("click", () => row.remove());
  row.append(select, weight, remove);
  $("loras").append(row);
}

// --- the generate form ---------------------------------------------------------------------------

const kind = () => document.querySelector('input[name="kind"]:checked').value;

function showKind() {
  const current = kind();
  for (const node of document.querySelectorAll("[data-kind]")) {
    node.hidden = !node.dataset.kind.split(" ").includes(current);
  }
  $("control-fieldset").hidden = current !== "image" || !(currentModel()?.control_types || []).length;
  $("references-fieldset").hidden = current !== "image" || !currentModel()?.reference_images;
  $("submit").textContent = current === "image" ? "Generate" : "Animate";
  if (current === "video") onVideoModelChange();
  else if (currentModel()) {
    $("f-width").placeholder = currentModel().default_width;
    $("f-height").placeholder = currentModel().default_height;
  }
}

function numberField(name) {
  const value = $(`f-${name}`).value.trim();
  return value === "" ? undefined : Number(value);
}

function textField(name) {
  const value = $(`f-${name}`).value;
  return value.trim() === "" ? undefined : value;
}

function fileAsBase64(input) {
  const file = input.files[0];
  if (!file) return Promise.resolve(undefined);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));  // a data: URL; the API accepts the prefix
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// --- reference images: earlier jobs' images picked in the gallery, sent as {job_id, index} --------

const references = [];

function showReferences() {
  const model = currentModel();
  const limit = model?.reference_images || 0;
  $("references-fieldset").hidden = limit === 0 || kind() !== "image";
  $("hint-references").textContent = limit
    ? `${model.id} takes up to ${limit}: pick them in the Gallery ("Use as reference"); the prompt then says what `
      + "to do with them, e.g. \"make it night\"."
    : "";
  $("references").replaceChildren(...references.map((ref, position) => {
    const remove = el("button", { type: "button", text: "remove", "aria-label": `Remove reference ${position + 1}` });
    remove.addEventListener("click", () => { references.splice(position, 1); showReferences(); });
    return el("li", { class: "reference" }, el("span", { text: `job ${ref.job_id}, image ${ref.index}` }), remove);
  }));
}

function toggleReference(jobId, index, button) {
  const at = references.findIndex((ref) => ref.job_id === jobId && ref.index === index);
  if (at >= 0) references.splice(at, 1);
  else references.push({ job_id: jobId, index });
  button.textContent = at >= 0 ? "Use as reference" : "Reference (picked)";
  button.setAttribute("aria-pressed", String(at < 0));
  showReferences();
}

async function controlOf() {
  const type = $("f-control-type").value;
  if (!type || $("control-fieldset").hidden) return undefined;
  return {
    type,
    image: await fileAsBase64($("f-control-image")),
    conditioning_scale: Number($("f-control-scale").value),
    preprocess: $("f-control-preprocess").checked,
  };
}

async function requestOf() {
  const common = { seed: numberField("seed"), num_inference_steps: numberField("num_inference_steps"),
                   width: numberField("width"), height: numberField("height") };
  if (kind() === "video") {
    const image = await fileAsBase64($("f-image"));
    const model = currentVideoModel();
    // Beside an image, only a native text-to-video model (ltx) takes the prompt.
    const prompt = image && model?.text_to_video !== "native" ? undefined : textField("prompt");
    const interpolate = Number($("f-interpolate").value);
    return { ...common, model: model?.id, image, prompt, num_frames: numberField("num_frames"),
             fps: numberField("fps"), interpolate: interpolate > 1 ? interpolate : undefined };
  }
  const loras = [...document.querySelectorAll("#loras .lora")].map((row) => ({
    name: row.querySelector("select").value, scale: Number(row.querySelector("input").value) }));
  return {
    ...common,
    prompt: $("f-prompt").value,
    negative_prompt: textField("negative_prompt"),
    model: $("f-model").value || undefined,
    style: $("f-style").value || undefined,
    quality: $("f-quality").value,
    enhance: $("f-enhance").checked,
    guidance_scale: $("f-guidance_scale").disabled ? undefined : numberField("guidance_scale"),
    num_images: numberField("num_images"),
    quality_metric: $("f-quality_metric").value || undefined,
    quality_threshold: numberField("quality_threshold"),
    max_attempts: numberField("max_attempts"),
    loras: loras.length ? loras : undefined,
    control: await controlOf(),
    reference_images: references.length && !$("references-fieldset").hidden ? [...references] : undefined,
  };
}

function clearErrors() {
  for (const node of document.querySelectorAll("#generate-form .error")) node.textContent = "";
  for (const node of document.querySelectorAll("#generate-form [aria-invalid]")) node.removeAttribute("aria-invalid");
}

// A 422's detail, each message beside the field it names (loc: ["body", "request", field, ...]).
function showErrors(error) {
  const detail = Array.isArray(error.body?.detail) ? error.body.detail : null;
  if (!detail) {
    $("err-form").textContent = error.message;
    return;
  }
  for (const item of detail) {
    const path = item.loc.filter((part) => part !== "body" && part !== "request");
    let field = path[0] === "keyframe" ? String(path[1] ?? "prompt") : String(path[0] ?? "form");
    if (field === "model" && kind() === "video") field = "video_model";
    const target = $(`err-${field}`) || $("err-form");
    target.textContent = target.textContent ? `${target.textContent} ${item.msg}` : item.msg;
    $(`f-${field}`)?.setAttribute("aria-invalid", "true");
    $(`f-${field}`)?.setAttribute("aria-describedby", `err-${field}`);
  }
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  $("submit").disabled = true;
  try {
    const request = await requestOf();
    const response = await api("/v1/jobs", { method: "POST", body: { kind: kind(), request } });
    const job = await response.json();
    sessionStorage.setItem(`genserve.request.${job.id}`, JSON.stringify({ kind: kind(), request }));
    location.hash = `#/jobs/${job.id}`;
  } catch (error) {
    if (error instanceof ApiError) showErrors(error);
    else $("err-form").textContent = String(error);
  } finally {
    $("submit").disabled = false;
  }
}

async function previewControl() {
  $("err-control").textContent = "";
  try {
    const control = await controlOf();
    if (!control) throw new Error("pick a control type and a reference picture first");
    const body = { ...control, model: $("f-model").value, width: numberField("width"), height: numberField("height") };
    const preview = await (await api("/v1/controls/preview", { method: "POST", body })).json();
    $("control-preview").src = `data:image/png;base64,${preview.b64_png}`;
    $("control-preview").hidden = false;
  } catch (error) {
    const detail = Array.isArray(error.body?.detail) ? error.body.detail.map((item) => item.msg).join(" ") : error.message;
    $("err-control").textContent = detail;
  }
}

function fillForm(saved) {
  document.querySelector(`input[name="kind"][value="${saved.kind}"]`).checked = true;
  const request = saved.request;
  if (request.model) $(saved.kind === "video" ? "f-video_model" : "f-model").value = request.model;
  if (saved.kind === "video") $("f-interpolate").value = String(request.interpolate ?? 1);
  onModelChange();
  showKind();
  for (const name of ["prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale",
                      "seed", "num_images", "quality_threshold", "max_attempts", "num_frames", "fps"]) {
    if ($(`f-${name}`)) $(`f-${name}`).value = request[name] ?? "";
  }
  for (const name of ["style", "quality_metric"]) $(`f-${name}`).value = request[name] ?? "";
  if (request.quality) $("f-quality").value = request.quality;
  if (request.enhance !== undefined) $("f-enhance").checked = request.enhance;
  for (const lora of request.loras || []) addLora(lora.name, lora.scale);
}

// --- a job's page: live progress, then results ---------------------------------------------------

let jobStream = null;

function stopStream() {
  if (jobStream) jobStream.abort();
  jobStream = null;
}

function showStatus(status) {
  $("job-state").textContent = status.state;
  $("job-cancel").hidden = !["queued", "running"].includes(status.state);
  const progress = status.progress;
  if (status.state === "queued" && status.queue_position) {
    $("job-stage").textContent = `position ${status.queue_position} in the queue`;
  } else if (progress) {
    $("job-stage").textContent = `${progress.stage}, round ${progress.round}`;
  } else {
    $("job-stage").textContent = "";
  }
  if (status.error) $("job-error").textContent = status.error;
}

function showProgress(jobId, progress) {
  const recorded = (window.genserve.progress[jobId] ||= []);
  recorded.push({ stage: progress.stage, round: progress.round, step: progress.step, steps: progress.steps,
                  preview: Boolean(progress.preview) });
  $("job-progress").max = progress.steps;
  $("job-progress").value = progress.step;
  const eta = progress.eta_s === null || progress.eta_s === undefined ? "" : `, about ${Math.ceil(progress.eta_s)} s left`;
  $("job-step").textContent = `step ${progress.step} of ${progress.steps} (${progress.stage}, round ${progress.round})${eta}`;
  $("job-stage").textContent = `${progress.stage}, round ${progress.round}`;
  if (progress.preview) {
    $("job-preview").src = progress.preview;  // a data: URL made by the service
    $("job-preview-figure").hidden = false;
  }
}

async function showJob(jobId) {
  for (const id of ["job-state", "job-stage", "job-step", "job-error", "job-link"]) $(id).textContent = "";
  $("job-result").replaceChildren();
  $("job-preview-figure").hidden = true;
  $("job-reuse").hidden = true;
  $("job-progress").value = 0;
  $("job-title").textContent = `Job ${jobId}`;
  $("job-link").append(el("a", { href: `#/jobs/${jobId}`, text: "link to this job" }));
  const status = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`);
  showStatus(status);
  if (["succeeded", "failed", "cancelled"].includes(status.state)) return finished(jobId, status);
  stopStream();
  const controller = new AbortController();
  jobStream = controller;
  // Not awaited: the page is ready once the status shows; the stream runs until the job ends.
  fetchEventSource(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
    headers: authHeaders(),
    signal: controller.signal,
    openWhenHidden: true,
    onmessage(message) {
      const data = JSON.parse(message.data);
      if (message.event === "progress") showProgress(jobId, data);
      if (message.event === "state") {
        $("job-state").textContent = data.state;
        $("job-cancel").hidden = !["queued", "running"].includes(data.state);
      }
    },
    onclose() { throw new Error("closed"); },  // the stream ends with the job: do not reconnect
    onerror(error) { throw error; },
  }).catch(() => {}).then(async () => {
    if (jobStream !== controller) return;  // the user went elsewhere
    const final = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`);
    showStatus(final);
    await finished(jobId, final);
  }).catch((error) => { $("job-error").textContent = error.message; });
}

function scoreTable(scores) {
  const rows = [["aesthetic", scores.aesthetic], ["alignment", scores.alignment], ["laion", scores.laion],
                ["combined", scores.combined]];
  for (const [name, value] of Object.entries(scores.aspects || {})) rows.push([`aspect: ${name}`, value]);
  for (const [name, value] of Object.entries(scores.perceptual || {})) rows.push([`pixels: ${name}`, value]);
  return el("table", { class: "scores" }, el("tbody", {}, ...rows.map(([name, value]) =>
    el("tr", {}, el("th", { scope: "row", text: name }), el("td", { text: fmt(value) })))));
}

async function downloadLink(url, name) {
  const link = el("a", { href: "#", text: `Download ${name}` });
  link.addEventListener("click", async (event) => {
    event.preventDefault();
    const anchor = el("a", { href: await mediaUrl(url), download: name });
    anchor.click();
  });
  return link;
}

async function finished(jobId, status) {
  stopStream();
  if (status.state !== "succeeded") return;
  $("job-progress").value = $("job-progress").max;
  const result = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}/result`);
  const saved = sessionStorage.getItem(`genserve.request.${jobId}`);
  $("job-reuse").hidden = false;
  $("job-reuse").onclick = async () => {
    if (!catalogue.models.length) await loadCatalogue();
    const full = saved ? JSON.parse(saved) : { kind: status.kind, request: await requestFromResult(status.kind, result) };
    location.hash = "#/generate";
    fillForm(full);
  };
  const box = $("job-result");
  if (status.kind === "video") {
    const video = el("video", { controls: "", preload: "auto", id: "result-video", "aria-label": "The generated video" });
    video.src = await mediaUrl(result.url);
    box.append(el("div", { class: "card" }, video,
      el("p", { text: `${result.model}: ${result.num_frames} frames at ${result.fps} fps` +
        (result.interpolate > 1 ? ` (${result.source_frames} generated, interpolated ${result.interpolate}x)` : "") +
        `, ${result.width}x${result.height}, seed ${result.seed}` }),
      await downloadLink(result.url, result.file)));
    return;
  }
  box.append(el("h3", { text: "Prompt" }),
    el("p", { class: "prompt", text: `You wrote: ${result.prompt}` }),
    el("p", { class: "prompt", text: `The model saw: ${result.enhanced_prompt}` }));
  const advice = result.prompt_advice;
  if (advice && advice.issues.length) {
    box.append(el("p", { text: `Prompt advice (score ${advice.score}/100):` }),
      el("ul", {}, ...advice.issues.map((issue) => el("li", { text: issue.message }))));
  }
  const images = el("div", { class: "images" });
  for (const image of result.images) {
    const picture = el("img", { alt: `Image with seed ${image.seed}` });
    picture.src = await mediaUrl(image.url);
    images.append(el("div", { class: "card result-image" }, picture,
      el("p", {}, el("span", { class: image.passed ? "passed" : "failed", text: image.passed ? "passed" : "missed the gate" }),
        document.createTextNode(` · seed ${image.seed}`)),
      scoreTable(image.scores), await downloadLink(image.url, image.file)));
  }
  box.append(el("h3", { text: "Images" }), images);
  const attempts = el("div", { class: "attempts" });
  for (const attempt of result.attempts) {
    const card = el("div", { class: "card attempt" },
      el("p", { text: `round ${attempt.attempt}, seed ${attempt.seed}` }),
      el("p", { class: attempt.passed ? "passed" : "failed", text: attempt.passed ? "passed" : "missed" }),
      scoreTable(attempt.scores));
    if (attempt.thumbnail) card.prepend(el("img", { src: attempt.thumbnail, alt: `Candidate with seed ${attempt.seed}` }));
    attempts.append(card);
  }
  box.append(el("h3", { text: "Every attempt" }), attempts);
}

async function requestFromResult(kind, result) {
  if (kind === "video") return { model: result.model, prompt: result.keyframe?.prompt ?? result.prompt,
                                 num_frames: result.source_frames || result.num_frames, fps: result.source_fps || result.fps,
                                 interpolate: result.interpolate, seed: result.seed };
  return { prompt: result.prompt, model: result.model, width: result.width, height: result.height,
           num_inference_steps: result.num_inference_steps, guidance_scale: result.guidance_scale,
           seed: result.images[0]?.seed, loras: result.loras };
}

async function cancelJob() {
  const jobId = location.hash.split("/")[2];
  try {
    const status = await (await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" })).json();
    showStatus(status);
  } catch (error) {
    $("job-error").textContent = error.message;
  }
}

// --- browsing: the job list and the gallery ------------------------------------------------------

const listing = { cursors: [null], page: 0 };

async function showJobs() {
  const params = new URLSearchParams({ limit: $("jobs-limit").value });
  if ($("jobs-state").value) params.set("state", $("jobs-state").value);
  const cursor = listing.cursors[listing.page];
  if (cursor) params.set("cursor", cursor);
  const page = await getJson(`/v1/jobs?${params}`);
  $("jobs-rows").replaceChildren(...page.jobs.map((job) => el("tr", { class: "job-row" },
    el("td", {}, el("a", { href: `#/jobs/${job.id}`, text: job.id })),
    el("td", { text: job.kind }), el("td", { text: job.state }),
    el("td", { text: new Date(job.created_at * 1000).toLocaleString() }))));
  listing.cursors[listing.page + 1] = page.next_cursor;
  $("jobs-next").disabled = !page.next_cursor;
  $("jobs-prev").disabled = listing.page === 0;
  $("jobs-page").textContent = `page ${listing.page + 1}`;
}

function resetListing() {
  listing.cursors = [null];
  listing.page = 0;
  showJobs();
}

const gallery = { cursor: null };

async function showGallery(more = false) {
  if (!more) {
    $("gallery").replaceChildren();
    gallery.cursor = null;
  }
  const params = new URLSearchParams({ state: "succeeded", limit: "12" });
  if (gallery.cursor) params.set("cursor", gallery.cursor);
  const page = await getJson(`/v1/jobs?${params}`);
  for (const job of page.jobs) {
    let imageIndex = 0;
    for (const file of job.files) {
      const video = file.content_type.startsWith("video/");
      const media = video
        ? el("video", { muted: "", loop: "", "aria-label": `Video of job ${job.id}` })
        : el("img", { alt: `Image of job ${job.id}` });
      media.src = await mediaUrl(file.url);
      const card = el("div", { class: "card" }, el("a", { href: `#/jobs/${job.id}` }, media));
      if (!video && job.kind === "image") {
        // Image i of the job's result: what {job_id, index} names in reference_images.
        const index = imageIndex++;
        const picked = references.some((ref) => ref.job_id === job.id && ref.index === index);
        const button = el("button", { type: "button", class: "use-reference", "aria-pressed": String(picked),
                                      text: picked ? "Reference (picked)" : "Use as reference" });
        button.addEventListener("click", () => toggleReference(job.id, index, button));
        card.append(button);
      }
      $("gallery").append(card);
    }
  }
  gallery.cursor = page.next_cursor;
  $("gallery-more").disabled = !page.next_cursor;
}

// --- routing -------------------------------------------------------------------------------------

async function route() {
  const [, view = "generate", id] = (location.hash || "#/generate").split("/");
  stopStream();
  const name = view === "jobs" && id ? "job" : view;
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${name}`;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  try {
    if (name === "job") await showJob(decodeURIComponent(id));
    else if (name === "jobs") await showJobs();
    else if (name === "gallery") await showGallery();
    else if (!catalogue.models.length) await loadCatalogue();
  } catch (error) {
    const target = name === "job" ? $("job-error") : $("err-form");
    target.textContent = error.message;
  }
}

function setup() {
  setupKey();
  $("generate-form").addEventListener("submit", submit);
  $("f-model").addEventListener("change", onModelChange);
  $("f-video_model").addEventListener("change", onVideoModelChange);
  for (const radio of document.querySelectorAll('input[name="kind"]')) radio.addEventListener("change", showKind);
  $("add-lora").addEventListener("click", () => addLora());
  $("control-preview-button").addEventListener("click", previewControl);
  $("job-cancel").addEventListener("click", cancelJob);
  $("jobs-state").addEventListener("change", resetListing);
  $("jobs-limit").addEventListener("change", resetListing);
  $("jobs-next").addEventListener("click", () => { listing.page += 1; showJobs(); });
  $("jobs-prev").addEventListener("click", () => { listing.page -= 1; showJobs(); });
  $("gallery-more").addEventListener("click", () => showGallery(true));
  window.addEventListener("hashchange", route);
  showKind();
  route().then(() => { window.genserve.ready = true; });
}

setup();
