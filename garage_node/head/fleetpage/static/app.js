// The fleet page: polls /api/fleet (or /api/pc/<id>) every few seconds and redraws.
// Plain DOM, no framework and no build step. Everything a PC reported is inserted with
// textContent, never as markup: a PC is not trusted to name itself harmlessly.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let config = { poll_s: 2, window_s: 21600, key: false, region: "", hot_c: 85 };
let sort = { key: null, dir: 1 };  // null: the head's order (problems first, then by name)
let lastFleet = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function dash(v, fmt) { return v === null || v === undefined ? "–" : (fmt ? fmt(v) : String(v)); }

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" }); }

function compact(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 1e9) return (n / 1e9).toFixed(1) + " G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + " k";
  return String(n);
}

function load(pc) {
  const e = pc.engine;
  if (!e || (e.requests_running === null && e.requests_waiting === null)) return null;
  return (e.requests_running || 0) + (e.requests_waiting || 0);
}

function setLive(ok, text) {
  const live = document.getElementById("live");
  live.textContent = text;
  live.className = ok ? "live" : "live stale";
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store", credentials: "same-origin" });
  if (r.status === 401) { location.href = "/login"; throw new Error("signed out"); }
  if (r.status === 404) return null;
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

// ------------------------------------------------------------------ the fleet table

const SORTERS = {
  status: (p) => [p.status, p.rank],
  name: (p) => [p.name.toLowerCase()],
  problem: (p) => [p.problem || p.state || ""],
  gpus: (p) => [p.gpus.length],
  temp: (p) => [p.temp_max_c === null ? -1000 : p.temp_max_c],
  model: (p) => [(p.engine && p.engine.model) || ""],
  os: (p) => [(p.os && p.os.version) || ""],
  load: (p) => [load(p) === null ? -1 : load(p)],
  tps: (p) => [p.engine && p.engine.tokens_per_s !== null ? p.engine.tokens_per_s : -1],
  served: (p) => [p.tokens_served ? p.tokens_served.total : -1],
  seen: (p) => [p.last_seen === null ? Infinity : -p.last_seen],
};

function cmp(a, b) {
  for (let i = 0; i < a.length; i++) {
    if (a[i] < b[i]) return -1;
    if (a[i] > b[i]) return 1;
  }
  return 0;
}

function visible(pc, show, words) {
  if (show === "active" && pc.status === "revoked") return false;
  if (show === "problems" && pc.rank !== 0) return false;
  if (["online", "offline", "revoked"].includes(show) && pc.status !== show) return false;
  if (!words.length) return true;
  const hay = [pc.name, pc.id, pc.overlay_ip, pc.status, pc.state, pc.problem, pc.message, pc.paused && `paused ${pc.paused}`,
    pc.engine && pc.engine.model, pc.engine && pc.engine.state, ...pc.gpus.map((g) => g.name)]
    .filter(Boolean).join(" ").toLowerCase();
  return words.every((w) => hay.includes(w));
}

function totalsView(t, now) {
  const box = document.getElementById("totals");
  const tile = (label, value, note) => el("div", { class: "tile" },
    el("div", { class: "value", text: value }), el("div", { class: "label", text: label }),
    note ? el("div", { class: "note", text: note }) : "");
  box.replaceChildren(
    tile("PCs online", `${t.pcs_online} / ${t.pcs}`,
      [t.problems ? `${t.problems} need attention` : "no problems", t.quarantined ? `${t.quarantined} quarantined by the audits` : "",
       t.paused ? `${t.paused} paused by their owners` : ""].filter(Boolean).join(" · ")),
    tile("GPUs", String(t.gpus), t.gpus_healthy !== t.gpus ? `${t.gpus - t.gpus_healthy} unhealthy` : "all healthy"),
    tile("Models served", String(t.models.length), t.models.join(", ") || "none healthy"),
    tile("Tokens/s now", dash(t.tokens_per_s), t.tokens_per_s === null ? "no engine reports it" : ""),
    tile("Requests", dash(t.requests_running), t.requests_waiting ? `${t.requests_waiting} waiting` : "running"),
    tile("Tokens served today", compact(t.tokens_served_today),
      t.tokens_served_total !== null ? `${compact(t.tokens_served_total)} in total` : "no usage ledger"),
  );
  box.dataset.online = t.pcs_online;
  box.dataset.now = now;
}

function pcRow(pc, now) {
  const e = pc.engine || {};
  const temps = pc.gpus.filter((g) => g.temperature_c !== null).map((g) => `GPU ${g.index}: ${g.temperature_c} °C`);
  const hot = pc.temp_max_c !== null && pc.temp_max_c >= config.hot_c;
  const l = load(pc);
  const cls = [pc.rank === 0 ? "attn" : "", pc.status === "online" ? "" : "gone"].filter(Boolean).join(" ");
  return el("tr", { "data-id": pc.id, "data-status": pc.status, class: cls },
    el("td", {}, el("span", { class: `badge ${pc.status}`, text: pc.status })),
    el("td", {}, el("a", { href: `/pc/${encodeURIComponent(pc.id)}`, text: pc.name }), el("div", { class: "muted small", text: `${pc.id} · ${pc.overlay_ip}` })),
    el("td", { class: pc.problem ? "problem" : pc.paused ? "paused" : "", text: pc.problem || (pc.paused ? `paused: ${pc.paused}` : dash(pc.state)) }),
    el("td", { class: "num", title: pc.gpus.map((g) => `${g.index}: ${g.name}${g.healthy ? "" : " (unhealthy)"}`).join("\n") || pc.gpu_note || "CPU only",
      text: pc.gpus.length ? `${pc.gpus.length}${pc.gpus.some((g) => !g.healthy) ? " !" : ""}` : "CPU" }),
    el("td", { class: `num${hot ? " hot" : ""}`, title: temps.join("\n"), text: dash(pc.temp_max_c, (v) => `${v} °C`) }),
    el("td", { title: e.endpoint || "", text: e.model ? `${e.model}${e.state && e.state !== "healthy" ? ` (${e.state})` : ""}` : dash(e.state) }),
    el("td", { class: pc.os && pc.os.note ? "paused" : "", title: osText(pc.os), text: pc.os ? pc.os.version + (pc.os.note ? " *" : "") : "–" }),
    el("td", { class: "num", title: "requests running / waiting", text: l === null ? "–" : `${e.requests_running || 0} / ${e.requests_waiting || 0}` }),
    el("td", { class: "num", text: dash(e.tokens_per_s) }),
    el("td", { class: "num", title: pc.tokens_served ? `today ${pc.tokens_served.today}, total ${pc.tokens_served.total}` : "",
      text: pc.tokens_served ? `${compact(pc.tokens_served.today)} / ${compact(pc.tokens_served.total)}` : "–" }),
    el("td", { class: "num", title: pc.last_seen ? new Date(pc.last_seen * 1000).toString() : "", text: pc.last_seen ? ago(now - pc.last_seen) : "never" }),
  );
}

// The stick's OS and its update (issue #19), in words.
function osText(os) {
  if (!os) return "not a stick with versions (or an older agent)";
  const parts = [`${os.version}${os.variant ? " (" + os.variant + ")" : ""}`,
    os.other ? `other slot ${os.other}` : "other slot empty"];
  if (os.blessed === false) parts.push(`trial boot, ${dash(os.tries_left)} tries left`);
  if (os.note) parts.push(os.note);
  else if (os.target && os.target !== os.version) parts.push(`to update to ${os.target}`);
  if (os.policy) parts.push(`updates: ${os.policy}`);
  return parts.join(" · ");
}

// The newest rollout of the stick's OS (none: hidden): its state and each wave's counts.
function rolloutView(r) {
  document.getElementById("rollout").hidden = !r;
  if (!r) return;
  const c = r.counts || {};
  const underWay = (x) => (x.targeted || 0) + (x.started || 0);
  document.getElementById("rollout-line").textContent =
    `${r.version} (${r.variant}): ${r.state}${r.reason ? " — " + r.reason : ""} · ` +
    `${c.ok || 0} done, ${underWay(c)} under way, ${c.failed || 0} failed, ${c["passed-over"] || 0} passed over`;
  document.querySelector("#rollout-table tbody").replaceChildren(...r.waves.map((w) => el("tr", { class: w.failed ? "attn" : "" },
    el("td", { text: `${w.name}${w.open ? "" : " (not open)"}` }),
    el("td", { class: "num", text: String(w.size) }),
    el("td", { class: "num", text: String(w.ok || 0) }),
    el("td", { class: "num", text: String(underWay(w)) }),
    el("td", { class: "num", text: String(w.failed || 0) }),
    el("td", { class: "num", text: String((w.queued || 0) + (w["passed-over"] || 0)) }),
  )));
}

// The region's models as the head's placement last decided them (empty: every PC plans for itself).
function modelsView(models) {
  document.getElementById("models").hidden = !models.length;
  document.querySelector("#models-table tbody").replaceChildren(...models.map((m) => {
    const d = m.demand || {};
    const short = m.running < m.wanted;
    return el("tr", { "data-model": m.model, class: short ? "attn" : "" },
      el("td", { text: m.model }),
      el("td", { class: "num", text: `${m.wanted} / ${m.running}` }),
      el("td", { class: "num", text: dash(d.tokens_per_s, (v) => v.toFixed(1)) }),
      el("td", { class: "num", text: dash(d.queue_depth) }),
      el("td", { class: "num", text: dash(d.unserved_per_s, (v) => v.toFixed(2)) }),
      el("td", {}, ...(m.pcs.length ? m.pcs.flatMap((pc, i) => [i ? ", " : "",
        el("a", { href: `/pc/${encodeURIComponent(pc.id)}`, text: pc.name || pc.id })]) : ["–"])),
      el("td", { class: "small", text: m.why || "" }),
    );
  }));
}

function drawFleet() {
  const fleet = lastFleet;
  if (!fleet) return;
  totalsView(fleet.totals, fleet.now);
  modelsView(fleet.models || []);
  rolloutView(fleet.rollout || null);
  const words = document.getElementById("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  const show = document.getElementById("show").value;
  let pcs = fleet.pcs.filter((p) => visible(p, show, words));
  if (sort.key) {
    const f = SORTERS[sort.key];
    pcs = pcs.map((p, i) => [p, i]).sort((a, b) => sort.dir * cmp(f(a[0]), f(b[0])) || a[1] - b[1]).map((x) => x[0]);
  }
  document.querySelector("#pcs tbody").replaceChildren(...pcs.map((p) => pcRow(p, fleet.now)));
  document.getElementById("count").textContent = `${pcs.length} of ${fleet.pcs.length} PCs`;
  document.getElementById("empty").hidden = fleet.pcs.length > 0;
  for (const th of document.querySelectorAll("#pcs th")) {
    th.classList.toggle("sorted", th.dataset.key === sort.key);
    th.dataset.dir = th.dataset.key === sort.key ? (sort.dir > 0 ? "▲" : "▼") : "";
  }
}

function setupFleet() {
  document.getElementById("fleet-view").hidden = false;
  const params = new URLSearchParams(location.search);
  document.getElementById("filter").value = params.get("q") || "";
  if (params.get("show")) document.getElementById("show").value = params.get("show");
  const remember = () => {
    const q = new URLSearchParams();
    if (document.getElementById("filter").value) q.set("q", document.getElementById("filter").value);
    if (document.getElementById("show").value !== "active") q.set("show", document.getElementById("show").value);
    history.replaceState(null, "", q.toString() ? `/?${q}` : "/");
    drawFleet();
  };
  document.getElementById("filter").addEventListener("input", remember);
  document.getElementById("show").addEventListener("change", remember);
  for (const th of document.querySelectorAll("#pcs th")) {
    th.addEventListener("click", () => {
      // Ascending, descending, then back to the head's order (problems first).
      if (sort.key !== th.dataset.key) sort = { key: th.dataset.key, dir: 1 };
      else if (sort.dir > 0) sort.dir = -1;
      else sort = { key: null, dir: 1 };
      drawFleet();
    });
  }
  return async () => {
    lastFleet = await getJSON("/api/fleet");
    drawFleet();
  };
}

// ------------------------------------------------------------------ one PC

function sparkline(container, points, unit, window_s, now) {
  // points: [t, value|null]; a gap (null) breaks the line. Drawn over the whole window.
  const W = 600, H = 90, P = 4;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "spark");
  const values = points.filter((p) => p[1] !== null).map((p) => p[1]);
  const label = document.getElementById(`${container.id}-label`);
  if (!values.length) {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", W / 2); t.setAttribute("y", H / 2); t.setAttribute("text-anchor", "middle");
    t.textContent = "not reported";
    svg.append(t);
    container.replaceChildren(svg);
    if (label) label.textContent = "";
    return;
  }
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1) { hi += 1; lo = Math.max(0, lo - 1); }
  const t0 = now - window_s;
  const x = (t) => P + ((t - t0) / window_s) * (W - 2 * P);
  const y = (v) => H - P - ((v - lo) / (hi - lo)) * (H - 2 * P);
  let seg = [];
  const flush = () => {
    if (seg.length === 1) seg.push([seg[0][0] + 6, seg[0][1]]);  // a lone sample still shows, as a dash
    if (seg.length) {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", seg.map((p) => `${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(" "));
      svg.append(line);
    }
    seg = [];
  };
  for (const [t, v] of points) {
    if (v === null) flush(); else seg.push([x(t), y(v)]);
  }
  flush();
  container.replaceChildren(svg);
  if (label) label.textContent = `now ${dash(values[values.length - 1])}${unit} · min ${Math.min(...values)}${unit} · max ${Math.max(...values)}${unit}`;
}

