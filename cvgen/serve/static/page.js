// The portrait page: choose a photo, pick a look, POST /predict, show and download the answer.
// No dependencies; served with a Content-Security-Policy that forbids inline script.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "cvgen-api-key";
  const FRAMINGS = { square: "square", "4:5": "4x5", "3:4": "3x4", "35x45": "passport" }; // in file names
  // where the server's `field` is shown: the block of the control concerned
  const FIELD_BLOCKS = {
    image: "photo-field",
    image_b64: "photo-field",
    image_url: "photo-field",
    look: "look-field",
    framing: "framing-field",
    strength: "strength-field",
    keep_face: "keep-face-field",
    prompt: "prompt-field",
    seed: "seed-field",
    lora: "lora-field",
  };
  const CONTROLS = {
    "photo-field": "photo",
    "look-field": "look",
    "framing-field": "framing",
    "strength-field": "strength",
    "keep-face-field": "keep-face",
    "prompt-field": "prompt",
    "seed-field": "seed",
    "lora-field": "lora",
    "key-field": "api-key",
    "generate-field": "generate",
  };

  const body = document.body;
  const el = {
    photo: $("photo"),
    drop: $("drop"),
    preview: $("preview"),
    dropText: $("drop-text"),
    photoName: $("photo-name"),
    look: $("look"),
    lookDescription: $("look-description"),
    framing: $("framing"),
    strength: $("strength"),
    strengthValue: $("strength-value"),
    keepFace: $("keep-face"),
    prompt: $("prompt"),
    seed: $("seed"),
    lora: $("lora"),
    loraField: $("lora-field"),
    settings: $("settings"),
    generate: $("generate"),
    status: $("status"),
    original: $("original"),
    originalEmpty: $("original-empty"),
    result: $("result"),
    resultEmpty: $("result-empty"),
    resultFrame: $("result-frame"),
    resultCaption: $("result-caption"),
    download: $("download"),
    again: $("again"),
    error: $("error"),
    keyForm: $("key-form"),
    apiKey: $("api-key"),
    changeKey: $("change-key"),
    docsLink: $("docs-link"),
  };
  const state = { file: null, photoUrl: null, resultUrl: null, looks: new Map(), busy: false };

  // --- the API key: asked once, kept for this tab (sessionStorage) ---
  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || "";
    } catch (e) {
      return "";
    }
  }

  function storeKey(key) {
    try {
      sessionStorage.setItem(KEY_STORE, key);
    } catch (e) {
      /* storage refused (private mode): the key lives until the page is left */
    }
    state.key = key;
  }

  function withKey(extra) {
    const headers = new Headers(extra || {});
    const key = state.key || storedKey();
    if (key) headers.set("X-API-Key", key);
    return headers;
  }

  function askKey(message) {
    el.keyForm.hidden = false;
    el.changeKey.hidden = true;
    el.apiKey.value = "";
    if (message) showError("key-field", message);
    el.apiKey.focus();
  }

  // --- errors: in words, next to the control concerned; nothing else is touched ---
  function showError(block, message) {
    clearError();
    const where = $(block) || $("generate-field");
    where.classList.add("invalid");
    where.appendChild(el.error);
    el.error.textContent = message;
    el.error.hidden = false;
    const details = where.closest("details");
    if (details) details.open = true;
    const control = $(CONTROLS[where.id]);
    if (control) {
      control.setAttribute("aria-invalid", "true");
      const described = (control.getAttribute("aria-describedby") || "").split(" ");
      if (!described.includes("error")) described.push("error");
      control.setAttribute("aria-describedby", described.filter(Boolean).join(" "));
    }
  }

  function clearError() {
    const where = el.error.parentElement;
    if (where) where.classList.remove("invalid");
    el.error.hidden = true;
    el.error.textContent = "";
    document.querySelectorAll("[aria-invalid]").forEach((c) => {
      c.removeAttribute("aria-invalid");
      const rest = (c.getAttribute("aria-describedby") || "").split(" ").filter((id) => id && id !== "error");
      if (rest.length) c.setAttribute("aria-describedby", rest.join(" "));
      else c.removeAttribute("aria-describedby");
    });
  }

  function sentence(text) {
    const t = String(text || "").trim();
    return t ? t.charAt(0).toUpperCase() + t.slice(1) + (/[.!?]$/.test(t) ? "" : ".") : "";
  }

  async function readError(response) {
    let detail = "";
    let field = null;
    try {
      const data = await response.json();
      detail = String(data.detail || "");
      field = data.field || null;
    } catch (e) {
      detail = response.statusText || "";
    }
    if (field && detail.startsWith(field + ": ")) detail = detail.slice(field.length + 2);
    // the API's names for the page's controls
    detail = detail.replace("keep_face=false", "turn off \u201cKeep my face as it is\u201d");
    return { status: response.status, detail: detail || "the server answered " + response.status, field };
  }

  function reportError(err) {
    if (err.status === 401) {
      askKey(sentence("The server did not accept the API key: " + err.detail));
      return;
    }
    if (err.status === 413) {
      showError("photo-field", sentence("This photo is too large for the server: " + err.detail));
      el.photo.focus();
      return;
    }
    const block = FIELD_BLOCKS[err.field] || "generate-field";
    const lead = { 504: "The server is busy; try again in a moment: ", 400: "", 415: "" }[err.status] || "";
    showError(block, sentence(lead + err.detail));
    const control = $(CONTROLS[block]);
    if (control && !control.disabled) control.focus();
  }

  // --- looks and LoRAs ---
  function framingName(value) {
    const option = Array.from(el.framing.options).find((o) => o.value === value);
    return option ? option.textContent : value;
  }

  function applyLook() {
    const look = state.looks.get(el.look.value);
    if (!look) return;
    el.lookDescription.textContent = look.description || "";
    el.strength.value = look.strength;
    showStrength();
    const framing = look.framing || body.dataset.defaultFraming || "square";
    el.framing.options[0].textContent = "As the look suggests (" + framingName(framing) + ")";
  }

  async function loadLooks() {
    let response;
    try {
      response = await fetch("looks", { headers: withKey({ Accept: "application/json" }) });
    } catch (e) {
      showError("look-field", "Cannot reach the server. Check the connection, then reload the page.");
      return;
    }
    if (response.status === 401) {
      const err = await readError(response);
      askKey(storedKey() || state.key ? sentence("The server did not accept this key: " + err.detail) : "");
      return;
    }
    if (!response.ok) {
      const err = await readError(response);
      showError("look-field", sentence("Could not load the looks: " + err.detail));
      return;
    }
    const looks = (await response.json()).looks || [];
    const chosen = el.look.value;
    el.look.replaceChildren();
    state.looks.clear();
    for (const look of looks) {
      state.looks.set(look.name, look);
      const label = (look.description || look.name).split(":")[0];
      el.look.appendChild(new Option(label, look.name));
    }
    if (chosen && state.looks.has(chosen)) el.look.value = chosen;
    applyLook();
    el.keyForm.hidden = true;
    el.changeKey.hidden = !(state.key || storedKey());
    if (el.error.parentElement && el.error.parentElement.id === "key-field") clearError();
    loadLoras();
  }

  async function loadLoras() {
    try {
      const response = await fetch("loras", { headers: withKey({ Accept: "application/json" }) });
      if (!response.ok) return;
      const loras = (await response.json()).loras || [];
      el.lora.replaceChildren();
      for (const lora of loras) {
        const option = new Option(lora.name + (lora.default ? " (default)" : ""), lora.name);
        option.selected = Boolean(lora.default);
        el.lora.appendChild(option);
      }
      el.loraField.hidden = loras.length < 2;
    } catch (e) {
      el.loraField.hidden = true;
    }
  }

  // --- the photo ---
  function choose(file) {
    if (!file) return;
    state.file = file;
    if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
    state.photoUrl = URL.createObjectURL(file);
    el.photoName.textContent = "Photo ready (" + Math.max(1, Math.round(file.size / 1024)) + " KB).";
    for (const img of [el.preview, el.original]) {
      img.hidden = false;
      img.src = state.photoUrl;
    }
    el.dropText.hidden = true;
    el.originalEmpty.hidden = true;
    if (el.error.parentElement && el.error.parentElement.id === "photo-field") clearError();
  }

  function noPreview(img) {
    img.hidden = true;
    if (img === el.preview) {
      el.dropText.hidden = false;
      el.dropText.querySelector(".drop-title").textContent = "No preview for this file";
    } else {
      el.originalEmpty.hidden = false;
    }
  }

  // --- generating ---
  function showStrength() {
    el.strengthValue.textContent = Math.round(Number(el.strength.value) * 100) + " %";
  }

  function setBusy(busy, started) {
    state.busy = busy;
    el.generate.disabled = busy;
    el.again.disabled = busy;
    el.resultFrame.setAttribute("aria-busy", String(busy));
    el.resultFrame.classList.toggle("working", busy);
    clearInterval(state.timer);
    if (busy) {
      const tick = () => {
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        el.generate.textContent = "Working… " + seconds + " s";
      };
      tick();
      state.timer = setInterval(tick, 100);
      el.status.textContent = "Generating your portrait…";
    } else {
      el.generate.textContent = "Generate portrait";
    }
  }

  function fileName(params, seed) {
    const look = (params.look || el.look.value || "portrait").replace(/[^A-Za-z0-9_-]/g, "");
    const framing = FRAMINGS[params.framing] || "";
    return ["cv-portrait", look, framing, seed ? "seed" + seed : ""].filter(Boolean).join("-") + ".jpg";
  }

  function showResult(blob, response, seconds) {
    let params = {};
    try {
      params = JSON.parse(response.headers.get("X-Parameters") || "{}");
    } catch (e) {
      params = {};
    }
    const seed = response.headers.get("X-Seed") || "";
    if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
    state.resultUrl = URL.createObjectURL(blob);
    const look = state.looks.get(params.look || el.look.value);
    const lookName = look ? (look.description || look.name).split(":")[0] : "portrait";
    el.result.alt = "Your generated portrait: " + lookName + " look, " + framingName(params.framing) + ", seed " + seed;
    el.result.src = state.resultUrl;
    el.result.hidden = false;
    el.resultEmpty.hidden = true;
    el.resultCaption.textContent = lookName + " · " + framingName(params.framing) + " · seed " + seed;
    el.download.href = state.resultUrl;
    el.download.download = fileName(params, seed);
    el.download.hidden = false;
    el.again.hidden = false;
    el.status.textContent = "Done in " + seconds.toFixed(1) + " s.";
  }

  async function generate(newSeed) {
    if (state.busy) return;
    clearError();
    if (!state.file) {
      showError("photo-field", "Choose a photo first.");
      el.photo.focus();
      return;
    }
    if (!el.look.value) {
      showError("look-field", "Choose a look first (the looks could not be loaded yet).");
      return;
    }
    const form = new FormData();
    form.append("image", state.file, state.file.name || "photo.jpg");
    form.append("look", el.look.value);
    if (el.framing.value) form.append("framing", el.framing.value);
    form.append("strength", el.strength.value);
    form.append("keep_face", el.keepFace.checked ? "true" : "false");
    if (el.prompt.value.trim()) form.append("prompt", el.prompt.value.trim());
    if (!newSeed && el.seed.value.trim()) form.append("seed", el.seed.value.trim());
    if (!el.loraField.hidden && el.lora.value) form.append("lora", el.lora.value);
    const started = performance.now();
    setBusy(true, started);
    let done = false;
    try {
      const response = await fetch("predict", {
        method: "POST",
        body: form,
        headers: withKey({ Accept: "image/jpeg" }),
      });
      if (!response.ok) {
        el.status.textContent = "";
        setBusy(false);
        reportError(await readError(response));
        return;
      }
      const blob = await response.blob();
      showResult(blob, response, (performance.now() - started) / 1000);
      done = true;
    } catch (e) {
      el.status.textContent = "";
      setBusy(false);
      showError("generate-field", "Cannot reach the server. Check the connection and try again.");
      return;
    }
    setBusy(false);
    if (done) el.download.focus();
  }

  // --- wiring ---
  el.photo.addEventListener("change", () => choose(el.photo.files[0]));
  el.preview.addEventListener("error", () => noPreview(el.preview));
  el.original.addEventListener("error", () => noPreview(el.original));
  el.drop.addEventListener("click", () => el.photo.click());
  el.drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    el.drop.classList.add("over");
  });
  el.drop.addEventListener("dragleave", () => el.drop.classList.remove("over"));
  el.drop.addEventListener("drop", (e) => {
    e.preventDefault();
    el.drop.classList.remove("over");
    const files = e.dataTransfer && e.dataTransfer.files;
    if (files && files.length) {
      try {
        el.photo.files = files;
      } catch (err) {
        /* older browsers: the input keeps its old value, the dropped file is used anyway */
      }
      choose(files[0]);
    }
  });
  el.look.addEventListener("change", applyLook);
  el.strength.addEventListener("input", showStrength);
  el.settings.addEventListener("submit", (e) => {
    e.preventDefault();
    generate(false);
  });
  el.again.addEventListener("click", () => generate(true));
  el.keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const key = el.apiKey.value.trim();
    if (!key) {
      showError("key-field", "Enter the API key.");
      el.apiKey.focus();
      return;
    }
    storeKey(key);
    loadLooks();
  });
  el.changeKey.addEventListener("click", () => askKey(""));
  el.docsLink.hidden = body.dataset.docs !== "true";
  el.keepFace.checked = body.dataset.defaultKeepFace !== "false";
  showStrength();
  loadLooks();
})();
