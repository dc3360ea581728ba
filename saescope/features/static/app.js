// saescope feature browser: a single page over the JSON API in saescope/features/server.py.
// No framework and no downloads: plain DOM calls, inline SVG for plots.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { meta: null, saes: [], sae: null, latent: null, browseOffset: 0, liveTokens: null, liveLatent: null };
const PAGE = 50;

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch(path, opts);
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

const fmt = (x, d = 3) => (x == null ? "–" : Number(x).toPrecision(d));
const pct = (f) => (f >= 0.01 ? (100 * f).toFixed(1) : (100 * f).toPrecision(2)) + "%";
const showText = (t) => t.replace(/\n/g, "↵").replace(/\t/g, "⇥");

function setOptions(select, values, labels) {
  select.replaceChildren(...values.map((v, i) => el("option", { value: v, text: labels ? labels[i] : v })));
}

// ---------------------------------------------------------------- pickers: model → site → layer → SAE

async function init() {
  const data = await api("/api/meta");
  state.meta = data.meta;
  state.saes = data.saes;
  const m = data.meta;
  $("run-info").textContent = `${m.model || "model ?"} · ${m.corpus} · ${Number(m.n_tokens).toLocaleString()} tokens · ${data.saes.length} SAEs`;
  setOptions($("pick-model"), [m.model || "model"]);
  const kinds = [...new Set(state.saes.map((s) => s.kind))];
  setOptions($("pick-kind"), kinds);
  const hash = new URLSearchParams(location.hash.slice(1));
  const start = state.saes.find((s) => String(s.sae) === hash.get("sae")) || state.saes[0];
  $("pick-kind").value = start.kind;
  fillLayers(start.layer);
  $("pick-layer").value = String(start.layer);
  fillSaes(start.sae);
  await selectSae(start.sae, hash.get("latent"));
}

function fillLayers() {
  const kind = $("pick-kind").value;
  const layers = [...new Set(state.saes.filter((s) => s.kind === kind).map((s) => s.layer))].sort((a, b) => a - b);
  setOptions($("pick-layer"), layers);
}

function fillSaes() {
  const kind = $("pick-kind").value, layer = Number($("pick-layer").value);
  const here = state.saes.filter((s) => s.kind === kind && s.layer === layer);
  setOptions($("pick-sae"), here.map((s) => s.sae), here.map((s) => s.name.split("/").slice(2).join("/") || s.name));
}

async function selectSae(saeId, latent) {
  state.sae = state.saes.find((s) => s.sae === Number(saeId));
  $("pick-sae").value = String(state.sae.sae);
  const s = state.sae;
  $("sae-summary").textContent = `${s.site} · ${s.d_sae} latents · L0 ${fmt(s.average_l0)} here · ${s.dead} never fired`;
  $("density").replaceChildren(densitySvg(s.density_hist, s.density_edges));
  $("token-results").replaceChildren();
  state.browseOffset = 0;
  await browse();
  if (latent != null && latent !== "") await showLatent(Number(latent));
  else { $("card").replaceChildren(el("p", { class: "muted", text: "Pick a latent: type its id, search a token, or browse." })); setHash(); }
  if (state.liveTokens) runLive();
}

function setHash() {
  const h = `sae=${state.sae.sae}` + (state.latent != null ? `&latent=${state.latent}` : "");
  history.replaceState(null, "", "#" + h);
}

// ---------------------------------------------------------------- side panels

function latentItem(id, note, title) {
  return el("li", { "data-latent": id, title: title || "", onclick: () => showLatent(id) },
    el("span", { class: "id", text: `#${id}` }), el("span", { class: "note", text: note }));
}

async function browse() {
  const order = $("browse-order").value;
  const rows = await api(`/api/sae/${state.sae.sae}/latents?order=${order}&offset=${state.browseOffset}&limit=${PAGE}`);
  $("browse-list").replaceChildren(...rows.map((r) =>
    latentItem(r.latent, `${pct(r.frequency)} · max ${fmt(r.max_act)} · ↑${showText(r.top_token)}`)));
}

async function searchToken(q) {
  const rows = await api(`/api/sae/${state.sae.sae}/search?token=${encodeURIComponent(q)}`);
  const list = rows.map((r) => latentItem(r.latent, `${JSON.stringify(r.token)} → ${fmt(r.act)} (${Math.round(100 * r.relative)}% of max)`));
  $("token-results").replaceChildren(...(list.length ? list : [el("li", { class: "muted", text: "no latent in the index fires on that token" })]));
}