function fact(dl, name, value) {
  dl.append(el("dt", { text: name }), el("dd", { text: value }));
}

// A PC's standing with the region's audits (issue #20): quarantined and why, re-checked, a verifier.
function auditText(a) {
  const since = a.since ? ` since ${clock(a.since)}` : "";
  const words = a.state === "quarantined" ? `quarantined${since}: ${a.why || "no reason given"}; no requests, no Ray work, earnings frozen`
    : a.state === "rechecking" ? `re-checked on canaries${since} after a quarantine: ${a.why || ""}`
    : "serving";
  return (a.trusted ? "trusted verifier · " : "") + words + (a.forfeited ? " · frozen earnings forfeited" : "");
}

function drawPc(data) {
  const pc = data.pc, now = data.now, e = pc.engine || {};
  document.title = `${pc.name}: garage-node fleet`;
  document.getElementById("pc-name").textContent = pc.name;
  const badge = document.getElementById("pc-status");
  badge.textContent = pc.status;
  badge.className = `badge ${pc.status}`;
  const problem = document.getElementById("pc-problem");
  problem.hidden = !pc.problem;
  problem.textContent = pc.problem || "";
  const dl = document.getElementById("pc-facts");
  dl.replaceChildren();
  fact(dl, "Node id", pc.id);
  fact(dl, "Overlay address", pc.overlay_ip);
  // A node's message usually starts with its state already ("degraded: overlay down").
  fact(dl, "State", pc.message && pc.state && pc.message.startsWith(pc.state) ? pc.message : `${dash(pc.state)}${pc.message ? ": " + pc.message : ""}`);
  fact(dl, "Last seen", pc.last_seen ? `${ago(now - pc.last_seen)} (${clock(pc.last_seen)})` : "never");
  if (pc.paused) fact(dl, "Paused", pc.paused);
  if (pc.audit) fact(dl, "Audits", auditText(pc.audit));
  fact(dl, "Ray worker", pc.ray_alive ? "alive at the Ray head" : "not listed by the Ray head");
  fact(dl, "Engine", e.state ? `${e.state}${e.model ? " · " + e.model : ""}${e.endpoint ? " at " + e.endpoint : ""}${e.draining ? " · draining" : ""}` : "–");
  fact(dl, "Load", e.requests_running === undefined || e.requests_running === null ? "–" :
    `${e.requests_running} running, ${dash(e.requests_waiting)} waiting${e.kv_cache_usage_pct !== null && e.kv_cache_usage_pct !== undefined ? `, KV cache ${e.kv_cache_usage_pct}%` : ""}`);
  fact(dl, "Tokens/s now", dash(e.tokens_per_s));
  fact(dl, "Tokens served", pc.tokens_served ? `${pc.tokens_served.today} today, ${pc.tokens_served.total} in total` : "–");
  fact(dl, "Driver", pc.driver_version ? `${pc.driver_version}, CUDA ${dash(pc.cuda_version)}` : dash(pc.gpu_note));
  fact(dl, "Versions", pc.versions ? `agent ${pc.versions.agent}, Ray ${pc.versions.ray}, Python ${pc.versions.python}` : "–");
  fact(dl, "OS", osText(pc.os));
  fact(dl, "Enrolled", new Date(pc.enrolled_at * 1000).toLocaleString());

  document.querySelector("#pc-gpus tbody").replaceChildren(...(pc.gpus.length ? pc.gpus.map((g) => el("tr", {},
    el("td", { class: "num", text: g.index }), el("td", { text: g.name }),
    el("td", { class: "num", text: `${(g.memory_total_mib / 1024).toFixed(1)} GiB` }),
    el("td", { class: `num${g.temperature_c !== null && g.temperature_c >= config.hot_c ? " hot" : ""}`, text: dash(g.temperature_c, (v) => `${v} °C`) }),
    el("td", { class: "num", text: dash(g.power_w, (v) => `${Math.round(v)} W`) + (g.power_limit_w ? ` / ${Math.round(g.power_limit_w)} W` : "") }),
    el("td", { class: "num", text: dash(g.utilization_pct, (v) => `${v}%`) }),
    el("td", { class: g.healthy && !g.quarantined ? "" : "problem",
      text: g.quarantined ? `quarantined${g.error ? ": " + g.error : ""}` : g.healthy ? "ok" : `unhealthy${g.error ? ": " + g.error : ""}` }),
  )) : [el("tr", {}, el("td", { colspan: 7, class: "muted", text: pc.gpu_note || "no GPU: a CPU node" }))]));

  const h = data.history, f = config.sample_fields;
  const col = (name) => h.samples.map((s) => [s[f.indexOf("t")], s[f.indexOf(name)]]);
  const win = Math.min(data.window_s, Math.max(600, now - (h.samples.length ? h.samples[0][0] : now)));
  document.getElementById("pc-window").textContent = `(last ${win >= 3600 ? (win / 3600).toFixed(1) + " h" : Math.round(win / 60) + " min"}; kept in the head's memory)`;
  sparkline(document.getElementById("c-temp"), col("temp_c"), " °C", win, now);
  sparkline(document.getElementById("c-tps"), col("tokens_per_s"), "", win, now);
  const running = col("running"), waiting = col("waiting");
  sparkline(document.getElementById("c-load"), running.map((p, i) => [p[0], p[1] === null && waiting[i][1] === null ? null : (p[1] || 0) + (waiting[i][1] || 0)]), "", win, now);

  // The newest first; the history keeps more than a screen's worth.
  const shown = h.changes.slice().reverse().slice(0, 50);
  document.getElementById("pc-changes-note").textContent = h.changes.length > shown.length ? `(newest ${shown.length} of ${h.changes.length})` : "";
  document.querySelector("#pc-changes tbody").replaceChildren(...shown.map((c) => el("tr", {},
    el("td", { title: new Date(c.t * 1000).toString(), text: `${clock(c.t)} (${ago(now - c.t)})` }),
    el("td", {}, el("span", { class: `badge ${c.state.split(" ")[0]}`, text: c.state })),
    el("td", { text: c.message }),
  )));
}

function setupPc(id) {
  return async () => {
    const data = await getJSON(`/api/pc/${encodeURIComponent(id)}`);
    document.getElementById("pc-view").hidden = !data;
    document.getElementById("missing-view").hidden = !!data;
    if (data) drawPc(data);
  };
}

// ------------------------------------------------------------------ start

async function main() {
  try { config = await getJSON("/api/config"); } catch (e) { /* the poll below says what is wrong */ }
  document.getElementById("region").textContent = config.region ? `region ${config.region}` : "";
  document.getElementById("logout").hidden = !config.key;
  const m = location.pathname.match(/^\/pc\/([^/]+)$/);
  const refresh = m ? setupPc(decodeURIComponent(m[1])) : setupFleet();
  const tick = async () => {
    try {
      await refresh();
      setLive(true, `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (e) {
      setLive(false, `not updating: ${e.message}; retrying`);
    }
    setTimeout(tick, config.poll_s * 1000);
  };
  tick();
}

main();
