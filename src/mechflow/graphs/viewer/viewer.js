// mechflow attribution-graph viewer: draws a pruned graph (Neuronpedia / circuit-tracer JSON) as an
// SVG laid out by layer (rows) x token position (columns). No dependencies, works from file://.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("graph-data").textContent);
  const graph = data.graph, features = data.features || {}, title = data.title || graph.metadata.slug;
  const svgNS = "http://www.w3.org/2000/svg";
  const nodes = graph.nodes, links = graph.links;
  const tokens = graph.metadata.prompt_tokens;
  // reduce, not Math.max(...array): spreading a full-size graph's 400k links overflows the call stack
  const maxOf = (xs, start) => xs.reduce((m, x) => (x > m ? x : m), start);
  const nLayers = maxOf(nodes.filter(n => n.feature_type === "logit").map(n => +n.layer - 1), 0);
  // draw the strongest links only (a full-size pruned graph keeps 300-400k; SVG draws ~20k fluently)
  const maxDrawn = data.max_drawn_links || links.length;
  const drawnLinks = links.length <= maxDrawn ? links
    : links.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, maxDrawn);
  const incoming = {};
  for (const l of links) (incoming[l.target] = incoming[l.target] || []).push(l);

  // own influence share from the cumulative scores (nodes sorted by influence, most influential first)
  const byInfluence = nodes.filter(n => n.influence !== null && n.influence !== undefined)
    .slice().sort((a, b) => a.influence - b.influence);
  const share = {};
  let prev = 0;
  for (const n of byInfluence) { share[n.node_id] = Math.max(0, n.influence - prev); prev = n.influence; }
  const maxShare = maxOf(Object.values(share), 1e-9);

  function row(n) {            // 0 = embeddings, 1..nLayers = layers 0..nLayers-1, top = logits
    if (n.feature_type === "embedding") return 0;
    if (n.feature_type === "logit") return nLayers + 1;
    return +n.layer + 1;
  }
  // fit the canvas: columns share its width (at least 60 px each, then it scrolls), rows its height
  const canvas = document.getElementById("canvas");
  const left = 60, top = 42, bottom = 50;
  const colW = Math.max(60, (Math.max(600, canvas.clientWidth) - left - 30) / Math.max(1, tokens.length));
  const rowH = Math.max(22, Math.min(70, (Math.max(400, canvas.clientHeight) - top - bottom) / (nLayers + 2)));
  const width = left + colW * tokens.length + 30, height = top + rowH * (nLayers + 2) + bottom;

  // place nodes: cells of (row, position) hold several nodes side by side
  const cells = {};
  for (const n of nodes) { const key = row(n) + ":" + n.ctx_idx; (cells[key] = cells[key] || []).push(n); }
  const pos = {};
  // logits: one row, right-aligned under the last position, spaced so their labels fit
  const logitNodes = nodes.filter(n => n.feature_type === "logit");
  const logitGap = Math.max(70, Math.min(colW, (colW * tokens.length) / Math.max(1, logitNodes.length)));
  logitNodes.forEach((n, i) => {
    const lastX = left + colW * (tokens.length - 0.5);
    pos[n.node_id] = [Math.max(left + 30, lastX - (logitNodes.length - 1 - i) * logitGap), top + rowH / 2];
  });
  for (const key in cells) {
    if (cells[key][0].feature_type === "logit") continue;
    const list = cells[key].sort((a, b) => (share[b.node_id] || 0) - (share[a.node_id] || 0));
    list.forEach((n, i) => {
      const k = list.length, spread = Math.min(colW - 14, 12 * k);
      const x = left + colW * (n.ctx_idx + 0.5) + (k > 1 ? -spread / 2 + spread * i / (k - 1) : 0);
      const y = top + rowH * (nLayers + 1 - row(n)) + rowH / 2;
      pos[n.node_id] = [x, y];
    });
  }
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.setAttribute("id", "graph-svg");
  svg.setAttribute("data-node-count", nodes.length);
  svg.setAttribute("data-link-count", links.length);
  svg.setAttribute("data-drawn-link-count", drawnLinks.length);
  function el(name, attrs, parent) {
    const e = document.createElementNS(svgNS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    (parent || svg).appendChild(e);
    return e;
  }
  // row labels and token labels
  for (let r = 0; r <= nLayers + 1; r++) {
    const y = top + rowH * (nLayers + 1 - r) + rowH / 2 + 4;
    const label = r === 0 ? "Emb" : r === nLayers + 1 ? "Logit" : "L" + (r - 1);
    el("text", { x: 8, y: y }).textContent = label;
    el("line", { x1: left, x2: width - 20, y1: y - 4, y2: y - 4, stroke: "#f0f0f0" });
  }
  tokens.forEach((t, i) => {
    const tx = el("text", { x: left + colW * (i + 0.5), y: height - bottom + 22, "text-anchor": "middle" });
    tx.textContent = t.length > 14 ? t.slice(0, 13) + "…" : t;
  });
  // supernodes: dashed boxes around their members
  const linksG = el("g", { id: "links" }), superG = el("g", { id: "supernodes" }), nodesG = el("g", { id: "nodes" });
  for (const group of (graph.qParams.supernodes || [])) {
    const pts = group.slice(1).map(id => pos[id]).filter(Boolean);
    if (pts.length < 2) continue;
    const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
    const box = el("rect", { class: "supernode", x: Math.min(...xs) - 9, y: Math.min(...ys) - 9, rx: 6,
      width: Math.max(...xs) - Math.min(...xs) + 18, height: Math.max(...ys) - Math.min(...ys) + 18 }, superG);
    el("title", {}, box).textContent = group[0];
  }
  const maxW = maxOf(drawnLinks.map(l => Math.abs(l.weight)), 1e-9);
  const linkEls = [];
  for (const l of drawnLinks.slice().reverse()) {  // weakest first, so the strongest are drawn on top
    const a = pos[l.source], b = pos[l.target];
    if (!a || !b) continue;
    const mid = (a[1] + b[1]) / 2;
    const p = el("path", { class: "link " + (l.weight >= 0 ? "pos" : "neg"),
      d: `M${a[0]},${a[1]} C${a[0]},${mid} ${b[0]},${mid} ${b[0]},${b[1]}`,
      "stroke-width": (0.4 + 3.5 * Math.abs(l.weight) / maxW).toFixed(2) }, linksG);
    p.__link = l; linkEls.push(p);
  }
  const nodeEls = {};
  for (const n of nodes) {
    const [x, y] = pos[n.node_id];
    const r = 3 + 7 * Math.sqrt((share[n.node_id] || 0) / maxShare);
    const cls = { "cross layer transcoder": "feature", "mlp reconstruction error": "error",
      "embedding": "embedding", "logit": "logit" }[n.feature_type];
    let e;
    if (cls === "feature") e = el("circle", { cx: x, cy: y, r: r }, nodesG);
    else if (cls === "error") e = el("rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r }, nodesG);
    else e = el("rect", { x: x - 9, y: y - 6, width: 18, height: 12, rx: 3 }, nodesG);
    e.setAttribute("class", "node " + cls);
    e.setAttribute("data-node-id", n.node_id);
    e.addEventListener("mouseenter", () => show(n));
    e.addEventListener("click", () => { e.classList.toggle("pinned"); });
    nodeEls[n.node_id] = e;
    if (cls === "logit") {
      const m = /^Output "(.*)" \(p=([0-9.]+)\)$/.exec(n.clerp);
      const word = m ? m[1] : n.clerp;
      const k = logitNodes.indexOf(n);  // alternate label heights so neighbours do not overlap
      const t = el("text", { x: x, y: y - 10 - (k % 2) * 12, "text-anchor": "middle" }, nodesG);
      t.textContent = (word.length > 10 ? word.slice(0, 9) + "…" : word) + (m ? " " + m[2] : "");
    }
  }
  canvas.appendChild(svg);
  document.getElementById("title").textContent = title;
  document.getElementById("meta").textContent =
    `${nodes.length} nodes, ${links.length} links` +
    (drawnLinks.length < links.length ? ` (the ${drawnLinks.length} strongest drawn)` : "") +
    ` — prompt: ${graph.metadata.prompt}` +
    (data.scores ? ` — replacement ${data.scores.replacement.toFixed(3)}, completeness ${data.scores.completeness.toFixed(3)} (pruned)` : "");

  function esc(s) { return String(s).replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]); }
  function show(n, focus = true) {
    const side = document.getElementById("side");
    const incident = new Set();
    for (const p of linkEls) {
      const hot = p.__link.source === n.node_id || p.__link.target === n.node_id;
      p.classList.toggle("hot", hot);
      if (hot) { incident.add(p.__link.source); incident.add(p.__link.target); }
    }
    for (const id in nodeEls) nodeEls[id].classList.toggle("dim", focus && !incident.has(id) && id !== n.node_id);
    if (!focus) for (const p of linkEls) p.classList.remove("hot");
    let html = `<h2>${esc(n.feature_type)} ${esc(n.node_id)}</h2><table>`;
    html += `<tr><td>layer</td><td>${esc(n.layer)}</td></tr><tr><td>position</td><td>${n.ctx_idx} (${esc(tokens[n.ctx_idx] || "")})</td></tr>`;
    if (n.activation !== null && n.activation !== undefined) html += `<tr><td>activation</td><td>${n.activation.toFixed(4)}</td></tr>`;
    if (share[n.node_id] !== undefined) html += `<tr><td>influence</td><td>${share[n.node_id].toFixed(4)} (cumulative ${n.influence.toFixed(4)})</td></tr>`;
    if (n.clerp) html += `<tr><td>label</td><td>${esc(n.clerp)}</td></tr>`;
    html += "</table>";
    const inputs = (incoming[n.node_id] || []).slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
    if (inputs.length) html += "<h2>strongest inputs</h2><table>" + inputs.map(l => `<tr><td>${esc(l.source)}</td><td>${l.weight.toFixed(4)}</td></tr>`).join("") + "</table>";
    const info = features[n.layer + "_" + (n.node_id.split("_")[1])];
    if (n.feature_type === "cross layer transcoder" && info) {
      if (info.top_contexts && info.top_contexts.length) {
        html += "<h2>top activating contexts</h2>";
        for (const c of info.top_contexts) html += `<div class="ctx">${esc(c.left.join(""))}<b>${esc(c.token)}</b>${esc(c.right.join(""))} <i>(${c.activation.toFixed(2)})</i></div>`;
      }
      if (info.logit_effects) {
        html += "<h2>logit effects</h2><table>";
        html += info.logit_effects.top.map(e => `<tr><td>+ ${esc(e.token)}</td><td>${e.value.toFixed(3)}</td></tr>`).join("");
        html += info.logit_effects.bottom.map(e => `<tr><td>− ${esc(e.token)}</td><td>${e.value.toFixed(3)}</td></tr>`).join("");
        html += "</table>";
      }
    }
    side.innerHTML = html;
  }
  const target = nodes.find(n => n.is_target_logit);
  if (target) show(target, false);
})();
