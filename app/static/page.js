/* Shortcut's page: write with the served model, watch the residual stream per layer as it writes, switch parts of
   blocks off, inspect /diagnostics and compare a plain and a residual stack. Same-origin requests only (relative
   URLs); no build step. Charts: Apache ECharts (vendored, see /static/vendor/README.md); the live trace heatmap is
   drawn on a plain canvas because it grows by one column per token. */
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const PARTS = ["block", "attn", "mlp"];
  const KEY_STORE = "shortcut.apiKey";
  const MAX_SEED = (1n << 63n) - 1n;
  const COMPARE_MODELS = ["plain-32", "residual-32"];

  const state = {
    models: [],          // GET /v1/models data
    running: null,       // {controller, kind}
    baseline: null,      // the last run started by Generate (what "Generate again" reruns)
    last: null,          // the last finished run, whichever button started it
    vectors: [],         // GET /steering/vectors data of the current model
    charts: {},          // element id -> echarts instance
    lensView: null,      // the last Inspect's (diagnostics, traced run, bytes): the lens chart redraws from it
  };

  // ------------------------------------------------------------------ errors and status

  class ApiError extends Error {
    constructor(message, status, param, code) {
      super(message);
      this.name = "ApiError";
      this.status = status;
      this.param = param;
      this.code = code;
    }
  }

  function showError(err) {
    const box = $("#error");
    box.textContent = err instanceof Error ? err.message : String(err);
    box.hidden = false;
  }

  function clearError() {
    const box = $("#error");
    box.textContent = "";
    box.hidden = true;
  }

  async function apiError(resp) {
    let body = null;
    try {
      body = await resp.json();
    } catch (_) {
      // not JSON: fall back to the status line
    }
    const e = body && body.error;
    if (e && typeof e.message === "string") return new ApiError(e.message, resp.status, e.param, e.code);
    return new ApiError(`HTTP ${resp.status} ${resp.statusText}`.trim(), resp.status, null, null);
  }

  // ------------------------------------------------------------------ API key (only when the server asks: 401)

  let keyPrompt = null;

  function askKey(reason) {
    if (keyPrompt) return keyPrompt;
    const dialog = $("#key-dialog");
    const input = $("#key-input");
    input.value = "";
    keyPrompt = new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        const key = dialog.returnValue === "ok" ? input.value.trim() : "";
        input.value = "";
        keyPrompt = null;
        if (key) sessionStorage.setItem(KEY_STORE, key);
        resolve(key || null);
      }, {once: true});
    });
    $("#key-reason").textContent = reason || "";
    dialog.showModal();
    return keyPrompt;
  }

  // Every 401 asks for the key again (a mistyped key is asked for once more, with the server's reason) until one is
  // accepted or the dialog is cancelled; once a new key is accepted, the models load if they had not.
  async function apiFetch(path, init = {}) {
    let asked = false;
    for (;;) {
      const headers = Object.assign({}, init.headers || {});
      if (init.body !== undefined) headers["Content-Type"] = "application/json";
      const key = sessionStorage.getItem(KEY_STORE);
      if (key) headers.Authorization = `Bearer ${key}`;
      const resp = await fetch(path, Object.assign({}, init, {headers, cache: "no-store", credentials: "same-origin"}));
      if (resp.status !== 401) {
        if (asked && !state.models.length && path !== "/v1/models") loadModels();
        return resp;
      }
      const err = await apiError(resp);
      sessionStorage.removeItem(KEY_STORE);
      if (!(await askKey(err.message))) throw err;
      asked = true;
    }
  }

  async function apiJSON(path, body) {
    const init = body === undefined ? {method: "GET"} : {method: "POST", body: jsonBody(body)};
    const resp = await apiFetch(path, init);
    if (!resp.ok) throw await apiError(resp);
    return resp.json();
  }

  // A seed can be up to 2^63 - 1, beyond a JS number's exact range: it travels as a string of digits and is
  // written into the JSON text as a number.
  function jsonBody(req) {
    const rest = Object.assign({}, req);
    const seed = rest.seed;
    delete rest.seed;
    let text = JSON.stringify(rest);
    if (seed !== undefined && seed !== null) {
      if (!/^\d+$/.test(seed)) throw new Error(`bad seed ${seed}`);
      text = `${text.slice(0, -1)}${text.length > 2 ? "," : ""}"seed":${seed}}`;
    }
    return text;
  }

  // ------------------------------------------------------------------ SSE over fetch

  function parseEvent(raw) {
    let event = "message";
    const data = [];
    for (const line of raw.split(/\r?\n/)) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (!data.length) return null;
    return {event, data: JSON.parse(data.join("\n"))};
  }

  async function streamGenerate(req, signal, onToken) {
    const resp = await apiFetch("/generate", {
      method: "POST", body: jsonBody(Object.assign({}, req, {stream: true})), signal,
      headers: {Accept: "text/event-stream"},
    });
    if (!resp.ok) throw await apiError(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
        const raw = buf.slice(0, cut);
        buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
        const ev = parseEvent(raw);
        if (!ev) continue;
        if (ev.event === "token") onToken(ev.data);
        else if (ev.event === "done") return ev.data;
        else if (ev.event === "error") {
          const e = ev.data.error || {};
          throw new ApiError(e.message || "generation failed", 200, e.param, e.code);
        }
      }
    }
    throw new Error("the stream ended without a result (server stopped?)");
  }

  // ------------------------------------------------------------------ the request from the form

  function modelCard(id) {
    return state.models.find((m) => m.id === id) || null;
  }

  function currentModel() {
    return modelCard($("#model").value);
  }

  function numberField(sel, name, integer) {
    const raw = $(sel).value.trim();
    if (raw === "") return undefined;
    const v = Number(raw);
    if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) {
      throw new ApiError(`${name}: ${JSON.stringify(raw)} is not ${integer ? "an integer" : "a number"}`, 0, name);
    }
    return v;
  }

  function randomSeed() {
    const a = new Uint32Array(2);
    crypto.getRandomValues(a);
    return String((BigInt(a[0] & 0x1fffff) << 32n) | BigInt(a[1]));  // < 2^53
  }

  function seedField() {
    const raw = $("#seed").value.trim();
    if (raw === "") return randomSeed();  // chosen here so that "Generate again" can reuse it exactly
    if (!/^\d+$/.test(raw) || BigInt(raw) > MAX_SEED) throw new ApiError("seed: an integer 0 .. 2^63-1", 0, "seed");
    return String(BigInt(raw));
  }

  function buildRequest() {
    const card = currentModel();
    if (!card) {
      if (!state.models.length) loadModels();  // e.g. after a cancelled key dialog: ask again
      throw new ApiError("no model loaded yet (GET /v1/models)", 0, "model");
    }
    const req = {prompt: $("#prompt").value, model: card.id};
    const fields = [["#max-new-tokens", "max_new_tokens", true], ["#temperature", "temperature", false],
      ["#top-k", "top_k", true], ["#top-p", "top_p", false]];
    for (const [sel, name, integer] of fields) {
      const v = numberField(sel, name, integer);
      if (v !== undefined) req[name] = v;
    }
    req.seed = seedField();
    if ($("#trace").checked) {
      req.trace = true;
      const k = Number($("#lens-top").value);
      if (k > 0) req.logit_lens_top = k;
      if (k > 0 && $("#lens-kind").value === "tuned") req.lens = "tuned";
    }
    const iv = currentIntervention();
    if (iv) req.intervention = iv;
    return req;
  }

  // ------------------------------------------------------------------ Intervene: per-layer controls

  function buildLayerControls(nLayer) {
    const box = $("#layer-controls");
    box.replaceChildren();
    const head = document.createElement("div");
    head.className = "layer-row head";
    for (const t of ["layer", "block", "attn", "mlp", "scale F(x)", "×", "of"]) {
      const s = document.createElement("span");
      s.textContent = t;
      head.append(s);
    }
    box.append(head);
    for (let l = 0; l < nLayer; l++) {
      const row = document.createElement("div");
      row.className = "layer-row";
      row.dataset.layer = String(l);
      const name = document.createElement("span");
      name.textContent = `L${l}`;
      row.append(name);
      for (const part of PARTS) {
        const label = document.createElement("label");
        const cb = document.createElement("input");
        cb.type = "checkbox";
        cb.checked = true;
        cb.dataset.part = part;
        cb.title = `layer ${l}: ${part} on (uncheck to skip its F(x))`;
        cb.setAttribute("aria-label", `layer ${l} ${part} on`);
        label.append(cb);
        row.append(label);
      }
      const range = document.createElement("input");
      range.type = "range";
      range.min = "0";
      range.max = "2";
      range.step = "0.05";
      range.value = "1";
      range.dataset.role = "scale";
      range.setAttribute("aria-label", `layer ${l} scale factor`);
      const factor = document.createElement("span");
      factor.className = "factor";
      factor.textContent = "1.00";
      const part = document.createElement("select");
      part.dataset.role = "scale-part";
      part.setAttribute("aria-label", `layer ${l} part to scale`);
      for (const p of PARTS) part.append(new Option(p, p, p === "mlp", p === "mlp"));
      row.append(range, factor, part);
      box.append(row);
    }
    syncLayerControls();
    layerHint();
  }

  // The list scrolls when the model has more layers than fit: say so, and which layers there are.
  function layerHint() {
    const box = $("#layer-controls");
    const hint = $("#layer-controls-hint");
    const n = box.querySelectorAll("[data-layer]").length;
    const hidden = box.scrollHeight > box.clientHeight + 1 && box.scrollTop + box.clientHeight < box.scrollHeight - 1;
    hint.hidden = !hidden;
    hint.textContent = hidden ? `${n} layers, L0–L${n - 1}: scroll the list for the rest ↓` : "";
  }

  function syncLayerControls() {
    for (const row of document.querySelectorAll("#layer-controls [data-layer]")) {
      const blockOn = row.querySelector('[data-part="block"]').checked;
      for (const p of ["attn", "mlp"]) row.querySelector(`[data-part="${p}"]`).disabled = !blockOn;
      const range = row.querySelector('[data-role="scale"]');
      row.querySelector(".factor").textContent = Number(range.value).toFixed(2);
      const off = PARTS.some((p) => !row.querySelector(`[data-part="${p}"]`).checked);
      row.classList.toggle("changed", off || Number(range.value) !== 1);
    }
    $("#intervention-summary").textContent = `intervention: ${describeIntervention(currentIntervention())}`;
  }

  function currentIntervention() {
    const skip = [];
    const scale = [];
    for (const row of document.querySelectorAll("#layer-controls [data-layer]")) {
      const layer = Number(row.dataset.layer);
      const off = Object.fromEntries(PARTS.map((p) => [p, !row.querySelector(`[data-part="${p}"]`).checked]));
      if (off.block) {
        skip.push({layer, part: "block"});  // attn and mlp are inside it: nothing more for this layer
        continue;
      }
      for (const p of ["attn", "mlp"]) if (off[p]) skip.push({layer, part: p});
      const factor = Number(row.querySelector('[data-role="scale"]').value);
      const part = row.querySelector('[data-role="scale-part"]').value;
      // the API refuses a (layer, part) named twice; a block factor on a layer with a part skipped is fine (the
      // factors multiply: 0 stays 0)
      if (factor !== 1 && !(part !== "block" && off[part])) scale.push({layer, part, factor});
    }
    const add = currentSteering();
    if (!skip.length && !scale.length && !add.length) return null;
    const iv = {};
    if (skip.length) iv.skip = skip;
    if (scale.length) iv.scale = scale;
    if (add.length) iv.add = add;
    return iv;
  }

  function describeIntervention(iv) {
    if (!iv) return "none";
    const parts = [];
    if (iv.skip && iv.skip.length) parts.push("skip " + iv.skip.map((s) => `L${s.layer} ${s.part}`).join(", "));
    if (iv.scale && iv.scale.length) {
      parts.push("scale " + iv.scale.map((s) => `L${s.layer} ${s.part} ×${s.factor}`).join(", "));
    }
    if (iv.add && iv.add.length) {
      parts.push("add " + iv.add.map((a) => {
        const what = a.name !== undefined ? a.name : `a vector (norm ${Number(a.norm).toPrecision(3)})`;
        return `${what} ×${a.coeff} after L${a.layer}` + (a.positions && a.positions !== "all" ? ` (${a.positions})` : "");
      }).join(", "));
    }
    return parts.join("; ") || "none";
  }

  // ------------------------------------------------------------------ Steer: named vectors, intervention.add

  // The named vector picked, added after the chosen layer; none when no vector is picked or coeff is 0.
  function currentSteering() {
    const name = $("#steer-vector").value;
    const coeff = Number($("#steer-coeff").value);
    if (!name || !Number.isFinite(coeff) || coeff === 0) return [];
    return [{layer: Number($("#steer-layer").value), name, coeff, positions: $("#steer-positions").value}];
  }

  function buildSteerLayers(nLayer) {
    const sel = $("#steer-layer");
    sel.replaceChildren();
    for (let l = 0; l < nLayer; l++) sel.append(new Option(`after L${l}`, String(l), false, l === nLayer >> 1));
  }

  function syncSteer() {
    $("#steer-coeff-value").textContent = Number($("#steer-coeff").value).toFixed(1);
    $("#intervention-summary").textContent = `intervention: ${describeIntervention(currentIntervention())}`;
  }

  function linesOf(sel) {
    return $(sel).value.split("\n").map((l) => l.replace(/\r$/, "")).filter((l) => l.trim() !== "");
  }

  async function loadVectors(select) {
    const card = currentModel();
    const sel = $("#steer-vector");
    const keep = select !== undefined ? select : sel.value;
    try {
      const list = await apiJSON("/steering/vectors");
      state.vectors = list.data.filter((v) => card && v.model === card.id);
    } catch (e) {
      state.vectors = [];
      showError(e);
    }
    sel.replaceChildren(new Option("none", ""));
    for (const v of state.vectors) {
      sel.append(new Option(`${v.name} · L${v.layer} · norm ${v.norm.toPrecision(3)}`, v.name, false, v.name === keep));
    }
    onVectorPicked();
  }

  function onVectorPicked() {
    const v = state.vectors.find((x) => x.name === $("#steer-vector").value);
    if (v && $(`#steer-layer option[value="${v.layer}"]`)) $("#steer-layer").value = String(v.layer);
    syncSteer();
  }

  async function makeVector() {
    clearError();
    const card = currentModel();
    const status = $("#steer-make-status");
    const body = {
      name: $("#steer-name").value.trim(),
      model: card ? card.id : undefined,
      layer: Number($("#steer-layer").value),
      positive: linesOf("#steer-positive"),
      negative: linesOf("#steer-negative"),
      reduce: $("#steer-reduce").value,
      replace: $("#steer-replace").checked,
    };
    $("#steer-make").disabled = true;
    status.textContent = "making…";
    $("#steer").dataset.state = "making";
    try {
      const made = await apiJSON("/steering/vectors", body);
      status.textContent = `${made.name}: norm ${made.norm.toPrecision(4)} from ${made.positive} + ${made.negative} lines`;
      await loadVectors(made.name);
      $("#steer").dataset.state = "made";
    } catch (e) {
      status.textContent = "";
      showError(e);
      $("#steer").dataset.state = "error";
    } finally {
      $("#steer-make").disabled = false;
    }
  }

  // ------------------------------------------------------------------ Watch: the live trace heatmap

  const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
    "#b5de2b", "#fde725"].map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));

  function viridis(t) {
    const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
    const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
    const f = x - i;
    const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function visible(text) {
    return text.replace(/\n/g, "⏎").replace(/ /g, "␣").replace(/\t/g, "⇥");
  }

  // The layer labels sit on their own canvas (#trace-rows) so that they stay in view when the map scrolls sideways.
  const heat = {
    canvas: null, rows: null, scroller: null, nLayer: 0, cols: [], hover: null,
    labelW: 34, top: 4, bottom: 20, cellW: 14, cellH: 14,

    init() {
      this.canvas = $("#trace-heatmap");
      this.rows = $("#trace-rows");
      this.scroller = $("#heatmap-scroll");
      this.canvas.addEventListener("mousemove", (e) => this.onHover(e));
      this.canvas.addEventListener("click", (e) => this.onHover(e));
      this.canvas.addEventListener("mouseleave", () => this.hideTip());
      for (const r of document.querySelectorAll('input[name="metric"]')) {
        r.addEventListener("change", () => this.draw());
      }
    },

    metric() {
      return document.querySelector('input[name="metric"]:checked').value;
    },

    // `expected` columns fit the visible width when they can (cells 6..14 px wide); more scroll sideways
    reset(nLayer, expected = 0) {
      this.nLayer = nLayer;
      this.cols = [];
      this.cellH = nLayer > 24 ? 9 : 14;
      const room = this.scroller.clientWidth - 4;
      this.cellW = expected > 0 && room > 0 ? Math.min(14, Math.max(6, Math.floor(room / expected))) : 14;
      this.hideTip();
      this.draw();
    },

    add(token, trace) {
      this.cols.push({token, trace});
      this.draw();
      this.scroller.scrollLeft = this.scroller.scrollWidth;
    },

    value(col, layer, metric) {
      const arr = col.trace[metric];
      return arr && layer < arr.length ? arr[layer] : null;
    },

    range(metric) {
      let lo = Infinity;
      let hi = -Infinity;
      for (const c of this.cols) {
        for (let l = 0; l < this.nLayer; l++) {
          const v = this.value(c, l, metric);
          if (v === null || !Number.isFinite(v) || (metric === "update_ratio" && v <= 0)) continue;
          lo = Math.min(lo, v);
          hi = Math.max(hi, v);
        }
      }
      return lo <= hi ? [lo, hi] : null;
    },

    scale(metric, range) {
      if (!range) return () => 0;
      const log = metric === "update_ratio";
      const f = log ? Math.log10 : (v) => v;
      const lo = f(range[0]);
      const hi = f(range[1]);
      return (v) => (hi > lo ? (f(v) - lo) / (hi - lo) : 0.5);
    },

    draw() {
      const c = this.canvas;
      const n = this.cols.length;
      const metric = this.metric();
      const w = Math.max(n, 1) * this.cellW + 4;
      const h = this.top + this.nLayer * this.cellH + this.bottom;
      const g = this.sized(c, w, h);
      Object.assign(c.dataset, {rows: String(this.nLayer), cols: String(n), metric, cellW: String(this.cellW),
        cellH: String(this.cellH), top: String(this.top)});
      const gr = this.sized(this.rows, this.labelW, h);
      gr.fillStyle = "#667085";
      gr.textAlign = "right";
      const every = this.nLayer > 24 ? 4 : this.nLayer > 12 ? 2 : 1;
      for (let l = 0; l < this.nLayer; l++) {
        if (l % every === 0 || l === this.nLayer - 1) gr.fillText(`L${l}`, this.labelW - 4, this.top + (l + 0.5) * this.cellH);
      }
      const range = this.range(metric);
      const s = this.scale(metric, range);
      g.textAlign = "center";
      const labelEvery = Math.ceil(9 / this.cellW);
      for (let i = 0; i < n; i++) {
        const col = this.cols[i];
        const x = i * this.cellW;
        for (let l = 0; l < this.nLayer; l++) {
          const v = this.value(col, l, metric);
          g.fillStyle = v === null || !Number.isFinite(v) ? "#ccc" : viridis(s(v));
          g.fillRect(x, this.top + l * this.cellH, this.cellW - 1, this.cellH - 1);
        }
        if (i % labelEvery) continue;
        g.fillStyle = "#1d2430";
        const t = col.token.text.length === 1 ? visible(col.token.text) : "·";
        g.fillText(t, x + this.cellW / 2, this.top + this.nLayer * this.cellH + this.bottom / 2);
      }
      if (this.hover) {
        g.strokeStyle = "#ff3d00";
        g.lineWidth = 1.5;
        g.strokeRect(this.hover.col * this.cellW, this.top + this.hover.row * this.cellH,
          this.cellW - 1, this.cellH - 1);
      }
      $("#heatmap-empty").hidden = n > 0;
      this.legend(metric, range);
    },

    // size a canvas to w × h CSS pixels, sharp on high-DPI screens; its 2D context, cleared
    sized(canvas, w, h) {
      const dpr = window.devicePixelRatio || 1;
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
      canvas.style.width = `${w}px`;
      canvas.style.height = `${h}px`;
      const g = canvas.getContext("2d");
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      g.clearRect(0, 0, w, h);
      g.font = "10px ui-monospace, monospace";
      g.textBaseline = "middle";
      return g;
    },

    legend(metric, range) {
      const box = $("#heatmap-legend");
      box.replaceChildren();
      if (!range) return;
      const bar = document.createElement("canvas");
      bar.width = 120;
      bar.height = 10;
      const g = bar.getContext("2d");
      for (let x = 0; x < 120; x++) {
        g.fillStyle = viridis(x / 119);
        g.fillRect(x, 0, 1, 10);
      }
      const lo = document.createElement("span");
      const hi = document.createElement("span");
      lo.textContent = fmt(range[0]);
      hi.textContent = fmt(range[1]);
      const what = document.createElement("span");
      what.textContent = metric === "update_ratio" ? "update ratio (log colour)" : "‖resid_post‖";
      box.append(what, lo, bar, hi);
    },

    cellAt(e) {
      const r = this.canvas.getBoundingClientRect();
      const x = e.clientX - r.left;
      const y = e.clientY - r.top - this.top;
      const col = Math.floor(x / this.cellW);
      const row = Math.floor(y / this.cellH);
      if (x < 0 || y < 0 || col >= this.cols.length || row >= this.nLayer) return null;
      return {col, row};
    },

    onHover(e) {
      const cell = this.cellAt(e);
      if (!cell) {
        this.hideTip();
        return;
      }
      if (!this.hover || this.hover.col !== cell.col || this.hover.row !== cell.row) {
        this.hover = cell;
        this.draw();
      }
      const col = this.cols[cell.col];
      const tr = col.trace;
      const lines = [
        `layer ${cell.row} · token ${cell.col} ${JSON.stringify(col.token.text)}` +
          (tr.position !== undefined ? ` (position ${tr.position})` : ""),
        `resid_norm   ${fmt(this.value(col, cell.row, "resid_norm"))}`,
        `update_ratio ${fmt(this.value(col, cell.row, "update_ratio"))}`,
      ];
      const lens = tr.logit_lens && tr.logit_lens[cell.row];
      if (lens && lens.length) {
        lines.push(`${tr.lens || "logit"} lens: ` + lens.map((t) => `${JSON.stringify(t.text)} ${fmt(t.prob)}`).join(", "));
      }
      const tip = $("#heatmap-tip");
      tip.textContent = lines.join("\n");
      tip.hidden = false;
      const pad = 14;
      const x = Math.min(e.clientX + pad, window.innerWidth - tip.offsetWidth - 4);
      const y = e.clientY + pad + tip.offsetHeight > window.innerHeight ? e.clientY - tip.offsetHeight - pad : e.clientY + pad;
      tip.style.left = `${Math.max(x, 4)}px`;
      tip.style.top = `${Math.max(y, 4)}px`;
    },

    hideTip() {
      $("#heatmap-tip").hidden = true;
      if (this.hover) {
        this.hover = null;
        this.draw();
      }
    },
  };

  function fmt(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "–";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
    const text = v.toPrecision(4);
    return text.includes(".") ? text.replace(/0+$/, "").replace(/\.$/, "") : text;
  }

  // ------------------------------------------------------------------ Write: generate, stop, generate again

  function setRunning(kind) {
    const busy = Boolean(kind);
    $("#generate").disabled = busy;
    $("#again").disabled = busy || !state.baseline;
    $("#steer-again").disabled = busy || !state.baseline;
    $("#stop").disabled = !busy;
    document.body.dataset.state = busy ? "running" : "idle";
  }

  async function generate(kind) {
    if (state.running) return;
    clearError();
    let req;
    try {
      if (kind === "again" || kind === "steer") {
        if (!state.baseline) return;
        req = Object.assign({}, state.baseline.request);
        delete req.intervention;
        const iv = currentIntervention();
        if (iv) req.intervention = iv;
      } else {
        req = buildRequest();
      }
    } catch (e) {
      showError(e);
      return;
    }
    const card = modelCard(req.model);
    const controller = new AbortController();
    state.running = {controller, kind};
    setRunning(kind);
    const out = $("#output");
    out.textContent = "";
    out.dataset.done = "0";
    out.dataset.tokens = "0";
    $("#output-prompt").textContent = req.prompt;
    heat.reset(card ? card.n_layer : 0, req.max_new_tokens || 0);
    const run = {kind, request: req, text: "", tokens: [], traced: false, done: null};
    const t0 = performance.now();
    let tFirst = null;
    $("#status").textContent = "generating…";
    try {
      run.done = await streamGenerate(req, controller.signal, (ev) => {
        if (tFirst === null) tFirst = performance.now();
        run.text += ev.text;
        run.tokens.push(ev.token);
        if (ev.text) out.append(ev.text);
        out.dataset.tokens = String(run.tokens.length);
        if (ev.trace) {
          run.traced = true;
          heat.add(ev.token, ev.trace);
        }
        $("#status").textContent = `generating… ${run.tokens.length} tokens`;
      });
      const d = run.done;
      const secs = (performance.now() - t0) / 1000;
      $("#status").textContent = `${d.usage.completion_tokens} tokens · ${d.finish_reason} · seed ${req.seed} · ` +
        `${(d.usage.completion_tokens / Math.max(secs, 1e-3)).toFixed(1)} tok/s` +
        (tFirst !== null ? ` · first token ${((tFirst - t0)).toFixed(0)} ms` : "") +
        ` · ${d.model}` + (req.intervention ? ` · ${describeIntervention(req.intervention)}` : "");
      if (req.trace && !run.traced) $("#status").textContent += " · (no trace in the stream)";
      out.dataset.done = "1";
      state.last = run;
      if (kind === "again" || kind === "steer") {
        renderDiff(state.baseline, run, kind === "steer" ? STEER_DIFF : INTERVENE_DIFF);
      } else {
        state.baseline = run;
        renderDiff(run, null, INTERVENE_DIFF);
        renderDiff(run, null, STEER_DIFF);
      }
    } catch (e) {
      if (e.name === "AbortError") {
        $("#status").textContent = `stopped after ${run.tokens.length} tokens`;
        out.dataset.done = "stopped";
      } else {
        $("#status").textContent = "";
        showError(e);
        out.dataset.done = "error";
      }
    } finally {
      state.running = null;
      setRunning(null);
    }
  }

  function stop() {
    if (state.running) state.running.controller.abort();
  }

  // ------------------------------------------------------------------ Intervene: side by side, first difference

  function firstDifference(a, b) {
    const n = Math.min(a.length, b.length);
    let i = 0;
    while (i < n && a[i] === b[i]) i++;
    return i === a.length && i === b.length ? -1 : i;
  }

  function fillDiff(box, chars, at) {
    box.replaceChildren();
    if (at < 0) {
      box.textContent = chars.join("");
      return;
    }
    const same = document.createElement("span");
    same.className = "same";
    same.textContent = chars.slice(0, at).join("");
    const mark = document.createElement("mark");
    mark.textContent = at < chars.length ? chars[at] : "∅";
    // counted from 1, as "(of N and M)" counts the characters
    mark.title = at < chars.length ? `first difference: character ${at + 1}` : `ends here, after character ${at}`;
    box.append(same, mark, chars.slice(at + 1).join(""));
  }

  function runLabel(run) {
    const iv = run.done && run.done.intervention !== undefined ? run.done.intervention : run.request.intervention;
    return `seed ${run.request.seed} · ${run.request.model} · intervention: ${describeIntervention(iv || null)}`;
  }

  const INTERVENE_DIFF = {prefix: "#diff", hint: "Switch parts off or move a slider, then “Generate again”."};
  const STEER_DIFF = {prefix: "#steer", hint: "Pick or make a vector, set the coefficient, then “Generate again”."};

  function renderDiff(before, after, where) {
    const left = $(`${where.prefix}-left`);
    const right = $(`${where.prefix}-right`);
    $(`${where.prefix}-left-label`).textContent = before ? runLabel(before) : "";
    $(`${where.prefix}-right-label`).textContent = after ? runLabel(after) : "";
    const note = $(`${where.prefix}-note`);
    if (!after) {
      left.textContent = before ? before.text : "";
      right.replaceChildren();
      note.textContent = where.hint;
      delete note.dataset.first;
      return;
    }
    const a = Array.from(before.text);
    const b = Array.from(after.text);
    const at = firstDifference(a, b);
    fillDiff(left, a, at);
    fillDiff(right, b, at);
    note.dataset.first = String(at);
    note.textContent = at < 0 ? "The two texts are identical."
      : `First difference at character ${at + 1} (of ${a.length} and ${b.length}; counted from 1).`;
  }

  // ------------------------------------------------------------------ charts (ECharts)

  function chart(id) {
    const el = document.getElementById(id);
    if (!window.echarts) throw new Error("the chart library did not load (/static/vendor/echarts/echarts.min.js)");
    if (!state.charts[id]) state.charts[id] = window.echarts.init(el, null, {renderer: "canvas"});
    return state.charts[id];
  }

  function draw(id, option) {
    const base = {
      animation: false,
      grid: {left: 56, right: 56, top: 34, bottom: 40},
      // richText: tooltips drawn on the chart's canvas; the HTML ones carry style attributes the page's CSP refuses
      tooltip: {trigger: "axis", confine: true, renderMode: "richText"},
      textStyle: {fontFamily: "system-ui, sans-serif"},
    };
    const c = chart(id);
    c.setOption(Object.assign(base, option), true);
    const el = document.getElementById(id);
    el.dataset.drawn = "1";
    el.dataset.series = String((option.series || []).length);
  }

  function clearChart(id, message) {
    const c = chart(id);
    c.clear();
    c.setOption({title: {text: message, left: "center", top: "middle", textStyle: {fontSize: 13, color: "#667085",
      fontWeight: "normal"}}}, true);
    const el = document.getElementById(id);
    el.dataset.drawn = "empty";
    el.dataset.series = "0";
  }

  const layersAxis = (n) => ({type: "category", name: "layer", nameLocation: "middle", nameGap: 24,
    data: Array.from({length: n}, (_, l) => String(l))});
  const positive = (v) => (v === null || v === undefined || !(v > 0) ? null : v);
  const logAxis = (name) => ({type: "log", name, nameTextStyle: {align: "left"}, axisLabel: {formatter: (v) => fmt(v)}});

  function zeroRuns(values) {
    // [first, last] layer ranges whose value is exactly 0 (a float32 underflow on a log axis has nowhere to go)
    const runs = [];
    values.forEach((v, i) => {
      if (v !== 0) return;
      if (runs.length && runs[runs.length - 1][1] === i - 1) runs[runs.length - 1][1] = i;
      else runs.push([i, i]);
    });
    return runs;
  }

  function drawNorms(d) {
    const L = d.layers;
    draw("chart-norms", {
      legend: {top: 0},
      xAxis: layersAxis(L.length),
      yAxis: {type: "value", name: "L2 norm", scale: true},
      series: ["resid_pre", "resid_mid", "resid_post"].map((k) => ({
        name: k, type: "line", symbolSize: 4, data: L.map((e) => e[k].mean),
      })),
    });
  }

  function drawUpdate(d) {
    const L = d.layers;
    const lowest = Math.min(...L.flatMap((e) => ["block", "attn", "mlp"].map((k) => positive(e.update_ratio[k]) || Infinity)));
    // bars on a log axis grow from 1 unless told otherwise: start them at the decade below the smallest ratio
    const start = Number.isFinite(lowest) ? 10 ** Math.floor(Math.log10(lowest)) : 0.01;
    draw("chart-update", {
      legend: {top: 0},
      xAxis: layersAxis(L.length),
      yAxis: Object.assign(logAxis("‖F(x)‖ / ‖x‖"), {startValue: start}),
      series: ["block", "attn", "mlp"].map((k) => ({
        name: k, type: "bar", data: L.map((e) => positive(e.update_ratio[k])),
      })),
    });
  }

  function drawGrad(d) {
    const L = d.layers;
    const g = L.map((e) => (e.grad_norm === undefined ? null : e.grad_norm));
    if (g.every((v) => v === null)) {
      clearChart("chart-grad", (d.notes && d.notes[0]) || "gradients off");
      return;
    }
    const zeros = zeroRuns(g);
    draw("chart-grad", {
      xAxis: layersAxis(L.length),
      yAxis: logAxis("‖∂L/∂x‖"),
      series: [{
        name: "grad norm", type: "line", symbolSize: 5, data: g.map(positive),
        markArea: zeros.length ? {itemStyle: {color: "rgba(220,50,50,0.10)"}, label: {color: "#9b1c1c", fontSize: 11},
          data: zeros.map(([a, b]) => [{name: "exactly 0", xAxis: String(a)}, {xAxis: String(b)}])} : undefined,
      }],
    });
  }

  function drawAblation(d) {
    const L = d.layers;
    if (!L.length || !L[0].delta_loss) {
      clearChart("chart-ablation", (d.notes && d.notes[0]) || "ablation off");
      return;
    }
    draw("chart-ablation", {
      legend: {top: 0},
      xAxis: layersAxis(L.length),
      yAxis: [{type: "value", name: "ΔLoss (nats)"}, {type: "value", name: "BI", splitLine: {show: false}}],
      series: [
        ...["block", "attn", "mlp"].map((k) => ({name: `ΔLoss ${k}`, type: "bar", data: L.map((e) => e.delta_loss[k])})),
        {name: "BI", type: "line", yAxisIndex: 1, symbolSize: 4, data: L.map((e) => e.block_influence)},
      ],
    });
  }

  function byteLabel(bytes, i) {
    if (i < 0 || i >= bytes.length) return "?";
    const b = bytes[i];
    return b < 0x80 ? String.fromCharCode(b) : `<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`;
  }

  // Layer × position, through the lens #lens-view names (logit or tuned). /diagnostics reports a lens at the last
  // position only; the positions before it come from the last generation's trace (logit_lens_top), when that
  // generation is the text being inspected and its trace read the same lens.
  function drawLens(d, traceRun, fullBytes) {
    const L = d.layers;
    const kind = $("#lens-view").value;
    const key = kind === "tuned" ? "tuned_lens" : "logit_lens";
    const cols = [];
    if (traceRun) {
      traceRun.done.trace.tokens.forEach((t, i) => {
        if (!t.logit_lens || (t.lens || "logit") !== kind) return;
        cols.push({position: t.position, reads: byteLabel(fullBytes, t.position), lens: t.logit_lens.map((top) => ({top}))});
      });
    }
    if (L[0][key]) {
      const last = fullBytes.length - 1;
      cols.push({position: last, reads: byteLabel(fullBytes, last), lens: L.map((e) => e[key]), diag: true});
    }
    const note = $("#lens-note");
    note.textContent = !L[0][key]
      ? "— this model has no tuned lens (python -m training.tuned_lens trains one)"
      : cols.length > 1
      ? `— columns 1..${cols.length - 1}: the generation's trace; last column: /diagnostics (with KL to final)`
      : `— /diagnostics gives the last position only; generate with trace + logit lens top ≥ 1 and lens ${kind} for one column per token`;
    const data = [];
    cols.forEach((c, x) => L.forEach((_, l) => {
      const top = c.lens[l] && c.lens[l].top && c.lens[l].top[0];
      if (top) data.push([x, l, top.prob]);
    }));
    const tip = (p) => {
      const c = cols[p.data[0]];
      const layer = p.data[1];
      const e = c.lens[layer];
      const tops = e.top.map((t) => `${JSON.stringify(t.text)} ${fmt(t.prob)}`).join(", ");
      return `position ${c.position} reads ${JSON.stringify(c.reads)} · layer ${layer}\n${tops}` +
        (e.kl_to_final !== undefined ? `\nKL to final ${fmt(e.kl_to_final)}` : "");
    };
    // as many columns as fit with a readable label; a slider reaches the others (it starts at the end)
    const fit = Math.max(8, Math.floor(($("#chart-lens").clientWidth - 64) / 22));
    const zoom = cols.length > fit ? [{type: "slider", xAxisIndex: 0, startValue: cols.length - fit,
      endValue: cols.length - 1, height: 16, bottom: 48, showDetail: false, brushSelect: false},
    {type: "inside", xAxisIndex: 0}] : [];
    draw("chart-lens", {
      dataZoom: zoom,
      grid: {left: 48, right: 16, top: 10, bottom: zoom.length ? 112 : 84},
      tooltip: {trigger: "item", confine: true, renderMode: "richText", formatter: tip},
      xAxis: {type: "category", data: cols.map((c) => visible(c.reads)), name: "position (reads)", nameLocation: "middle",
        nameGap: 26, splitArea: {show: true}},
      yAxis: {type: "category", inverse: true, data: L.map((_, l) => `L${l}`), splitArea: {show: true}},
      visualMap: {min: 0, max: 1, calculable: false, orient: "horizontal", left: "center", bottom: 2, itemHeight: 160,
        itemWidth: 10, text: ["p = 1", "top-1 probability  0"],
        inRange: {color: VIRIDIS.map((c) => `rgb(${c.join(",")})`)}},
      series: [{
        name: `${kind} lens`, type: "heatmap", data,
        label: {show: true, fontSize: 10, color: "#fff", textBorderColor: "#000", textBorderWidth: 2, formatter: (p) => {
          const top = cols[p.data[0]].lens[p.data[1]].top[0];
          return visible(top.text.length === 1 ? top.text : "·");
        }},
      }],
    });
  }

  // ------------------------------------------------------------------ Inspect and Compare

  // The last `n` bytes of `text`, starting on a character boundary (one token per UTF-8 byte).
  function lastBytes(text, n) {
    const bytes = new TextEncoder().encode(text);
    if (bytes.length <= n) return {text, dropped: 0, bytes};
    let start = bytes.length - n;
    while (start < bytes.length && (bytes[start] & 0xc0) === 0x80) start++;
    return {text: new TextDecoder().decode(bytes.slice(start)), dropped: start, bytes: bytes.slice(start)};
  }

  function setPanel(id, stateName, text) {
    $(`#${id}`).dataset.state = stateName;
    $(`#${id}-status`).textContent = text;
  }

  async function inspect() {
    clearError();
    const card = currentModel();
    if (!card) return;
    const prompt = $("#prompt").value;
    const last = state.last;
    const fromRun = last && last.done && last.request.prompt === prompt && last.request.model === card.id;
    // the bytes the model saw and wrote: the prompt's, then each generated token's own byte (the text would turn a
    // byte that is not valid UTF-8 into U+FFFD, three other bytes)
    const promptBytes = new TextEncoder().encode(prompt);
    const fullBytes = fromRun ? Uint8Array.from([...promptBytes, ...last.tokens.map((t) => t.id)]) : promptBytes;
    const dropped = Math.max(0, fullBytes.length - card.context_window);
    const part = {bytes: fullBytes.slice(dropped), dropped};
    if (!part.bytes.length) {
      showError("nothing to inspect: the prompt is empty");
      return;
    }
    const body = {tokens: Array.from(part.bytes), model: card.id, logit_lens: 3,
      gradients: $("#inspect-gradients").checked, ablation: $("#inspect-ablation").checked};
    if (card.tuned_lens) body.tuned_lens = 3;
    const iv = currentIntervention();
    if (iv && $("#inspect-intervention").checked) body.intervention = iv;
    setPanel("inspect", "running", `running /diagnostics on ${part.bytes.length} tokens…`);
    $("#inspect-run").disabled = true;
    try {
      const d = await apiJSON("/diagnostics", body);
      drawNorms(d);
      drawUpdate(d);
      const traced = fromRun && !part.dropped && last.done.trace && last.done.trace.tokens &&
        last.done.trace.tokens.some((t) => t.logit_lens) ? last : null;
      state.lensView = {d, traced, fullBytes};
      drawLens(d, traced, fullBytes);
      drawGrad(d);
      drawAblation(d);
      const bits = [`${d.n_tokens} tokens of ${fromRun ? "prompt + generated text" : "the prompt"}`,
        `loss ${fmt(d.loss)} nats`, `norm growth ${fmt(d.summary.norm_growth_per_layer)}×/layer`];
      if (part.dropped) bits.push(`first ${part.dropped} bytes dropped (context window ${card.context_window})`);
      if (body.intervention) bits.push(`intervention: ${describeIntervention(body.intervention)}`);
      if (d.summary.spearman_bi_vs_delta_loss !== undefined) {
        bits.push(`spearman(BI, ΔLoss) ${fmt(d.summary.spearman_bi_vs_delta_loss)}`);
      }
      setPanel("inspect", "done", bits.concat(d.notes || []).join(" · "));
    } catch (e) {
      setPanel("inspect", "error", "");
      showError(e);
    } finally {
      $("#inspect-run").disabled = false;
    }
  }

  async function compare() {
    clearError();
    const cards = COMPARE_MODELS.map(modelCard);
    const missing = COMPARE_MODELS.filter((_, i) => !cards[i]);
    if (missing.length) {
      setPanel("compare", "error", "");
      showError(`${missing.join(" and ")} not served here (GET /v1/models); the shipped checkpoints include both`);
      return;
    }
    const window_ = Math.min(...cards.map((c) => c.context_window));
    const part = lastBytes($("#prompt").value, window_);
    setPanel("compare", "running", "running /diagnostics with gradients on both models…");
    $("#compare-run").disabled = true;
    try {
      const results = await Promise.all(COMPARE_MODELS.map((m) => apiJSON("/diagnostics",
        {prompt: part.text, model: m, gradients: true})));
      const n = Math.max(...results.map((d) => d.layers.length));
      const series = results.map((d, i) => {
        const g = d.layers.map((e) => (e.grad_norm === undefined ? null : e.grad_norm));
        const zeros = zeroRuns(g);
        return {
          name: COMPARE_MODELS[i], type: "line", symbolSize: 5, data: g.map(positive),
          // the label at the bottom, on a white ground: the other model's line runs high across the shaded range
          markArea: zeros.length ? {itemStyle: {color: "rgba(220,50,50,0.10)"},
            label: {color: "#9b1c1c", fontSize: 11, position: "insideBottom", backgroundColor: "rgba(255,255,255,0.9)",
              padding: [1, 3]},
            data: zeros.map(([a, b]) => [{name: `${COMPARE_MODELS[i]}: exactly 0`, xAxis: String(a)},
              {xAxis: String(b)}])} : undefined,
        };
      });
      if (series.every((s) => s.data.every((v) => v === null))) {
        clearChart("chart-compare", (results[0].notes && results[0].notes[0]) || "no gradients");
        setPanel("compare", "done", "no gradients to draw");
        return;
      }
      draw("chart-compare", {legend: {top: 0}, xAxis: layersAxis(n), yAxis: logAxis("‖∂L/∂resid_pre‖"), series});
      const ratio = results.map((d) => {
        const g = d.layers.map((e) => e.grad_norm);
        return `${d.model ? d.model.name : ""} first/last ${fmt(g[0] / g[g.length - 1])}`;
      });
      setPanel("compare", "done", [`${results[0].n_tokens} tokens`].concat(ratio,
        part.dropped ? [`first ${part.dropped} bytes dropped (context window ${window_})`] : []).join(" · "));
    } catch (e) {
      setPanel("compare", "error", "");
      showError(e);
    } finally {
      $("#compare-run").disabled = false;
    }
  }

  // ------------------------------------------------------------------ Patch: activation patching heatmaps

  async function runPatching() {
    clearError();
    const card = currentModel();
    if (!card) return;
    const sites = [...document.querySelectorAll(".patch-site")].filter((b) => b.checked).map((b) => b.value);
    if (!sites.length) {
      showError("pick at least one site to patch");
      return;
    }
    const target = $("#patch-target").value;
    const body = {model: card.id, clean: $("#patch-clean").value, corrupt: $("#patch-corrupt").value,
      target: target === "" ? null : target, sites};
    setPanel("patch", "running", "patching…");
    $("#patch-run").disabled = true;
    try {
      const r = await apiJSON("/patching", body);
      drawPatching(r);
      setPanel("patch", "done", `target ${JSON.stringify(r.target.text[0])}: logprob clean ${fmt(r.clean_metric)}, ` +
        `corrupt ${fmt(r.corrupt_metric)} · ${r.forwards} forwards`);
    } catch (e) {
      showError(e);
      setPanel("patch", "error", "");
    } finally {
      $("#patch-run").disabled = false;
    }
  }

  // One heatmap per site: layer (rows) x position (columns), colour = normalized effect (raw values if null).
  function drawPatching(r) {
    const box = $("#patch-charts");
    for (const id of Object.keys(state.charts).filter((k) => k.startsWith("chart-patch-"))) {
      state.charts[id].dispose();
      delete state.charts[id];
    }
    box.replaceChildren();
    const effect = r.sites !== null;
    const grids = effect ? r.sites : r.raw;
    const cols = r.tokens.corrupt.text.map((t, i) => `${i}:${visible(r.tokens.clean.text[i])}` +
      (t === r.tokens.clean.text[i] ? "" : `/${visible(t)}`));
    for (const [site, grid] of Object.entries(grids)) {
      const fig = document.createElement("figure");
      fig.className = "wide";
      const cap = document.createElement("figcaption");
      cap.textContent = `${site}: ${effect ? "normalized effect" : "raw metric (clean = corrupt: nothing to restore)"}`;
      const div = document.createElement("div");
      div.id = `chart-patch-${site}`;
      div.className = "chart";
      fig.append(cap, div);
      box.append(fig);
      const data = [];
      grid.forEach((row, l) => row.forEach((v, p) => data.push([p, l, v])));
      const values = data.map((d) => d[2]);
      draw(div.id, {
        grid: {left: 48, right: 16, top: 10, bottom: 84},
        tooltip: {trigger: "item", confine: true, renderMode: "richText",
          formatter: (p) => `${site} L${p.data[1]} position ${cols[p.data[0]]}\n${effect ? "effect" : "metric"} ` +
            `${fmt(p.data[2])} · raw ${fmt(r.raw[site][p.data[1]][p.data[0]])}`},
        xAxis: {type: "category", data: cols, name: "position: clean/corrupt", nameLocation: "middle", nameGap: 26},
        yAxis: {type: "category", inverse: true, data: grid.map((_, l) => `L${l}`)},
        visualMap: {min: effect ? Math.min(0, ...values) : Math.min(...values),
          max: effect ? Math.max(1, ...values) : Math.max(...values), calculable: false, orient: "horizontal",
          left: "center", bottom: 2, itemHeight: 160, itemWidth: 10,
          inRange: {color: VIRIDIS.map((c) => `rgb(${c.join(",")})`)}},
        series: [{name: site, type: "heatmap", data}],
      });
    }
  }

  // ------------------------------------------------------------------ start

  async function loadModels() {
    try {
      const list = await apiJSON("/v1/models");
      state.models = list.data;
      const sel = $("#model");
      sel.replaceChildren();
      for (const m of state.models) {
        const label = `${m.id} · ${m.n_layer} layers${m.residual ? "" : " · no shortcut"}`;
        sel.append(new Option(label, m.id));
      }
      await onModelChange();
      document.body.dataset.ready = "1";
    } catch (e) {
      showError(e);
      document.body.dataset.ready = "error";
    }
  }

  // the tuned lens is offered where the model has one (its card's tuned_lens)
  function syncLensChoices(card) {
    for (const sel of ["#lens-kind", "#lens-view"]) {
      const tuned = $(`${sel} option[value='tuned']`);
      tuned.disabled = !(card && card.tuned_lens);
      if (tuned.disabled && $(sel).value === "tuned") $(sel).value = "logit";
    }
  }

  function onModelChange() {
    const card = currentModel();
    syncLensChoices(card);
    state.lensView = null;
    buildLayerControls(card ? card.n_layer : 0);
    buildSteerLayers(card ? card.n_layer : 0);
    heat.reset(card ? card.n_layer : 0);
    state.baseline = null;  // "Generate again" reruns a request of this model only
    $("#again").disabled = true;
    $("#steer-again").disabled = true;
    return loadVectors("");  // vectors are made for one model: those of this one
  }

  function init() {
    heat.init();
    $("#generate").addEventListener("click", () => generate("generate"));
    $("#again").addEventListener("click", () => generate("again"));
    $("#stop").addEventListener("click", stop);
    $("#inspect-run").addEventListener("click", inspect);
    $("#compare-run").addEventListener("click", compare);
    $("#patch-run").addEventListener("click", runPatching);
    $("#model").addEventListener("change", onModelChange);
    $("#lens-view").addEventListener("change", () => {
      if (state.lensView) drawLens(state.lensView.d, state.lensView.traced, state.lensView.fullBytes);
    });
    $("#steer-again").addEventListener("click", () => generate("steer"));
    $("#steer-make").addEventListener("click", makeVector);
    $("#steer-vector").addEventListener("change", onVectorPicked);
    for (const sel of ["#steer-coeff", "#steer-layer", "#steer-positions"]) $(sel).addEventListener("input", syncSteer);
    $("#layer-controls").addEventListener("input", syncLayerControls);
    $("#reset-intervention").addEventListener("click", () => {
      const card = currentModel();
      buildLayerControls(card ? card.n_layer : 0);
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        generate("generate");
      } else if (e.key === "Escape" && state.running) {
        e.preventDefault();
        stop();
      }
    });
    window.addEventListener("resize", () => {
      Object.values(state.charts).forEach((c) => c.resize());
      layerHint();
    });
    $("#layer-controls").addEventListener("scroll", layerHint);
    setRunning(null);
    loadModels();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
