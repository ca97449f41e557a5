// Tidegate status page: polls /api/status and draws everything as plain DOM + SVG.
"use strict";
const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const W = 600, H = 130, PAD = 4;

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

function path(values, t, t0, t1, max, h) {
  const pts = [];
  values.forEach((v, i) => {
    if (v === null || v === undefined) return;
    const x = t1 > t0 ? PAD + (W - 2 * PAD) * (t[i] - t0) / (t1 - t0) : W - PAD;
    const y = h - PAD - (h - 2 * PAD) * (max > 0 ? v / max : 0);
    pts.push(`${x.toFixed(1)},${y.toFixed(1)}`);
  });
  return pts.join(" ");
}

// A time axis under every chart: seconds before now at fifths of the window.
function axis(svg, t0, t1, h) {
  const span = Math.max(0, t1 - t0);
  for (let i = 0; i <= 4; i++) {
    const x = PAD + (W - 2 * PAD) * i / 4;
    const raw = span * (4 - i) / 4;
    const ago = span < 20 ? Math.round(raw * 10) / 10 : Math.round(raw);
    svg.append(el("svg:line", {class: "tick", x1: x, x2: x, y1: h - PAD, y2: h}));
    const label = el("svg:text", {class: "axis", x: Math.min(W - 40, Math.max(2, x - 14)),
                                  y: h + 14}, ago === 0 ? "now" : `-${ago}s`);
    svg.append(label);
  }
}

// One chart of several series over time, with its legend: series = [[key, label, values]].
function chart(attrs, series, t, h = H) {
  const svg = el("svg:svg", {class: "chart", viewBox: `0 0 ${W} ${h + 18}`,
                             preserveAspectRatio: "none", role: "img", ...attrs});
  const values = series.flatMap(([, , v]) => v || []).filter(v => v !== null && v !== undefined);
  const max = Math.max(1, ...values);
  const t0 = t.length ? t[0] : 0, t1 = t.length ? t[t.length - 1] : 1;
  for (const f of [0.25, 0.5, 0.75]) {
    const y = (h - PAD - (h - 2 * PAD) * f).toFixed(1);
    svg.append(el("svg:line", {class: "grid", x1: 0, x2: W, y1: y, y2: y}));
  }
  svg.append(el("svg:text", {x: 6, y: 14}, `max ${Math.round(max * 100) / 100}`));
  for (const [key, , v] of series) {
    svg.append(el("svg:polyline", {class: key, "data-series": key,
                                   points: path(v || [], t, t0, t1, max, h)}));
  }
  axis(svg, t0, t1, h);
  svg.dataset.max = String(max);
  const legend = el("div", {class: "legend"});
  for (const [key, label] of series) legend.append(el("span", {class: `key ${key}`}, `━ ${label}`));
  const box = el("div", {class: "plot"});
  box.append(svg, legend);
  return box;
}

// The breaker's state over time: one coloured band per snapshot.
function strip(dep, states, t) {
  const h = 22;
  const svg = el("svg:svg", {class: "strip", viewBox: `0 0 ${W} ${h + 18}`,
                             preserveAspectRatio: "none", "data-breaker": dep, role: "img",
                             "aria-label": `${dep} breaker state history`});
  const t0 = t.length ? t[0] : 0, t1 = t.length ? t[t.length - 1] : 1;
  const xOf = i => t1 > t0 ? PAD + (W - 2 * PAD) * (t[i] - t0) / (t1 - t0) : W - PAD;
  states.forEach((state, i) => {
    if (!state) return;
    const x0 = xOf(i), x1 = i + 1 < t.length ? xOf(i + 1) : W - PAD;
    svg.append(el("svg:rect", {class: `state ${state}`, "data-state": state, x: x0.toFixed(1),
                               y: 2, width: Math.max(1, x1 - x0).toFixed(1), height: h - 4}));
  });
  axis(svg, t0, t1, h);
  return svg;
}

