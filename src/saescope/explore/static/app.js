// The explorer's pages: one app routed by the URL fragment, built with DOM calls (never innerHTML
// with data, so token text cannot inject markup). Every request goes to this server's /api.
"use strict";

const view = document.getElementById("view");
let runInfo;  // GET /api/run, fetched once: it does not change while the server runs

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

async function api(path, body) {
  const init = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch("/api" + path, init);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const detail = Array.isArray(data.detail) ? data.detail.map(d => d.msg).join("; ") : data.detail;
    throw new Error(`${r.status}: ${detail || r.statusText}`);
  }
  return data;
}

const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toPrecision(digits));
const pct = x => (x * 100).toPrecision(3) + "%";
const shown = t => t.replace(/\n/g, "↵").replace(/\t/g, "⇥");
const enc = encodeURIComponent;

// One token, shaded by its activation relative to `scale`; the value is on hover (title).
function token(text, act, scale, highlight = false) {
  const a = scale > 0 ? Math.min(Math.max(act, 0) / scale, 1) : 0;
  return el("span", {class: "tok" + (highlight ? " hl" : ""), title: `${shown(text)}  ${fmt(act, 4)}`,
                     "data-act": act, style: `background: rgba(255, 140, 0, ${a.toFixed(3)})`}, shown(text));
}

function tokens(list, acts, scale, highlight = -1) {
  return el("div", {class: "tokens"}, list.map((t, i) => token(t, acts[i], scale, i === highlight)));
}

function failure(target, err) { target.replaceChildren(el("p", {class: "error"}, err.message)); }

// ---------------------------------------------------------------- index: the SAEs and the report's plots
async function indexPage() {
  const [run, saes] = await Promise.all([runInfo, api("/saes")]);
  const cols = [["id", "SAE"], ["site", "site"], ["arch", "arch"], ["d_sae", "width"], ["l0", "L0"],
                ["fvu", "FVU"], ["delta_loss", "Δ loss"], ["ce_loss_recovered", "CE recovered"],
                ["dead_fraction", "dead"], ["n_tokens", "tokens"]];
  const value = (s, k) => (k in s ? s[k] : (s.metrics || {})[k]);
  const rows = saes.map(s => el("tr", {class: "sae-row"}, cols.map(([k]) => k === "id"
    ? el("td", {}, el("a", {href: `#/sae/${enc(s.id)}`, class: "sae-link"}, s.id))
    : el("td", {class: typeof value(s, k) === "number" ? "num" : ""},
         typeof value(s, k) === "number" && !Number.isInteger(value(s, k)) ? fmt(value(s, k)) : value(s, k) ?? "–"))));
  view.replaceChildren(
    el("h1", {}, `${saes.length} SAEs on ${run.model}`),
    el("p", {class: "muted"}, "L0 from the feature database's held-out text; FVU, Δ loss (nats), CE recovered and dead from the run's evaluation."),
    el("table", {id: "saes"}, el("tr", {}, cols.map(([, label]) => el("th", {}, label))), rows),
    run.plots.length ? el("h2", {}, "Report") : null,
    el("div", {class: "grid plots"}, run.plots.map(src => el("img", {src, alt: src.split("/").pop()}))));
}

// ---------------------------------------------------------------- one SAE: latent list and "which latents fire"
async function saePage(id, params) {
  const sort = params.get("sort") || "density", order = params.get("order") || "desc";
  const q = params.get("q") || "", offset = Number(params.get("offset") || 0), limit = 50;
  const go = changes => {
    const p = new URLSearchParams({sort, order, q, offset, ...changes});
    location.hash = `#/sae/${enc(id)}?${p}`;
  };
  const [page, saes] = await Promise.all([
    api(`/saes/${enc(id)}/latents?` + new URLSearchParams({sort, order, q, offset, limit})), api("/saes")]);
  const sae = saes.find(s => s.id === id);
  const header = [["latent", "latent"], ["density", "density"], ["max_act", "max act"], ["mean_act", "mean act"]].map(
    ([k, label]) => el("th", {class: "sortable num" + (k === sort ? " sorted" : ""), "data-sort": k,
                              "data-arrow": order === "desc" ? " ▼" : " ▲",
                              on: {click: () => go({sort: k, order: k === sort && order === "desc" ? "asc" : "desc", offset: 0})}}, label));
  const search = el("input", {type: "text", id: "latent-search", placeholder: "latent number or top token", value: q});
  search.addEventListener("keydown", e => { if (e.key === "Enter") go({q: search.value, offset: 0}); });
  const rows = page.latents.map(l => el("tr", {class: "latent-row"},
    el("td", {class: "num"}, el("a", {href: `#/sae/${enc(id)}/latent/${l.latent}`}, l.latent)),
    el("td", {class: "num"}, pct(l.density)), el("td", {class: "num"}, fmt(l.max_act)), el("td", {class: "num"}, fmt(l.mean_act)),
    el("td", {class: "tokens"}, l.top_tokens.map(t => shown(JSON.stringify(t))).join("  "))));
  const text = el("textarea", {id: "fire-text"}, "The quick brown fox jumps over the lazy dog.");
  const out = el("div", {id: "fire-out"});
  view.replaceChildren(
    el("h1", {}, `${id}`), el("p", {class: "muted"}, `${sae.arch} · ${sae.site} · ${sae.d_sae} latents · L0 ${fmt(sae.l0)} over ${sae.n_tokens} held-out tokens`),
    el("div", {class: "grid"},
      el("div", {class: "card"}, el("h2", {}, "Latents"),
        el("div", {class: "pager"}, search, el("button", {on: {click: () => go({q: search.value, offset: 0})}}, "Search"),
          el("span", {class: "muted", id: "latent-count"}, `${page.total} latents`)),
        el("table", {id: "latents"}, el("tr", {}, header, el("th", {}, "top tokens")), rows),
        el("div", {class: "pager"},
          el("button", {on: {click: () => go({offset: Math.max(0, offset - limit)})}, ...(offset ? {} : {disabled: ""})}, "‹ prev"),
          el("span", {}, `${page.total ? offset + 1 : 0}–${offset + page.latents.length} of ${page.total}`),
          el("button", {on: {click: () => go({offset: offset + limit})}, ...(offset + limit < page.total ? {} : {disabled: ""})}, "next ›"))),
      el("div", {class: "card"}, el("h2", {}, "Which latents fire on this text"), text,
        el("button", {id: "fire-run", on: {click: () => fire(id, text.value, out)}}, "Run"), out)));
}

