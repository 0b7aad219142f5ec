// tidegate's dashboard: polls the admin API and turns counters into rates and percentiles.
// Plain DOM, no framework, nothing fetched from outside the admin listener. Text from resources is only
// ever set with textContent (never as HTML).
"use strict";

const FAST = 1000; // traffic and backends
const SLOW = 5000; // configuration, routes and status
let previous = null; // the last /api/v1/traffic reading
let previousBackends = new Map(); // endpoint → {requests, failures, latency}
let routeRates = new Map(); // "listener|route" → {rps, errors, p99}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
  return tr;
}

function num(value, cls) {
  const td = el("td", value, cls);
  td.classList.add("num");
  return td;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

// The smallest bucket bound below which `fraction` of the counts fall ("<" the bound), or ">" the last one.
function percentile(bounds, counts, fraction) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (!total) return null;
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    seen += counts[i];
    if (seen >= fraction * total) return i < bounds.length ? bounds[i] : Infinity;
  }
  return Infinity;
}

function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds === Infinity) return "> 10 s";
  return seconds < 1 ? `≤ ${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms` : `≤ ${seconds} s`;
}

function minus(a, b) {
  return a.map((v, i) => v - ((b && b[i]) || 0));
}

function routeKey(r) {
  return `${r.listener}|${r.route}`;
}

function renderTraffic(now) {
  const bounds = now.latencyBounds;
  let requests = 0, errors = 0, total = 0;
  let latency = new Array(bounds.length + 1).fill(0);
  const before = new Map((previous ? previous.routes : []).map((r) => [routeKey(r), r]));
  const seconds = previous ? Math.max(0.001, now.now - previous.now) : 0;
  routeRates = new Map();
  for (const r of now.routes) {
    const old = before.get(routeKey(r));
    const sum = (codes) => Object.values(codes || {}).reduce((a, b) => a + b, 0);
    total += sum(r.codes);
    if (!previous) continue;
    const n = sum(r.codes) - (old ? sum(old.codes) : 0);
    const e = (r.codes["5xx"] || 0) - (old ? old.codes["5xx"] || 0 : 0);
    const l = minus(r.latency, old ? old.latency : null);
    requests += n;
    errors += e;
    latency = latency.map((v, i) => v + (l[i] || 0));
    routeRates.set(routeKey(r), { rps: n / seconds, errors: n ? e / n : 0, p99: percentile(bounds, l, 0.99) });
  }
  document.getElementById("total").textContent = total;
  document.getElementById("connections").textContent = now.connections;
  if (previous) {
    document.getElementById("rps").textContent = (requests / seconds).toFixed(1);
    document.getElementById("error-rate").textContent = requests ? `${((100 * errors) / requests).toFixed(1)} %` : "0 %";
    document.getElementById("p50").textContent = ms(percentile(bounds, latency, 0.5));
    document.getElementById("p99").textContent = ms(percentile(bounds, latency, 0.99));
  }
  renderEdge(now, seconds);
  document.getElementById("version").textContent = `config version ${now.version}`;
  document.getElementById("updated").textContent = `updated ${new Date(now.now * 1000).toLocaleTimeString()}`;
  previous = now;
}

function renderEdge(now, seconds) {
  // TrafficPolicy refusals per route, as rates between two readings; ClientPolicy's refused connections.
  const before = (previous && previous.refusals) || {};
  const rows = [];
  for (const [route, counts] of Object.entries(now.refusals || {}).sort()) {
    const old = before[route] || {};
    const rate = (result) => (previous ? (((counts[result] || 0) - (old[result] || 0)) / seconds).toFixed(1) : "–");
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const tr = row([route, num(rate("denied")), num(rate("limited")), num(rate("too-large")), num(total)]);
    tr.dataset.route = route;
    rows.push(tr);
  }
  if (!rows.length) rows.push(row([el("td", "nothing refused", "muted")]));
  document.querySelector("#edge tbody").replaceChildren(...rows);
  const refused = Object.entries(now.connectionsRefused || {}).map(([limit, count]) => `${limit}: ${count}`);
  document.getElementById("refused-connections").textContent =
    `connections closed at once since start: ${refused.length ? refused.join(", ") : "none"}`;
}

function endpointState(e) {
  if (e.ejectedFor > 0) return ["ejected", `ejected (${e.ejectedFor} s)`];
  if (e.health === "unhealthy") return ["unhealthy", "unhealthy"];
  if (e.terminating || !e.ready) return ["draining", e.terminating ? "terminating" : "not ready"];
  if (e.health === "healthy") return ["healthy", "healthy"];
  return ["unchecked", "up (not checked)"];
}