// ---------------------------------------------------------------- plots (inline SVG)

const SVGNS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function bars(counts, { width = 300, height = 110, color = "#f08c00", xLabels = [], title = "" }) {
  const n = Math.max(counts.length, 1), top = Math.max(...counts, 1);
  const pad = 14, w = (width - 2) / n;
  const root = svg("svg", { width, height: height + pad, viewBox: `0 0 ${width} ${height + pad}`, role: "img" });
  if (title) root.append(svg("title", {}, title));
  counts.forEach((c, i) => {
    const h = c ? Math.max(1, (height - 4) * c / top) : 0;
    root.append(svg("rect", { x: 1 + i * w, y: height - h, width: Math.max(w - 1, 1), height: h, fill: color },
      svg("title", {}, `${c}`)));
  });
  root.append(svg("line", { x1: 0, x2: width, y1: height, y2: height, stroke: "#adb5bd" }));
  for (const [frac, text, anchor] of xLabels) {
    const t = svg("text", { x: frac * width, y: height + 11, "text-anchor": anchor });
    t.textContent = text;
    root.append(t);
  }
  return root;
}

function histogramSvg(card) {
  // the stored bins split [0, hist_max] into hist_bins equal steps; empty trailing bins are cut
  const upper = card.hist_max * card.histogram.length / card.hist_bins;
  return bars(card.histogram, {
    xLabels: [[0, "0", "start"], [1, fmt(upper, 2), "end"]],
    title: `activation histogram of ${card.n_fired} firings`,
  });
}

function densitySvg(counts, edges) {
  return bars(counts, {
    width: 270, height: 70, color: "#4dabf7",
    xLabels: [[0, `1e${edges[0]}`, "start"], [1, `1e${edges[edges.length - 1]}`, "end"]],
    title: "latents per log10 firing frequency",
  });
}

// ---------------------------------------------------------------- latent card

function tokenSpan(text, act, max, focus) {
  const alpha = max > 0 ? Math.min(1, Math.max(0, act) / max) : 0;
  const span = el("span", { class: "tok" + (focus ? " focus" : ""), title: `${JSON.stringify(text)}  ${fmt(act)}` }, showText(text));
  if (alpha > 0) span.style.background = `rgba(247, 103, 7, ${(0.08 + 0.82 * alpha).toFixed(3)})`;
  return span;
}

function contextRow(c, max) {
  return el("div", { class: "ctx-row" }, el("span", { class: "act", text: fmt(c.act) }),
    el("span", { class: "context" }, ...c.text.map((t, i) => tokenSpan(t, c.acts[i], max, i === c.focus))));
}

function logitTable(rows, cls) {
  return el("table", { class: `logits ${cls}` }, ...rows.map(([t, v]) =>
    el("tr", {}, el("td", { class: "t", text: showText(t) }), el("td", { class: "v", text: v.toFixed(3) }))));
}

async function showLatent(latent) {
  const t0 = performance.now();
  let card;
  try {
    card = await api(`/api/sae/${state.sae.sae}/latent/${latent}`);
  } catch (err) {
    $("card").replaceChildren(el("p", { class: "muted", text: err.message }));
    return;
  }
  state.latent = latent;
  setHash();
  $("latent-input").value = latent;
  renderCard(card);
  const ms = performance.now() - t0;
  document.body.dataset.cardMs = ms.toFixed(1);
  $("card-time").textContent = `loaded in ${ms.toFixed(0)} ms`;
  if (state.liveTokens) paintLive();
}