function queues(doc) {
  const t = doc.history.t;
  document.getElementById("window").textContent =
    t.length > 1 ? `last ${Math.round(t[t.length - 1] - t[0])}s` : "";
  const box = document.getElementById("queues");
  box.replaceChildren(...doc.queues.map(q => {
    const s = doc.history.queues[q.name];
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
    // in flight is what the workers run now; retries they hold until a countdown ends are
    // retries waiting, with the broker's delayed messages
    const held = q.held_retries || 0;
    const running = q.in_flight === null || q.in_flight === undefined ? null : q.in_flight - held;
    const waiting = q.delayed === null && q.held_retries === null ? null : (q.delayed || 0) + held;
    figs.append(fig("ready", fmt(q.ready), false, "ready"),
                fig("in flight / capacity", `${fmt(running)}/${fmt(q.capacity)}`,
                    running !== null && q.capacity !== null && q.capacity !== undefined
                    && running > q.capacity, "in_flight"),
                fig("retries waiting", fmt(waiting), false, "delayed"),
                fig("oldest", age(q.oldest_age_s), false, "oldest_age_s"),
                fig("dead-letter", fmt(q.dead_letter), (q.dead_letter || 0) > 0, "dead_letter"),
                fig("deferred", fmt(q.deferred), (q.deferred || 0) > 0, "deferred"),
                fig("workers running / desired", `${fmt(q.live_workers)}/${fmt(q.desired_workers)}`,
                    (q.desired_workers || 0) > (q.live_workers || 0), "workers"));
    card.append(figs);
    // the exporter's tidegate_cluster_task_outcomes_total: the outcomes Flower shows per task
    const done = (doc.outcomes || {})[q.name] || {};
    const n = k => fmt(Math.round(done[k] || 0));
    card.append(el("div", {class: "k outcomes", "data-outcomes": q.name},
      `finished: ${n("succeeded")} succeeded · ${n("dead_lettered")} dead-lettered · `
      + `${n("failed")} failed · ${n("deferred")} deferred`));
    const depth = chart({"data-queue": q.name, "aria-label": `${q.name} depth`},
                        [["ready", "ready", s.ready], ["delayed", "retries waiting", s.delayed]], t);
    const load = chart({"data-chart": "queue-load", "data-of": q.name,
                        "aria-label": `${q.name} in flight against capacity`},
                       [["in_flight", "in flight", s.in_flight],
                        ["capacity", "capacity (workers' pool sizes)", s.capacity]], t, 90);
    const rates = chart({"data-chart": "queue-rates", "data-of": q.name,
                         "aria-label": `${q.name} per second`},
                        [["sheds", "shed/s", s.sheds_per_s],
                         ["rate_limited", "rate-limited/s", s.rate_limited_per_s],
                         ["dead_letters", "dead letters/s", s.dead_letters_per_s]], t, 90);
    const workers = chart({"data-chart": "queue-workers", "data-of": q.name,
                           "aria-label": `${q.name} desired and running workers`},
                          [["desired", "desired workers", s.desired],
                           ["live_workers", "running workers", s.live_workers]], t, 70);
    const kept = chart({"data-chart": "queue-held", "data-of": q.name,
                        "aria-label": `${q.name} dead letters and deferred`},
                       [["dead_letter", "in DLQ", s.dead_letter], ["deferred", "deferred", s.deferred]],
                       t, 70);
    card.append(depth, load, workers, rates, kept);
    return card;
  }));
}

function dependencies(doc) {
  const t = doc.history.t;
  const deps = doc.history.dependencies || {};
  const box = document.getElementById("dependencies");
  box.replaceChildren(...Object.entries(deps).map(([dep, s]) => {
    const card = el("div", {class: "card", "data-dependency-card": dep});
    const last = key => { const v = s[key] || []; return v.length ? v[v.length - 1] : null; };
    card.append(el("h3", {}, `${dep} → ${s.queue || "?"}`));
    card.append(chart({"data-chart": "dependency-rates", "data-of": dep,
                       "aria-label": `${dep} per second`},
      [["throughput", "calls/s", s.throughput_per_s], ["successes", "ok/s", s.successes_per_s],
       ["failures", "failed/s", s.failures_per_s], ["retries", "retries/s", s.retries_per_s],
       ["fallbacks", "fallbacks/s", s.fallbacks_per_s],
       ["rate_limited", "rate-limited/s", s.rate_limited_per_s],
       ["deferred", "deferred/s", s.deferred_per_s]], t, 110));
    // the adaptive concurrency limit, summed over the worker processes that share the dependency
    const limit = (doc.concurrency || []).find(c => c.dependency === dep);
    if (limit) {
      const ms = limit.baseline_s === null ? "—" : `${(limit.baseline_s * 1000).toFixed(1)} ms`;
      card.append(el("div", {class: "k concurrency", "data-concurrency": dep,
                             "data-limit": fmt(limit.limit), "data-in-flight": fmt(limit.in_flight)},
        limit.limit === null
          ? `adaptive limit ${limit.min}..${limit.max} per process · no worker has published yet`
          : `adaptive limit ${limit.limit} · in flight ${limit.in_flight} · waiting ${limit.waiting}`
            + ` · baseline ${ms} · ${limit.processes} process${limit.processes === 1 ? "" : "es"}`));
    }
    card.append(el("div", {class: "k"}, "breaker: green closed · amber half-open · red open"),
                strip(dep, s.breaker || [], t));
    card.dataset.calls = String(last("throughput_per_s") ?? "");
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
    banner(doc); breakers(doc); queues(doc); dependencies(doc); errors(doc);
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