function renderBackends(data) {
  const holder = document.getElementById("backends");
  const fresh = document.createDocumentFragment();
  const bounds = data.latencyBounds;
  const seen = new Map();
  for (const b of data.backends) {
    const title = el("h3", `${b.name}  ·  ${b.algorithm}`);
    if (b.invalid) title.appendChild(el("span", `  invalid: ${b.invalid}`, "bad"));
    fresh.appendChild(title);
    fresh.appendChild(el("div", `routes: ${b.routes.join(", ")}  ·  in flight: ${b.active}`, "muted"));
    const table = el("table");
    table.className = "endpoints";
    table.appendChild(row(["endpoint", "pod", "node / zone", "state", "weight", "in flight", "ejections",
      "requests", "failures", "p50", "p99"].map((h) => el("th", h))));
    for (const e of b.endpoints) {
      const id = `${e.address}:${e.port}`;
      const old = previousBackends.get(id);
      const recent = old ? minus(e.latency, old.latency) : e.latency;
      const useRecent = recent.some((v) => v > 0);
      const counts = useRecent ? recent : e.latency;
      const [cls, label] = endpointState(e);
      const tr = row([id, e.pod || "–", [e.node, e.zone].filter(Boolean).join(" / ") || "–", el("td", label, cls),
        num(e.weight), num(e.active), num(e.ejections), num(e.requests),
        num(e.requests ? `${((100 * e.failures) / e.requests).toFixed(1)} %` : "–"),
        num(ms(percentile(bounds, counts, 0.5))), num(ms(percentile(bounds, counts, 0.99)))]);
      tr.dataset.endpoint = id;
      tr.dataset.state = cls;
      table.appendChild(tr);
      seen.set(id, e);
    }
    fresh.appendChild(table);
  }
  previousBackends = seen;
  holder.replaceChildren(fresh);
}

function conditionsOf(statuses, source) {
  // source: "HTTPRoute ns/name"
  const [kind, ref] = source.split(" ");
  const [namespace, name] = (ref || "").split("/");
  const found = statuses.find((s) => s.kind === kind && s.namespace === namespace && s.name === name);
  if (!found || !found.status) return [];
  const entries = found.status.parents || [];
  return entries.flatMap((p) => p.conditions || []);
}

function renderConfig(routes, statuses, config) {
  const ready = document.getElementById("ready");
  ready.textContent = config.ready ? "ready" : "not ready";
  ready.className = `badge ${config.ready ? "ok" : "bad"}`;
  const listeners = document.querySelector("#listeners tbody");
  const routeRows = document.querySelector("#routes tbody");
  const lrows = [], rrows = [];
  for (const l of routes.listeners || []) {
    const all = [...(l.http_routes || []), ...(l.l4_routes || [])];
    lrows.push(row([l.name, l.protocol, `${l.address || "*"}:${l.port}`, num(all.length)]));
    for (const r of all) {
      const conds = conditionsOf(statuses, r.source);
      const td = el("td");
      for (const c of conds) {
        const span = el("span", `${c.type}=${c.status}${c.status === "True" ? "" : ` (${c.reason})`} `,
          c.status === "True" ? "ok" : "bad");
        span.title = c.message || "";
        td.appendChild(span);
      }
      const rate = routeRates.get(`${l.name}|${r.name}`);
      rrows.push(row([r.name, (r.hostnames || []).join(", "), td,
        num(rate ? rate.rps.toFixed(1) : "–"), num(rate ? `${(100 * rate.errors).toFixed(1)} %` : "–"),
        num(rate ? ms(rate.p99) : "–")]));
    }
  }
  listeners.replaceChildren(...lrows);
  routeRows.replaceChildren(...rrows);
  const problems = document.querySelector("#problems tbody");
  const prows = [];
  for (const s of statuses) {
    const lists = [s.status.conditions || [], ...(s.status.parents || []).map((p) => p.conditions || []),
      ...(s.status.ancestors || []).map((p) => p.conditions || []),
      ...(s.status.listeners || []).map((p) => p.conditions || [])];
    for (const c of lists.flat()) {
      const bad = (c.type === "Conflicted" || c.type === "OverlappingTLSConfig") ? c.status === "True" : c.status === "False";
      if (bad) prows.push(row([`${s.kind} ${s.namespace ? s.namespace + "/" : ""}${s.name}`, c.type, c.reason, c.message]));
    }
  }
  if (!prows.length) prows.push(row([el("td", "none: everything is accepted", "ok"), "", "", ""]));
  problems.replaceChildren(...prows);
}