function renderCard(card) {
  const max = card.max_act;
  const top = card.contexts.filter((c) => c.kind === "top");
  const sections = [];
  for (let j = 0; j < card.n_octaves; j++) {
    const rows = card.contexts.filter((c) => c.kind === `q${j}`);
    if (!rows.length) continue;
    const hi = card.hist_max / 2 ** j, lo = j === card.n_octaves - 1 ? 0 : hi / 2;
    sections.push(el("h3", { text: `Random sample with activation in (${fmt(lo, 2)}, ${fmt(hi, 2)}]` }),
      ...rows.map((c) => contextRow(c, max)));
  }
  const every = card.frequency > 0 ? Math.round(1 / card.frequency) : Infinity;
  const everyText = every >= 2 && every < Infinity ? ` (1 in ${every.toLocaleString()} tokens)` : "";
  $("card").replaceChildren(
    el("div", { class: "card-head" },
      el("h2", { text: `Latent ${card.latent}` }),
      el("span", { class: "muted", text: state.sae.name }),
      el("span", { id: "card-time", class: "muted" })),
    el("div", { class: "stats" },
      el("span", { class: "stat" }, "frequency ", el("b", { text: pct(card.frequency) }), everyText),
      el("span", { class: "stat" }, "max ", el("b", { text: fmt(card.max_act) })),
      el("span", { class: "stat" }, "mean when firing ", el("b", { text: fmt(card.mean_act) })),
      el("span", { class: "stat" }, "fired ", el("b", { text: card.n_fired.toLocaleString() }), " times")),
    el("div", { class: "grid2" },
      el("div", {}, el("h3", { text: "Activation histogram" }), card.n_fired ? histogramSvg(card) : el("p", { class: "muted", text: "never fired" })),
      el("div", {}, el("h3", { text: "Promoted tokens" }), logitTable(card.top_logits, "pos")),
      el("div", {}, el("h3", { text: "Suppressed tokens" }), logitTable(card.bottom_logits, "neg"))),
    el("h3", { text: "Top activations" }),
    el("div", { id: "top-contexts" }, ...(top.length ? top.map((c) => contextRow(c, max)) : [el("p", { class: "muted", text: "never fired on this corpus" })])),
    ...sections,
  );
}

// ---------------------------------------------------------------- live text box

async function runLive() {
  $("live-status").textContent = "running the model…";
  try {
    const res = await api(`/api/sae/${state.sae.sae}/live`, { text: $("live-text").value, latent: state.latent });
    state.liveTokens = res.tokens;
    state.liveLatent = res.latent;
    $("live-status").textContent = "click a token to see its latents" + (state.latent != null ? `; colour = latent ${state.latent}` : "");
    paintLive();
  } catch (err) {
    $("live-status").textContent = err.message;
  }
}

async function paintLive() {
  if (state.latent !== state.liveLatent) return runLive();  // colours belong to the shown latent
  const acts = state.liveTokens.map((t) => (state.latent != null ? t.act : (t.latents[0] || [0, 0])[1]));
  const max = Math.max(...acts, 1e-9);
  $("live-tokens").replaceChildren(...state.liveTokens.map((t, i) => {
    const span = tokenSpan(t.text, acts[i], max, false);
    span.addEventListener("click", () => {
      document.querySelectorAll("#live-tokens .tok.picked").forEach((s) => s.classList.remove("picked"));
      span.classList.add("picked");
      $("live-detail").replaceChildren(`${JSON.stringify(t.text)}: `, ...(t.latents.length ? t.latents.flatMap(([l, a]) =>
        [el("a", { href: "#", text: `#${l}`, onclick: (e) => { e.preventDefault(); showLatent(l); } }), ` ${fmt(a)}  `]) : ["no latent fires"]));
    });
    return span;
  }));
}

// ---------------------------------------------------------------- wiring

$("pick-kind").addEventListener("change", () => { fillLayers(); fillSaes(); selectSae($("pick-sae").value); });
$("pick-layer").addEventListener("change", () => { fillSaes(); selectSae($("pick-sae").value); });
$("pick-sae").addEventListener("change", () => selectSae($("pick-sae").value));
$("latent-form").addEventListener("submit", (e) => { e.preventDefault(); if ($("latent-input").value !== "") showLatent(Number($("latent-input").value)); });
$("token-form").addEventListener("submit", (e) => { e.preventDefault(); searchToken($("token-input").value); });
$("browse-order").addEventListener("change", () => { state.browseOffset = 0; browse(); });
$("browse-prev").addEventListener("click", () => { state.browseOffset = Math.max(0, state.browseOffset - PAGE); browse(); });
$("browse-next").addEventListener("click", () => { state.browseOffset += PAGE; browse(); });
$("live-form").addEventListener("submit", (e) => { e.preventDefault(); runLive(); });
init().catch((err) => { $("card").replaceChildren(el("p", { class: "muted", text: `could not load: ${err.message}` })); });