async function fire(id, text, out) {
  out.replaceChildren(el("p", {class: "muted"}, "Running the model…"));
  try {
    const r = await api(`/saes/${enc(id)}/activations`, {text});
    const detail = el("div", {id: "tok-detail", class: "muted"}, "Hover a token for its strongest latents.");
    const strongest = r.per_token.map(m => Math.max(0, ...Object.values(m)));
    const scale = Math.max(...strongest, 1e-9);
    const toks = r.tokens.map((t, i) => {
      const node = token(t, strongest[i], scale);
      node.addEventListener("mouseenter", () => {
        const top = Object.entries(r.per_token[i]).sort((a, b) => b[1] - a[1]).slice(0, 8);
        detail.replaceChildren(`${JSON.stringify(t)}: `, ...(top.length ? top.map(([j, v]) =>
          el("span", {}, el("a", {href: `#/sae/${enc(id)}/latent/${j}`}, `#${j}`), ` ${fmt(v)}  `)) : ["no latent fires"]));
      });
      return node;
    });
    out.replaceChildren(el("div", {class: "tokens"}, toks), detail, el("h2", {}, "Top latents on this text"),
      el("table", {id: "fire-top"}, el("tr", {}, el("th", {}, "latent"), el("th", {class: "num"}, "max act")),
        r.top_latents.map(l => el("tr", {}, el("td", {}, el("a", {href: `#/sae/${enc(id)}/latent/${l.latent}`}, `#${l.latent}`)),
                                   el("td", {class: "num"}, fmt(l.max_act))))));
  } catch (err) { failure(out, err); }
}

// ---------------------------------------------------------------- one latent
function histogram(h) {
  const top = Math.max(...h.counts, 1);
  return el("div", {},
    el("div", {class: "bars", id: "histogram"}, h.counts.map((c, i) =>
      el("div", {style: `height: ${(100 * c / top).toFixed(1)}%`, title: `${fmt(h.edges[i])}–${fmt(h.edges[i + 1])}: ${c}`}))),
    el("div", {class: "muted"}, `${fmt(h.edges[0])} … ${fmt(h.edges[h.edges.length - 1])} · ${h.sample} of ${h.firings} firings sampled`));
}

function example(ex, scale) {
  return el("div", {class: "example"}, el("span", {class: "act"}, fmt(ex.act)), tokens(ex.tokens, ex.acts, scale, ex.highlight));
}