function renderLoadBalancers(data) {
  const byAddress = new Map(data.announcements.map((a) => [a.address, a]));
  const routed = new Set(((data.bgp || {}).routes || []).map((r) => r.prefix.split("/")[0]));
  const body = document.querySelector("#loadbalancers tbody");
  const rows = [];
  for (const s of data.services) {
    for (const address of s.addresses) {
      const a = byAddress.get(address);
      const who = a ? a.node || "nobody (no node can)"
        : routed.has(address) ? "BGP (see below)" : "not announced in Layer 2 (no L2Advertisement)";
      const tr = row([`${s.namespace}/${s.name}`, address, s.pool, s.ports.join(", "), s.externalTrafficPolicy,
        el("td", who, (a && a.node) || routed.has(address) ? "" : "muted"), a && a.since ? a.since : "–"]);
      tr.dataset.address = address;
      rows.push(tr);
    }
  }
  if (!rows.length) rows.push(row([el("td", "none", "muted")]));
  body.replaceChildren(...rows);
  const refused = data.refused.map((r) => row([`${r.namespace}/${r.name}`, el("td", r.reason, "bad"), r.message]));
  document.querySelector("#lb-refused tbody").replaceChildren(...refused);
  document.getElementById("lb-refused").hidden = !refused.length;
  renderBGP(data.bgp || { sessions: [], routes: [] });
}

function renderBGP(bgp) {
  const running = bgp.sessions.some((s) => s.state !== null);
  const sessions = bgp.sessions.map((s) => {
    const state = s.state === null ? el("td", "not run by this process (no --node)", "muted")
      : el("td", s.state, s.state === "up" ? "ok" : "bad");
    const tr = row([s.name, s.peer, state, s.since || "–", s.state === null ? "–" : String(s.routes ?? 0),
      el("td", s.lastError || "", "bad")]);
    tr.dataset.session = s.name;
    return tr;
  });
  if (bgp.problem) sessions.push(row([el("td", "speaker", "bad"), "", el("td", bgp.problem, "bad")]));
  if (!sessions.length) sessions.push(row([el("td", "none (no BGPPeer for this node)", "muted")]));
  document.querySelector("#bgp-sessions tbody").replaceChildren(...sessions);
  const routes = bgp.routes.map((r) => {
    const tr = row([r.prefix, r.session, r.nextHop || "self", r.services.join(", "),
      r.pods === undefined ? "–" : String(r.pods),
      r.linkBandwidth === undefined ? "–" : `${r.linkBandwidth} B/s`, (r.communities || []).join(" ")]);
    tr.dataset.prefix = r.prefix;
    return tr;
  });
  if (!routes.length) routes.push(row([el("td", running ? "none announced" : "none", "muted")]));
  document.querySelector("#bgp-routes tbody").replaceChildren(...routes);
}

function renderCertificates(data) {
  const rows = data.certificates.map((c) => {
    const tr = row([c.secret, c.names.join(", "), c.issuer,
      el("td", c.state, c.state === "valid" ? "ok" : c.state === "failed" ? "bad" : "muted"),
      num(c.daysLeft === null ? "–" : c.daysLeft.toFixed(1)), num(String(c.failures)),
      el("td", c.message || "", "bad")]);
    tr.dataset.secret = c.secret;
    return tr;
  });
  if (!rows.length) rows.push(row([el("td", "none (no listener or Ingress asks for one, or no --acme-dir)", "muted")]));
  document.querySelector("#certificates tbody").replaceChildren(...rows);
}

let lastConfig = null; // [routes, statuses, config] from the slow poll: the route table's rates move faster

async function fast() {
  try {
    const [traffic, backends] = await Promise.all([getJSON("/api/v1/traffic"), getJSON("/api/v1/backends")]);
    renderTraffic(traffic);
    renderBackends(backends);
    if (lastConfig) renderConfig(...lastConfig);
  } catch (err) {
    document.getElementById("updated").textContent = `admin API unreachable: ${err.message}`;
  }
}

async function slow() {
  try {
    const [routes, statuses, config, loadbalancers, certificates] = await Promise.all([getJSON("/api/v1/routes"),
      getJSON("/api/v1/status"), getJSON("/api/v1/config"), getJSON("/api/v1/loadbalancers"),
      getJSON("/api/v1/certificates")]);
    lastConfig = [routes, statuses, config];
    renderConfig(routes, statuses, config);
    renderLoadBalancers(loadbalancers);
    renderCertificates(certificates);
  } catch (err) {
    document.getElementById("ready").textContent = "unreachable";
  }
}

document.getElementById("explain-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const url = document.getElementById("explain-url").value;
  const method = document.getElementById("explain-method").value;
  const out = document.getElementById("explain-result");
  try {
    const answer = await getJSON(`/api/v1/explain?url=${encodeURIComponent(url)}&method=${encodeURIComponent(method)}`);
    out.textContent = JSON.stringify(answer, null, 2);
  } catch (err) {
    out.textContent = String(err);
  }
});

fast();
slow();
setInterval(fast, FAST);
setInterval(slow, SLOW);
