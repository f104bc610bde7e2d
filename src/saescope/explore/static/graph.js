// Attribution graphs: the list (with a form that makes a new one), and one graph drawn as SVG —
// prompt tokens across, layers up, nodes sized by influence, edges by weight; hover for a node's
// activation and label, click to pin (and open a feature's page), and interventions on pinned
// features. Uses el() and api() of app.js; no data is ever put in markup as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

async function graphsPage() {
  const r = await api("/graphs");
  const prompt = el("input", {type: "text", id: "graph-prompt", placeholder: "a prompt whose next token to explain",
                              style: "width: 60%"});
  const status = el("span", {class: "muted", id: "graph-status"});
  const make = async () => {
    status.textContent = "Tracing… (a backward pass per feature batch)";
    try {
      const made = await api("/graphs", {prompt: prompt.value, max_feature_nodes: 1024});
      location.hash = `#/graph/${encodeURIComponent(made.slug)}`;
    } catch (err) { status.textContent = err.message; }
  };
  view.replaceChildren(
    el("h1", {}, "Attribution graphs"),
    r.can_make ? el("div", {class: "pager"}, prompt, el("button", {id: "graph-make", on: {click: make}}, "Make graph"), status)
               : el("p", {class: "muted"}, "Start the server with --transcoders to make graphs here."),
    el("table", {id: "graphs"}, el("tr", {}, el("th", {}, "graph"), el("th", {}, "prompt"), el("th", {}, "dictionary")),
      r.graphs.map(g => el("tr", {}, el("td", {}, el("a", {href: `#/graph/${encodeURIComponent(g.slug)}`, class: "graph-link"}, g.slug)),
                                     el("td", {class: "tokens"}, shown(g.prompt)), el("td", {}, g.scan)))));
}

