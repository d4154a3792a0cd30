// normserve web demo: plain JS, no build step, no dependencies. Talks to the same routes as any
// client: /classify, /features, /reconstruct (multipart field "file") and /v2/... for metadata.
"use strict";

(() => {
  const MAX_SIDE = 512; // larger images are downscaled here, in the browser, before the demo
  const TOP_K = 5; // the server's default too: min(5, the model's classes)
  const DEBOUNCE_MS = 120;
  const LEVELS = ["P3", "P4", "P5"];
  // viridis, sampled at 9 evenly spaced stops
  const VIRIDIS = [
    [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
  ];

  const KEY_STORAGE = "normserve.apiKey"; // only when the server has NORMSERVE_API_KEY set
  const $ = (id) => document.getElementById(id);
  const state = {
    run: 0, // increases with each new image; late answers for an older image are dropped
    original: null, // ImageData of the (possibly downscaled) original, alpha composited on white
    normals: null, // a fixed N(0, 1) field per image, so moving σ only rescales the same noise
    source: null, // PNG blob of the original, what /classify and /features get
    denoiseSeq: 0,
    controller: null,
    timer: 0,
    denoisedUrl: null,
    models: new Map(), // name -> /v2/models/{name} metadata
    // Which model each image route runs and whether it is served (/ui/routes); until it is known,
    // both are assumed, so an old server without that route still gets the full page.
    routes: { classifier: { served: true }, denoiser: { served: true } },
    last: null, // {blob, name} of the last image, to run again once a key is entered
  };

  class ApiError extends Error {}

  // ---------- status and errors ----------
  function setStatus(text) {
    $("status").textContent = text;
  }
  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = false;
  }
  function clearError() {
    const el = $("error");
    el.textContent = "";
    el.hidden = true;
  }
  function reportError(err) {
    if (err && err.name === "AbortError") return;
    showError(err instanceof ApiError ? err.message : `Something went wrong in the page: ${err && err.message ? err.message : err}`);
    setStatus("Failed; see the error message.");
  }

  // ---------- API ----------
  function imageForm(blob, name) {
    const form = new FormData();
    form.append("file", blob, name || "image.png");
    return form;
  }

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      return ""; // storage disabled: the page works without a key
    }
  }

  function showKeyForm() {
    const form = $("key-form");
    if (form.hidden) {
      form.hidden = false;
      $("api-key").value = storedKey();
    }
  }

  async function api(path, { body, accept = "application/json", signal, okStatuses = [] } = {}) {
    let res;
    const headers = { Accept: accept };
    const key = storedKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    try {
      res = await fetch(path, { method: body ? "POST" : "GET", body, signal, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(`Could not reach the server for ${path} (${err.message}). Is it still running?`);
    }
    if (!res.ok && !okStatuses.includes(res.status)) {
      let detail = res.statusText || "error";
      try {
        const json = await res.json();
        if (json && typeof json.error === "string") detail = json.error;
      } catch (_) {
        // not JSON: keep the status text
      }
      if (res.status === 401) {
        showKeyForm();
        detail += key ? " Check the API key above." : " Enter the server's API key above.";
      }
      throw new ApiError(`${path.split("?")[0]} failed (HTTP ${res.status}): ${detail}`);
    }
    return res;
  }

  // ---------- models panel ----------
  function cell(row, text, className, label) {
    const td = document.createElement("td");
    td.textContent = text;
    if (label) td.dataset.label = label;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  // ---------- which panels: only those of the models this server serves ----------
  const PANELS = [
    ["classify-panel", "classifier", (k) => (k > 1 ? `Top-${k} classes` : "Top class")],
    ["denoise-panel", "denoiser", () => "Denoising"],
    ["features-panel", "classifier", () => "Feature pyramid"],
  ];

  function topK() {
    const meta = state.models.get(state.routes.classifier.model);
    const classes = meta && Array.isArray(meta.labels) ? meta.labels.length : TOP_K;
    return Math.min(TOP_K, classes);
  }

  function showServedPanels() {
    let step = 2; // 1 is the image
    for (const [id, role, title] of PANELS) {
      const served = state.routes[role].served;
      $(id).hidden = !served;
      if (served) $(id).querySelector("h2").textContent = `${step++}. ${title(topK())}`;
    }
    $("predictions").setAttribute("aria-label", `Top-${topK()} predicted classes`);
    const absent = [];
    for (const [role, what] of [["classifier", "classifier"], ["denoiser", "denoiser"]]) {
      const r = state.routes[role];
      if (!r.served) absent.push(`the ${what} (${r.model}; ${r.routes.join(", ")})`);
    }
    const el = $("absent");
    el.textContent = absent.length
      ? `Not served here: ${absent.join(" and ")}. The page shows only what this server serves; ` +
        "its model repository holds no ready model of that name."
      : "";
    el.hidden = !absent.length;
  }

  async function loadRoutes() {
    try {
      state.routes = await (await api("/ui/routes")).json();
    } catch (err) {
      reportError(err);
    }
  }

  async function loadModels() {
    const tbody = $("models").tBodies[0];
    await loadRoutes();
    try {
      const ready = await (await api("/v2/health/ready", { okStatuses: [503] })).json();
      const names = [...new Set(ready.models.map((m) => m.name))];
      const rows = await Promise.all(
        names.map(async (name) => {
          try {
            return { name, meta: await (await api(`/v2/models/${encodeURIComponent(name)}`)).json() };
          } catch (err) {
            return { name, error: err.message };
          }
        }),
      );
      tbody.replaceChildren();
      for (const { name, meta, error } of rows) {
        const tr = document.createElement("tr");
        tr.dataset.model = name;
        const th = document.createElement("th");
        th.scope = "row";
        th.textContent = name;
        tr.appendChild(th);
        if (error) {
          const td = cell(tr, error, "warn");
          td.colSpan = 4;
        } else {
          state.models.set(name, meta);
          cell(tr, meta.task, "", "Task");
          cell(tr, meta.versions.length ? meta.versions.join(", ") : "none ready", "", "Versions");
          cell(tr, meta.execution_provider, "mono", "Provider");
          cell(tr, meta.trained ? "trained" : "untrained (random init)", meta.trained ? "" : "warn", "Weights");
          if (meta.task === "classification") $("classify-untrained").hidden = meta.trained;
          if (meta.task === "denoising") $("denoise-untrained").hidden = meta.trained;
        }
        tbody.appendChild(tr);
      }
      if (!rows.length) tbody.innerHTML = '<tr><td colspan="5">The server lists no models.</td></tr>';
      showServedPanels();
      $("models-panel").dataset.state = "done";
      if (!state.original) setStatus(ready.ready ? "Ready. Pick an image or a sample." : "The server is not ready yet; some models are still loading.");
    } catch (err) {
      tbody.innerHTML = '<tr><td colspan="5">Model information is unavailable.</td></tr>';
      reportError(err);
    }
  }

  function modelLabel(name, version) {
    const meta = state.models.get(name);
    return `${name} v${version}` + (meta ? ` · ${meta.execution_provider}` : "");
  }

  // ---------- image input ----------
  function resetResults() {
    $("predictions").replaceChildren();
    $("classify-empty").hidden = false;
    $("classify-model").hidden = true;
    for (const id of ["original", "noisy", ...LEVELS.map((l) => `heat-${l}`)]) {
      const c = $(id);
      c.width = 1;
      c.height = 1;
    }
    $("denoised").hidden = true;
    $("denoised-empty").hidden = false;
    $("psnr-noisy").textContent = "–";
    $("psnr-denoised").textContent = "–";
    for (const l of LEVELS) $(`heat-${l}-caption`).textContent = l;
    for (const id of ["classify-panel", "denoise-panel", "features-panel"]) delete $(id).dataset.state;
    $("denoise-panel").classList.add("empty");
    $("features-panel").classList.add("empty");
    $("image-info").hidden = true;
  }

  function canvasToBlob(canvas) {
    return new Promise((resolve, reject) =>
      canvas.toBlob((b) => (b ? resolve(b) : reject(new Error("could not encode the canvas as PNG"))), "image/png"),
    );
  }

  function gaussianField(n, seed) {
    // mulberry32 PRNG + Box-Muller: deterministic per image
    let a = seed >>> 0;
    const rand = () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
    const z = new Float32Array(n);
    for (let i = 0; i < n; i += 2) {
      const r = Math.sqrt(-2 * Math.log(1 - rand()));
      const theta = 2 * Math.PI * rand();
      z[i] = r * Math.cos(theta);
      if (i + 1 < n) z[i + 1] = r * Math.sin(theta);
    }
    return z;
  }

  async function loadBlob(blob, name) {
    const run = ++state.run;
    state.last = { blob, name };
    clearError();
    resetResults();
    state.original = null;
    setStatus(`Reading ${name}…`);
    let bitmap = null;
    try {
      bitmap = await createImageBitmap(blob);
    } catch (_) {
      bitmap = null;
    }
    if (run !== state.run) return;

    if (!bitmap) {
      // The browser cannot decode it: let the server judge the file and show what it says.
      setStatus(`Sending ${name} to the server…`);
      try {
        if (!state.routes.classifier.served) throw new ApiError(`Your browser cannot display ${name}; pick a PNG, JPEG, WebP, BMP or GIF.`);
        await classify(blob, name, run);
        await features(blob, name, run);
        if (run !== state.run) return;
        showError(`Your browser cannot display ${name}, so the denoising demo needs another image (classification and features above came from the server).`);
        setStatus(`Classified ${name}.`);
      } catch (err) {
        if (run === state.run) reportError(err);
      }
      return;
    }

    const { width: bw, height: bh } = bitmap;
    const scale = Math.min(1, MAX_SIDE / Math.max(bw, bh));
    const w = Math.max(1, Math.round(bw * scale));
    const h = Math.max(1, Math.round(bh * scale));
    const canvas = $("original");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.fillStyle = "#fff"; // alpha is composited on white, as the server does
    ctx.fillRect(0, 0, w, h);
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, 0, 0, w, h);
    bitmap.close();
    state.original = ctx.getImageData(0, 0, w, h);
    $("denoise-panel").classList.remove("empty");
    state.normals = gaussianField(w * h * 3, 0x5eed ^ (w * 73856093) ^ (h * 19349663));
    state.source = await canvasToBlob(canvas);
    if (run !== state.run) return;

    const info = $("image-info");
    info.textContent =
      scale < 1
        ? `${name}: ${bw}×${bh} px, downscaled in your browser to ${w}×${h} px.`
        : `${name}: ${w}×${h} px.`;
    info.hidden = false;

    const { classifier, denoiser } = state.routes;
    const work = [];
    if (classifier.served) work.push(classify(state.source, "image.png", run), features(state.source, "image.png", run));
    if (denoiser.served) work.push(denoise());
    const doing = [classifier.served && "classifying", denoiser.served && "denoising"].filter(Boolean).join(" and ") || "reading";
    setStatus(`${doing[0].toUpperCase()}${doing.slice(1)} ${name}…`);
    const results = await Promise.allSettled(work);
    if (run !== state.run) return;
    const failed = results.filter((r) => r.status === "rejected" && r.reason && r.reason.name !== "AbortError");
    if (failed.length) {
      showError(failed.map((r) => (r.reason instanceof ApiError ? r.reason.message : String(r.reason))).join("\n"));
      setStatus("Some requests failed; see the error message.");
    } else {
      setStatus(`Done: ${name}.`);
    }
  }

  async function loadSample(button) {
    const src = button.dataset.src;
    const name = src.split("/").pop();
    try {
      const res = await api(src, { accept: "image/png" });
      await loadBlob(await res.blob(), name);
    } catch (err) {
      reportError(err);
    }
  }

  // ---------- classification ----------
  async function classify(blob, name, run) {
    const panel = $("classify-panel");
    panel.setAttribute("aria-busy", "true");
    try {
      const res = await api(`/classify?top_k=${topK()}`, { body: imageForm(blob, name) });
      const json = await res.json();
      if (run !== state.run) return;
      renderPredictions(json);
      panel.dataset.state = "done";
    } finally {
      panel.setAttribute("aria-busy", "false");
    }
  }

  function renderPredictions(json) {
    const list = $("predictions");
    list.replaceChildren();
    for (const p of json.predictions) {
      const li = document.createElement("li");
      li.className = "bar-row";
      const pct = (100 * p.probability).toFixed(1);
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = p.label;
      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0.5, 100 * p.probability)}%`;
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = `${pct}%`;
      li.append(label, track, value);
      list.appendChild(li);
    }
    $("classify-empty").hidden = true;
    $("classify-untrained").hidden = json.trained;
    const m = $("classify-model");
    m.textContent = `${modelLabel(json.model, json.version)} · input ${json.input.width}×${json.input.height} ${json.input.format}`;
    m.hidden = false;
  }

  // ---------- feature pyramid ----------
  async function features(blob, name, run) {
    const panel = $("features-panel");
    panel.setAttribute("aria-busy", "true");
    try {
      const res = await api("/features", { body: imageForm(blob, name) });
      const json = await res.json();
      if (run !== state.run) return;
      for (const level of json.levels) renderHeatmap(level);
      panel.classList.remove("empty");
      panel.dataset.state = "done";
    } finally {
      panel.setAttribute("aria-busy", "false");
    }
  }

  function decodeFloat32(b64) {
    const bin = atob(b64);
    const view = new DataView(new ArrayBuffer(bin.length));
    for (let i = 0; i < bin.length; i++) view.setUint8(i, bin.charCodeAt(i));
    const out = new Float32Array(bin.length / 4);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true); // little-endian
    return out;
  }

  function colormap(t) {
    const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i;
    const a = VIRIDIS[i];
    const b = VIRIDIS[i + 1];
    return [a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f];
  }

  function renderHeatmap(level) {
    const canvas = $(`heat-${level.name}`);
    if (!canvas) return;
    const [, c, h, w] = level.shape;
    const data = decodeFloat32(level.data);
    const hw = h * w;
    const mean = new Float32Array(hw);
    for (let k = 0; k < c; k++) for (let p = 0; p < hw; p++) mean[p] += data[k * hw + p];
    let lo = Infinity;
    let hi = -Infinity;
    for (let p = 0; p < hw; p++) {
      mean[p] /= c;
      if (mean[p] < lo) lo = mean[p];
      if (mean[p] > hi) hi = mean[p];
    }
    const span = hi - lo || 1;
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(w, h);
    for (let p = 0; p < hw; p++) {
      const [r, g, b] = colormap(hi > lo ? (mean[p] - lo) / span : 0.5);
      img.data.set([r, g, b, 255], 4 * p);
    }
    ctx.putImageData(img, 0, 0);
    canvas.setAttribute("aria-label", `${level.name} heatmap, ${w}×${h}, channel mean from ${lo.toPrecision(3)} to ${hi.toPrecision(3)}`);
    $(`heat-${level.name}-caption`).textContent = `${level.name} · stride ${level.stride} · ${c} ch · ${w}×${h}`;
  }

  function drawLegend() {
    const canvas = $("legend");
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(canvas.width, 1);
    for (let x = 0; x < canvas.width; x++) {
      const [r, g, b] = colormap(x / (canvas.width - 1));
      img.data.set([r, g, b, 255], 4 * x);
    }
    ctx.putImageData(img, 0, 0);
  }

  // ---------- denoising ----------
  function psnr(a, b) {
    let sum = 0;
    let n = 0;
    for (let i = 0; i < a.length; i += 4) {
      for (let k = 0; k < 3; k++) {
        const d = a[i + k] - b[i + k];
        sum += d * d;
      }
      n += 3;
    }
    const mse = sum / n;
    return mse === 0 ? Infinity : 10 * Math.log10((255 * 255) / mse);
  }
  const formatPsnr = (v) => (Number.isFinite(v) ? `${v.toFixed(2)} dB` : "∞ dB");

  function noisyImage(sigma) {
    const src = state.original.data;
    const out = new ImageData(state.original.width, state.original.height);
    const dst = out.data; // Uint8ClampedArray: rounds and clips to 0..255
    const z = state.normals;
    for (let i = 0, j = 0; i < src.length; i += 4, j += 3) {
      dst[i] = src[i] + sigma * z[j];
      dst[i + 1] = src[i + 1] + sigma * z[j + 1];
      dst[i + 2] = src[i + 2] + sigma * z[j + 2];
      dst[i + 3] = 255;
    }
    return out;
  }

  function scheduleDenoise() {
    $("sigma-value").textContent = $("sigma").value;
    if (!state.original || !state.routes.denoiser.served) return;
    clearTimeout(state.timer);
    state.timer = setTimeout(() => {
      denoise().then(
        () => setStatus(`Denoised at σ = ${$("sigma").value}.`),
        (err) => reportError(err),
      );
    }, DEBOUNCE_MS);
  }

  async function denoise() {
    if (!state.original) return;
    const sigma = Number($("sigma").value);
    const seq = ++state.denoiseSeq;
    if (state.controller) state.controller.abort();
    const controller = (state.controller = new AbortController());
    const panel = $("denoise-panel");
    panel.setAttribute("aria-busy", "true");
    panel.dataset.state = "busy";

    const { width: w, height: h } = state.original;
    const noisy = noisyImage(sigma);
    const canvas = $("noisy");
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").putImageData(noisy, 0, 0);
    $("psnr-noisy").textContent = formatPsnr(psnr(state.original.data, noisy.data));
    $("psnr-denoised").textContent = "…";

    try {
      const blob = await canvasToBlob(canvas);
      const res = await api("/reconstruct", { body: imageForm(blob, "noisy.png"), accept: "image/png", signal: controller.signal });
      const png = await res.blob();
      if (seq !== state.denoiseSeq) return;
      const img = $("denoised");
      const url = URL.createObjectURL(png);
      img.src = url;
      await img.decode();
      if (state.denoisedUrl) URL.revokeObjectURL(state.denoisedUrl);
      state.denoisedUrl = url;
      if (seq !== state.denoiseSeq) return;
      img.hidden = false;
      $("denoised-empty").hidden = true;
      const scratch = document.createElement("canvas");
      scratch.width = w;
      scratch.height = h;
      const sctx = scratch.getContext("2d", { willReadFrequently: true });
      sctx.drawImage(img, 0, 0, w, h);
      const out = sctx.getImageData(0, 0, w, h);
      $("psnr-denoised").textContent = formatPsnr(psnr(state.original.data, out.data));
      img.alt = `Denoised image (σ = ${sigma}), PSNR ${$("psnr-denoised").textContent}`;
      panel.dataset.sigma = String(sigma);
      panel.dataset.state = "done";
    } catch (err) {
      if (seq === state.denoiseSeq && err.name !== "AbortError") {
        $("psnr-denoised").textContent = "–";
        panel.dataset.state = "error";
      }
      throw err;
    } finally {
      if (seq === state.denoiseSeq) panel.setAttribute("aria-busy", "false");
    }
  }

  // ---------- wiring ----------
  function init() {
    const drop = $("dropzone");
    const input = $("file");
    drop.addEventListener("click", () => input.click());
    drop.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        input.click();
      }
    });
    drop.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("dragging");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("dragging");
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (file) loadBlob(file, file.name).catch(reportError);
    });
    input.addEventListener("change", () => {
      const file = input.files[0];
      if (file) loadBlob(file, file.name).catch(reportError);
      input.value = ""; // picking the same file again fires change again
    });
    document.addEventListener("paste", (e) => {
      const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
      if (file) loadBlob(file, file.name || "pasted image").catch(reportError);
    });
    for (const button of document.querySelectorAll(".sample")) {
      button.addEventListener("click", () => loadSample(button));
    }
    $("sigma").addEventListener("input", scheduleDenoise);
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("api-key").value.trim();
      try {
        if (key) sessionStorage.setItem(KEY_STORAGE, key);
        else sessionStorage.removeItem(KEY_STORAGE);
      } catch (_) {
        showError("This browser does not allow the page to keep the key (sessionStorage is disabled).");
        return;
      }
      clearError();
      if (state.last) loadBlob(state.last.blob, state.last.name).catch(reportError);
      else setStatus(key ? "API key set. Pick an image or a sample." : "API key cleared.");
    });
    if (storedKey()) showKeyForm();
    drawLegend();
    loadModels();
  }

  init();
})();
