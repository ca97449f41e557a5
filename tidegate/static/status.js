// Tidegate status page: polls /api/status and draws everything as plain DOM + SVG.
"use strict";
const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const W = 600, H = 150, PAD = 4;

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4))
                                      : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function fmt(v) { return v === null || v === undefined ? "—" : String(v); }
function age(s) {
  if (s === null || s === undefined) return "—";
  return s < 60 ? `${s.toFixed(0)}s` : `${(s / 60).toFixed(1)}m`;
}

function banner(doc) {
  const open = doc.breakers.filter(b => b.state === "open").map(b => b.dependency);
  const header = document.getElementById("banner");
  let level = "ok", text = "ALL CLEAR";
  if (doc.shed_storm) { level = "storm"; text = `SHED STORM · ${doc.sheds_per_s.toFixed(1)} sheds/s`; }
  if (open.length) { level = "open"; text = `BREAKER OPEN · ${open.join(", ")}`
                     + (doc.shed_storm ? ` · SHEDDING ${doc.sheds_per_s.toFixed(1)}/s` : ""); }
  header.dataset.level = level;
  document.getElementById("banner-text").textContent = text;
  document.getElementById("updated").textContent =
    "updated " + new Date(doc.taken_at * 1000).toLocaleTimeString();
}

function breakers(doc) {
  const box = document.getElementById("breakers");
  box.replaceChildren(...doc.breakers.map(b => {
    const tile = el("div", {class: "breaker", "data-dependency": b.dependency, "data-state": b.state});
    tile.append(el("div", {class: "dep"}, b.dependency),
                el("div", {class: "state"}, b.state.replace("_", "-")),
                el("div", {class: "sub"}, b.state === "open"
                   ? `trial in ${b.retry_after_s.toFixed(0)}s · queue ${b.queue}` : `queue ${b.queue}`));
    return tile;
  }));
}

function path(values, t, t0, t1, max) {
  const pts = [];
  values.forEach((v, i) => {
    if (v === null || v === undefined) return;
    const x = t1 > t0 ? PAD + (W - 2 * PAD) * (t[i] - t0) / (t1 - t0) : W - PAD;
    const y = H - PAD - (H - 2 * PAD) * (max > 0 ? v / max : 0);
    pts.push(`${x.toFixed(1)},${y.toFixed(1)}`);
  });
  return pts.join(" ");
}

function chart(name, series, t) {
  const svg = el("svg:svg", {class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
                             "data-queue": name, role: "img", "aria-label": `${name} depth`});
  const values = series.ready.concat(series.in_flight).filter(v => v !== null && v !== undefined);
  const max = Math.max(1, ...values);
  const t0 = t.length ? t[0] : 0, t1 = t.length ? t[t.length - 1] : 1;
  for (const f of [0.25, 0.5, 0.75]) {
    const y = (H - PAD - (H - 2 * PAD) * f).toFixed(1);
    svg.append(el("svg:line", {class: "grid", x1: 0, x2: W, y1: y, y2: y}));
  }
  svg.append(el("svg:text", {x: 6, y: 14}, `max ${max}`));
  svg.append(el("svg:polyline", {class: "ready", points: path(series.ready, t, t0, t1, max)}));
  svg.append(el("svg:polyline", {class: "in_flight", points: path(series.in_flight, t, t0, t1, max)}));
  svg.dataset.max = String(max);
  return svg;
}

function queues(doc) {
  const t = doc.history.t;
  document.getElementById("window").textContent =
    t.length > 1 ? `last ${Math.round(t[t.length - 1] - t[0])}s` : "";
  const box = document.getElementById("queues");
  box.replaceChildren(...doc.queues.map(q => {
    const card = el("div", {class: "card", "data-queue": q.name});
    const h = el("h3", {}, q.name);
    if (q.error) h.append(el("span", {class: "err"}, "depth unavailable"));
    card.append(h);
    const figs = el("div", {class: "figures"});
    const fig = (k, v, alert, key) => {
      const f = el("div", {class: "fig" + (alert ? " alert" : ""), "data-figure": key});
      f.append(el("div", {class: "v"}, v), el("div", {class: "k"}, k));
      return f;
    };
    figs.append(fig("ready", fmt(q.ready), false, "ready"),
                fig("in flight", fmt(q.in_flight), false, "in_flight"),
                fig("oldest", age(q.oldest_age_s), false, "oldest_age_s"),
                fig("dead-letter", fmt(q.dead_letter), (q.dead_letter || 0) > 0, "dead_letter"),
                fig("deferred", fmt(q.deferred), (q.deferred || 0) > 0, "deferred"));
    card.append(figs, chart(q.name, doc.history.queues[q.name], t));
    card.append(el("div", {class: "legend"},
      `desired workers ${fmt(q.desired_workers)} · consumers ${fmt(q.consumers)} · `));
    card.lastChild.append(el("span", {class: "r"}, "━ ready "), el("span", {class: "f"}, "┅ in flight"));
    return card;
  }));
}

function errors(doc) {
  const section = document.getElementById("errors-section");
  section.hidden = doc.errors.length === 0;
  document.getElementById("errors").replaceChildren(...doc.errors.map(e => el("li", {}, e)));
}

async function tick() {
  try {
    const response = await fetch("/api/status", {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const doc = await response.json();
    banner(doc); breakers(doc); queues(doc); errors(doc);
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  } catch (err) {
    const header = document.getElementById("banner");
    header.dataset.level = "unknown";
    document.getElementById("banner-text").textContent = `EXPORTER UNREACHABLE (${err.message})`;
  } finally {
    setTimeout(tick, POLL_MS);
  }
}
tick();