async function graphPage(slug) {
  const g = await api(`/graphs/${encodeURIComponent(slug)}`);
  const tokensShown = g.metadata.prompt_tokens;
  const layers = g.nodes.filter(n => n.feature_type !== "logit" && n.layer !== "E").map(n => Number(n.layer));
  const top = Math.max(0, ...layers) + 1;
  const rowOf = n => (n.layer === "E" ? 0 : n.feature_type === "logit" ? top + 1 : Number(n.layer) + 1);
  const colW = 90, rowH = 44, padX = 40, padY = 24;
  const width = padX * 2 + colW * tokensShown.length, height = padY * 2 + rowH * (top + 1);
  // nodes sharing a cell spread out along it
  const cells = {};
  for (const n of g.nodes) (cells[`${rowOf(n)}:${n.ctx_idx}`] = cells[`${rowOf(n)}:${n.ctx_idx}`] || []).push(n);
  const at = {};
  for (const list of Object.values(cells)) list.forEach((n, i) => {
    at[n.node_id] = [padX + colW * n.ctx_idx + colW * (i + 1) / (list.length + 1), height - padY - rowH * rowOf(n)];
  });
  const maxW = Math.max(1e-12, ...g.links.map(l => Math.abs(l.weight)));
  const edges = g.links.map(l => {
    const [x1, y1] = at[l.source], [x2, y2] = at[l.target];
    return svg("line", {x1, y1, x2, y2, class: "edge", "data-source": l.source, "data-target": l.target,
                        stroke: l.weight > 0 ? "#2b6cb0" : "#c53030", "stroke-width": (0.3 + 3 * Math.abs(l.weight) / maxW).toFixed(2),
                        "stroke-opacity": 0.35});
  });
  const tip = el("div", {id: "graph-tip", class: "muted"}, "Hover a node; click a feature to pin it.");
  const pinned = new Map();
  const pins = el("div", {id: "pins"});
  const label = n => n.feature_type === "cross layer transcoder"
    ? `L${n.layer} #${n.node_id.split("_")[1]} @${n.ctx_idx} act ${fmt(n.activation)}${n.clerp ? " · " + n.clerp : ""}`
    : n.clerp || `${n.feature_type} L${n.layer} @${n.ctx_idx}`;
  const drawPins = () => pins.replaceChildren(...[...pinned.values()].map(n => {
    const [layer, latent] = n.node_id.split("_");
    const sae = g.feature_saes[layer];
    return el("div", {class: "pin", "data-node": n.node_id}, label(n), " value ",
      el("input", {type: "number", step: "any", value: "0", class: "pin-value", style: "width: 6em"}),
      sae ? el("a", {href: `#/sae/${encodeURIComponent(sae)}/latent/${latent}`, class: "feature-link"}, " feature page ›") : null);
  }));
  const nodes = g.nodes.map(n => {
    const [x, y] = at[n.node_id];
    const r = 3 + 7 * (1 - Math.min(Math.max(n.influence ?? 1, 0), 1));
    const shape = n.feature_type === "cross layer transcoder"
      ? svg("circle", {cx: x, cy: y, r}) : svg("rect", {x: x - r, y: y - r, width: 2 * r, height: 2 * r});
    shape.setAttribute("class", "node " + n.feature_type.replace(/ /g, "-"));
    shape.setAttribute("data-node", n.node_id);
    shape.addEventListener("mouseenter", () => {
      tip.textContent = label(n);
      for (const e of edges) {
        const on = e.dataset.source === n.node_id || e.dataset.target === n.node_id;
        e.setAttribute("stroke-opacity", on ? 0.9 : 0.12);
      }
    });
    shape.addEventListener("click", () => {
      if (n.feature_type !== "cross layer transcoder") return;
      if (pinned.has(n.node_id)) pinned.delete(n.node_id); else pinned.set(n.node_id, n);
      shape.classList.toggle("pinned");
      drawPins();
    });
    return shape;
  });
  const axis = tokensShown.map((t, i) => svg("text", {x: padX + colW * (i + 0.5), y: height - 4, "text-anchor": "middle",
                                                      class: "axis"}, shown(t).slice(0, 12)));
  const out = el("div", {id: "intervene-out"});
  const run = async () => {
    const chosen = [...pins.querySelectorAll(".pin")].map(p => {
      const [layer, latent, position] = p.dataset.node.split("_").map(Number);
      return {layer, latent, position, value: Number(p.querySelector(".pin-value").value)};
    });
    if (!chosen.length) { out.replaceChildren(el("p", {class: "muted"}, "Pin a feature first.")); return; }
    out.replaceChildren(el("p", {class: "muted"}, "Running the model twice…"));
    try {
      const r = await api(`/graphs/${encodeURIComponent(slug)}/intervene`, {interventions: chosen, new_tokens: 8});
      const table = (side, id) => el("table", {id}, el("tr", {}, el("th", {}, "token"), el("th", {class: "num"}, "p")),
        side.top.map(t => el("tr", {}, el("td", {class: "tokens"}, shown(JSON.stringify(t.token))), el("td", {class: "num"}, fmt(t.prob)))));
      out.replaceChildren(el("div", {class: "side"},
        el("div", {}, el("b", {}, "unchanged"), table(r.clean, "logits-clean"), el("pre", {}, r.clean.continuation)),
        el("div", {}, el("b", {}, "intervened"), table(r.intervened, "logits-intervened"), el("pre", {}, r.intervened.continuation))));
    } catch (err) { failure(out, err); }
  };
  view.replaceChildren(
    el("p", {}, el("a", {href: "#/graphs"}, "‹ graphs")),
    el("h1", {}, slug), el("p", {class: "tokens"}, shown(g.metadata.prompt)),
    el("p", {class: "muted"}, `${g.nodes.length} nodes, ${g.links.length} edges after pruning · ${g.metadata.scan} · `
      + "blue excites, red inhibits; squares are errors, embeddings and logits"),
    el("div", {class: "card graph-card"}, svg("svg", {id: "graph", width, height, viewBox: `0 0 ${width} ${height}`},
      svg("g", {}, edges), svg("g", {}, nodes), svg("g", {}, axis))),
    tip,
    el("div", {class: "card"}, el("h2", {}, "Intervene on pinned features"), pins,
      el("button", {id: "intervene-run", on: {click: run}}, "Run"), out));
}