async function latentPage(id, i) {
  const L = await api(`/saes/${enc(id)}/latents/${i}`);
  const scale = L.max_act;
  const bands = {};
  for (const ex of L.quantile_examples) (bands[ex.band] = bands[ex.band] || []).push(ex);
  const logitTable = (list, label) => el("table", {}, el("tr", {}, el("th", {}, label), el("th", {class: "num"}, "")),
    list.map(x => el("tr", {}, el("td", {class: "tokens"}, shown(JSON.stringify(x.token))), el("td", {class: "num"}, fmt(x.value)))));

  const testText = el("textarea", {id: "test-text"}, L.top_examples.length ? L.top_examples[0].tokens.join("") : "");
  const testOut = el("div", {id: "test-out"});
  const prompt = el("input", {type: "text", id: "steer-prompt", value: "The", style: "width: 50%"});
  const alpha = el("input", {type: "number", id: "steer-alpha", value: (4 * (L.max_act || 1)).toPrecision(3), step: "any", style: "width: 8em"});
  const length = el("input", {type: "number", id: "steer-tokens", value: 20, min: 1, max: 64, style: "width: 5em"});
  const steerOut = el("div", {id: "steer-out"});

  view.replaceChildren(
    el("p", {}, el("a", {href: `#/sae/${enc(id)}`}, `‹ ${id}`)),
    el("h1", {}, `${id} · latent ${i}`),
    el("p", {id: "latent-stats"}, `density ${pct(L.density)} · max ${fmt(L.max_act)} · mean ${fmt(L.mean_act)} · top tokens `,
      el("span", {class: "tokens"}, L.top_tokens.map(t => shown(JSON.stringify(t))).join(" "))),
    el("div", {class: "grid"},
      el("div", {class: "card"}, el("h2", {}, "Non-zero activations"), histogram(L.histogram)),
      el("div", {class: "card"}, el("h2", {}, "Logits of the decoder direction"),
        el("p", {class: "muted"}, L.logit_note),
        el("div", {class: "side"}, logitTable(L.logits.positive, "promotes"), logitTable(L.logits.negative, "suppresses"))),
      el("div", {class: "card"}, el("h2", {}, "Nearest latents (decoder cosine)"),
        el("table", {id: "neighbours"}, L.neighbours.map(n => el("tr", {},
          el("td", {}, el("a", {href: `#/sae/${enc(id)}/latent/${n.latent}`}, `#${n.latent}`)), el("td", {class: "num"}, fmt(n.cosine))))))),
    el("h2", {}, "Top activations"),
    el("div", {class: "card", id: "top-examples"}, L.top_examples.length
      ? L.top_examples.map(ex => example(ex, scale)) : el("p", {class: "muted"}, "This latent never fired on the held-out text.")),
    el("h2", {}, "Across the activation range (quantiles of its firings, lowest first)"),
    el("div", {class: "card", id: "quantile-examples"}, Object.keys(bands).length ? Object.entries(bands).map(([b, exs]) =>
      el("div", {}, el("div", {class: "muted"}, `band ${Number(b) + 1} of ${Object.keys(bands).length}`), exs.map(ex => example(ex, scale))))
      : el("p", {class: "muted"}, "No firings.")),
    el("div", {class: "grid"},
      el("div", {class: "card"}, el("h2", {}, "Test your text"), testText,
        el("button", {id: "test-run", on: {click: () => testLatent(id, i, testText.value, scale, testOut)}}, "Run"), testOut),
      el("div", {class: "card"}, el("h2", {}, "Steering"),
        el("div", {class: "pager"}, "prompt", prompt), el("div", {class: "pager"}, "α", alpha, "new tokens", length,
          el("button", {id: "steer-run", on: {click: () => steer(id, i, prompt.value, alpha.value, length.value, steerOut)}}, "Generate")),
        steerOut)));
}

async function testLatent(id, i, text, scale, out) {
  out.replaceChildren(el("p", {class: "muted"}, "Running the model…"));
  try {
    const r = await api(`/saes/${enc(id)}/activations`, {text, latent: i});
    const best = Math.max(0, ...r.activations);
    out.replaceChildren(tokens(r.tokens, r.activations, Math.max(scale, best)),
      el("p", {class: "muted"}, `strongest ${fmt(best)} (shading relative to the held-out max ${fmt(scale)})`));
  } catch (err) { failure(out, err); }
}

async function steer(id, i, prompt, alpha, n, out) {
  out.replaceChildren(el("p", {class: "muted"}, "Generating twice…"));
  try {
    const r = await api(`/saes/${enc(id)}/steer`, {prompt, latent: i, alpha: Number(alpha), max_new_tokens: Number(n)});
    out.replaceChildren(el("p", {class: "muted"}, `greedy decoding; α·d_${i} added at ${r.site} on every position`),
      el("div", {class: "side"},
        el("div", {}, el("b", {}, "without"), el("pre", {id: "steer-plain"}, r.prompt, el("b", {}, r.unsteered))),
        el("div", {}, el("b", {}, `with α = ${r.alpha}`), el("pre", {id: "steer-steered"}, r.prompt, el("b", {}, r.steered)))));
  } catch (err) { failure(out, err); }
}

// ---------------------------------------------------------------- routing
async function route() {
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  try {
    if (parts[0] === "graphs") await graphsPage();
    else if (parts[0] === "graph") await graphPage(parts[1]);
    else if (parts[0] === "sae" && parts[2] === "latent") await latentPage(parts[1], Number(parts[3]));
    else if (parts[0] === "sae") await saePage(parts[1], new URLSearchParams(query));
    else await indexPage();
  } catch (err) { failure(view, err); }
  window.scrollTo(0, 0);
  document.body.dataset.ready = location.hash;  // tests wait on this
}

runInfo = api("/run");
runInfo.then(r => { document.getElementById("model").textContent = r.model + (r.live ? "" : " (no model: live text off)"); });
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);  // after graph.js, which defines the graph pages
