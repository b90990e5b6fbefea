// cw dashboard: polls api/snapshot every second, draws the charts (uPlot) and the tables.
// Every URL is relative, so the page works under any host and port (ssh -L).
"use strict";

const charts = {};
let lastFailures = 0;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function duration(s) {
  if (s == null) return "-";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (h) return `${h}:${String(m).padStart(2, "0")}:${String(r).padStart(2, "0")}`;
  return m ? `${m}:${String(r).padStart(2, "0")}` : `${r}s`;
}

function size(n) {
  if (n == null) return "-";
  for (const u of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (n < 1024 || u === "TiB") return u === "B" ? `${n} B` : `${n.toFixed(1)} ${u}`;
    n /= 1024;
  }
}

function chart(id, series) {
  const box = document.getElementById(id);
  const opts = {
    width: Math.max(240, box.clientWidth), height: 200, legend: { show: true },
    scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(1, hi * 1.1)] } },
    series: [{}].concat(series.map(([label, stroke, fill]) => ({ label, stroke, fill, width: 2, points: { show: false } }))),
    axes: [{}, { size: 50 }],
  };
  return new uPlot(opts, [[]].concat(series.map(() => [])), box);
}

function drawCharts(s) {
  if (!charts.rate) {
    charts.rate = chart("chart-rate", [["done/s", "#2f9e44", "rgba(47,158,68,.12)"], ["failed/s", "#e03131", "rgba(224,49,49,.12)"]]);
    charts.queue = chart("chart-queue", [["queued", "#1c7ed6", "rgba(28,126,214,.12)"]]);
    charts.workers = chart("chart-workers", [["workers", "#7048e8", "rgba(112,72,232,.12)"]]);
  }
  const t = s.series.t;
  charts.rate.setData([t, s.series.done, s.series.failed]);
  charts.queue.setData([t, s.series.queued]);
  charts.workers.setData([t, s.series.workers]);
  // what the charts hold, for a person reading the DOM and for the browser test
  document.body.dataset.points = String(t.length);
  document.body.dataset.maxDone = String(Math.max(0, ...s.series.done));
  document.body.dataset.maxWorkers = String(Math.max(0, ...s.series.workers));
}

function drawRuns(s) {
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(...s.runs.map((r) => {
    const pct = (n) => (r.jobs ? (100 * n) / r.jobs : 0);
    const bar = el("div", { class: "bar", title: `${r.done} done, ${r.failed} failed, ${r.running} running of ${r.jobs}` },
      el("div", { class: "done", style: `width:${pct(r.done)}%` }),
      el("div", { class: "failed", style: `width:${pct(r.failed)}%` }),
      el("div", { class: "running", style: `width:${pct(r.running)}%` }));
    const finished = r.done + r.failed + (r.cancelled || 0);
    return el("tr", { "data-run": r.run }, el("td", {}, r.run || "(none)"), el("td", { class: "num" }, r.jobs),
      el("td", { class: "num" }, r.queued), el("td", { class: "num" }, r.running), el("td", { class: "num" }, r.done),
      el("td", { class: "num" + (r.failed ? " bad" : "") }, r.failed),
      el("td", {}, bar, ` ${r.jobs ? Math.floor((100 * finished) / r.jobs) : 0}%`),
      el("td", { class: "num" }, r.rate == null ? "-" : `${r.rate.toFixed(1)}/s`), el("td", { class: "num" }, duration(r.eta)));
  }));
}

function state(w) {
  if (w.draining) return "draining";
  if (w.paused) return w.paused.stopped ? "paused, jobs stopped" : "paused";
  return w.running ? "busy" : "idle";
}

function drawWorkers(s) {
  const body = document.querySelector("#workers tbody");
  const ws = (s.status && s.status.workers) || [];
  body.replaceChildren(...ws.map((w) => {
    const c = w.counters || {}, jobs = w.jobs || [];
    const links = jobs.slice(0, 4).map(([id]) => el("a", { href: `job/${id}` }, `${id} `));
    return el("tr", {}, el("td", {}, w.id), el("td", {}, w.host), el("td", {}, w.label || "-"),
      el("td", { class: "num" }, `${w.running}/${w.slots}`), el("td", {}, state(w)),
      el("td", {}, ...(links.length ? links : ["-"])),
      el("td", { class: "num" }, jobs.length ? duration(Math.max(...jobs.map((j) => j[1] || 0))) : "-"),
      el("td", { class: "num" }, size(c.rss)), el("td", { class: "num" }, c.cpu == null ? "-" : `${Math.round(c.cpu)}%`));
  }));
  if (!ws.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "quiet" }, s.live ? "no worker connected" : "no master running")));
}

async function drawFailures() {
  const r = await fetch("api/failures?n=10&tail=4000", { credentials: "same-origin" });
  if (!r.ok) return;
  const fs = await r.json();
  const box = document.getElementById("failures");
  if (!fs.length) { box.replaceChildren(el("p", { class: "quiet" }, "none")); return; }
  box.replaceChildren(...fs.map((f) => el("details", { "data-job": f.job },
    el("summary", {}, el("a", { href: `job/${f.job}` }, `job ${f.job}`), ` ${f.run || "(none)"} · ${f.status} · ${f.worker || "-"} · `,
      el("span", { class: "bad" }, (f.error || "").split("\n")[0])),
    el("pre", {}, f.traceback || f.error || ""),
    f.stderr ? el("pre", { class: "bad" }, "stderr (tail)\n" + f.stderr) : "",
    f.stdout ? el("pre", {}, "stdout (tail)\n" + f.stdout) : "")));
}

async function refresh() {
  try {
    const r = await fetch("api/snapshot", { credentials: "same-origin" });
    if (!r.ok) throw new Error(`${r.status}`);
    const s = await r.json();
    const st = s.status;
    document.getElementById("master").textContent = st
      ? `master ${st.master} at ${st.address} · up ${duration(st.uptime)} · store ${size(st.store_bytes)}`
      : `${s.error || "no master"}: the store alone`;
    document.getElementById("totals").textContent = st
      ? `queued ${st.queued} · running ${st.running} · done ${st.done - (st.failed || 0)} · failed ${st.failed || 0} · workers ${st.workers.length}`
      : "";
    drawCharts(s);
    drawRuns(s);
    drawWorkers(s);
    const failed = st ? st.failed || 0 : 0;
    if (failed !== lastFailures || !document.body.dataset.failuresDrawn) {
      lastFailures = failed;
      await drawFailures();
      document.body.dataset.failuresDrawn = "1";
    }
  } catch (e) {
    document.getElementById("master").textContent = `cannot reach the dashboard: ${e}`;
  }
}

refresh();
setInterval(refresh, 1000);
