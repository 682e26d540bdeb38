// The Trellis dashboard: plain JS, no build step, nothing fetched from
// outside. Data goes into the page as text only (textContent), never HTML.
'use strict';

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';
const state = { view: 'overview', timer: null, tap: null };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k === 'onclick') e.addEventListener('click', v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? '-' : String(c)));
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
}
const pct = (x) => (x == null ? '-' : x >= 1 ? '100%' : (100 * x).toFixed(2) + '%');
const ms = (x) => (x == null ? '-' : x < 10 ? x.toFixed(1) + 'ms' : Math.round(x) + 'ms');
const rps = (x) => (x == null ? '-' : x.toFixed(1));
const health = (x) => (x == null ? '' : x >= 0.99 ? 'good' : x >= 0.95 ? 'meh' : 'bad');
const num = (content, cls) => el('td', { class: 'num ' + (cls || '') }, content);
const when = (nanos) => new Date(nanos / 1e6).toLocaleTimeString();
const windowParam = () => $('window').value;

// The credential lives in this tab's sessionStorage only: it arrives in
// the link's fragment (never sent to a server, so never logged), or is
// typed into the sign-in form.
const TOKEN_KEY = 'trellis-token';
const token = () => sessionStorage.getItem(TOKEN_KEY) || '';
const authHeaders = () => (token() ? { Authorization: 'Bearer ' + token() } : {});

function takeTokenFromLink() {
  const m = location.hash.match(/^#token=([^&]*)&?(.*)$/);
  if (!m) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
  history.replaceState(null, '', '#' + (m[2] || '/'));
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({}, opts, { headers: authHeaders() }));
  if (r.status === 401) $('signin').hidden = false;
  if (!r.ok) {
    let msg = r.status + ' ' + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    const e = new Error(path + ': ' + msg);
    e.status = r.status;
    throw e;
  }
  return r.json();
}

function setError(e) {
  $('err').textContent = e ? String(e.message || e) : '';
  const refused = e && (e.status === 401 || e.status === 403);
  $('status').textContent = !e ? 'live' : refused ? 'sign in needed' : 'control plane unreachable';
  $('status').className = 'status ' + (e ? 'bad' : 'ok');
}

// ---------------------------------------------------------------- routing

function show(view) {
  for (const v of ['overview', 'service', 'traces', 'trace', 'tap']) $('view-' + v).hidden = v !== view;
  for (const n of ['overview', 'traces', 'tap']) $('nav-' + n).classList.toggle('active', n === view);
  state.view = view;
}

function route() {
  takeTokenFromLink();
  $('signin').hidden = token() !== '';
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  if (state.view === 'tap' && parts[0] !== 'tap') stopTap();
  if (parts[0] === 'service' && parts.length >= 3) { show('service'); state.service = { ns: parts[1], name: parts[2] }; }
  else if (parts[0] === 'traces') show('traces');
  else if (parts[0] === 'trace' && parts[1]) { show('trace'); state.trace = parts[1]; }
  else if (parts[0] === 'tap') show('tap');
  else show('overview');
  refresh();
}

async function refresh() {
  clearTimeout(state.timer);
  try {
    if (state.view === 'overview') await overview();
    else if (state.view === 'service') await serviceDetail();
    else if (state.view === 'traces') await tracesView();
    else if (state.view === 'trace') await traceView();
    setError(null);
  } catch (e) { setError(e); }
  if (state.view !== 'trace' && state.view !== 'tap') state.timer = setTimeout(refresh, 3000);
}

// ---------------------------------------------------------------- overview

async function overview() {
  const w = windowParam();
  const [svcs, stat, edges] = await Promise.all([
    api('/api/v1/services'), api('/api/v1/stat?kind=service&window=' + w), api('/api/v1/edges?window=' + w),
  ]);
  const byName = new Map(stat.rows.map((r) => [r.namespace + '/' + r.name, r]));
  const body = $('services').tBodies[0];
  body.replaceChildren();
  for (const s of svcs) {
    const key = s.namespace + '/' + s.name;
    const r = byName.get(key) || {};
    const label = s.namespace === 'default' ? s.name : key;
    body.append(el('tr', {
      class: 'clickable', 'data-service': s.name, 'data-namespace': s.namespace,
      onclick: () => { location.hash = '#/service/' + encodeURIComponent(s.namespace) + '/' + encodeURIComponent(s.name); },
    }, el('td', {}, label), el('td', {}, String(s.endpoints.length)), num(rps(r.rps)),
    num(pct(r.successRate), health(r.successRate)), num(ms(r.p50Ms)), num(ms(r.p95Ms)), num(ms(r.p99Ms)), num(pct(r.tlsShare))));
  }
  drawGraph(svcs, edges.edges);
}

// Which service a workload serves: the Service named like it, else the
// most specific one selecting it (fewest endpoints: a version subset
// rather than the whole service).
function workloadServices(svcs) {
  const best = new Map();
  for (const s of svcs) for (const e of s.endpoints) {
    const k = e.namespace + '/' + e.workload;
    const score = s.name === e.workload ? -1 : s.endpoints.length;
    const cur = best.get(k);
    if (!cur || score < cur.score) best.set(k, { score, id: s.namespace + '/' + s.name });
  }
  return new Map([...best].map(([k, v]) => [k, v.id]));
}

function drawGraph(svcs, edges) {
  const box = $('graph');
  if (!edges.length) { box.replaceChildren(el('p', { class: 'empty' }, 'No traffic in the window yet.')); return; }
  const served = workloadServices(svcs);
  const nodes = new Map();
  const node = (id, kind) => { if (!nodes.has(id)) nodes.set(id, { id, kind, out: [], inn: 0 }); return nodes.get(id); };
  const links = [];
  for (const e of edges) {
    const wl = e.sourceNamespace + '/' + e.sourceWorkload;
    const from = e.sourceWorkload ? (served.get(wl) || wl) : '(outside the mesh)';
    const to = e.destinationNamespace + '/' + e.destinationService;
    const a = node(from, served.has(wl) ? 'service' : 'workload');
    const b = node(to, 'service');
    const existing = links.find((l) => l.from === a && l.to === b);
    if (existing) { existing.rps += e.rps; existing.req += e.requests; existing.ok += (e.successRate ?? 1) * e.requests; existing.mtls = existing.mtls === e.mtls ? e.mtls : 'partial'; continue; }
    const l = { from: a, to: b, rps: e.rps, req: e.requests, ok: (e.successRate ?? 1) * e.requests, mtls: e.mtls };
    links.push(l); a.out.push(l);
    if (a !== b) b.inn += 1;
  }
  // Layers: longest path from the nodes nobody calls (bounded, for cycles).
  const layer = new Map();
  const roots = [...nodes.values()].filter((n) => n.inn === 0);
  for (const r of (roots.length ? roots : [nodes.values().next().value])) layer.set(r.id, 0);
  for (let pass = 0; pass < nodes.size; pass++) {
    for (const l of links) {
      if (l.from === l.to) continue;
      const d = (layer.get(l.from.id) ?? 0) + 1;
      if (layer.has(l.from.id) && d > (layer.get(l.to.id) ?? -1) && d < nodes.size) layer.set(l.to.id, d);
    }
  }
  for (const n of nodes.values()) if (!layer.has(n.id)) layer.set(n.id, 0);
  const cols = [];
  for (const n of nodes.values()) { const c = layer.get(n.id); (cols[c] = cols[c] || []).push(n); }
  const W = 170, H = 44, GX = 160, GY = 36;
  cols.forEach((col, ci) => col.forEach((n, ri) => { n.x = 20 + ci * (W + GX); n.y = 50 + ri * (H + GY); }));
  const width = 40 + cols.length * (W + GX) - GX;
  const height = 100 + Math.max(...cols.map((c) => c.length)) * (H + GY) - GY;
  const root = svg('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': 'service graph' });
  for (const l of links) {
    const x1 = l.from.x + W, y1 = l.from.y + H / 2, x2 = l.to.x, y2 = l.to.y + H / 2;
    const success0 = l.req ? l.ok / l.req : null;
    if (l.from === l.to) {
      // A workload calling its own service (e.g. a load generator beside it).
      const sx = l.from.x + W - 30, sy = l.from.y;
      const p = svg('path', { d: `M${sx},${sy} C${sx - 10},${sy - 30} ${sx + 30},${sy - 30} ${sx + 20},${sy}`, class: 'edge ' + l.mtls, 'data-from': l.from.id, 'data-to': l.to.id, 'marker-end': 'url(#arrow)' });
      p.append(svg('title', {}, `${l.from.id} → ${l.to.id}: ${l.mtls}`));
      root.append(p);
      root.append(svg('text', { x: sx + 5, y: sy - 26, 'text-anchor': 'middle', class: 'edge-label' }, `${rps(l.rps)} rps · ${pct(success0)}`));
      continue;
    }
    const back = x2 <= x1;
    const d = back
      ? `M${l.from.x + W / 2},${l.from.y + H} C${l.from.x + W / 2},${l.from.y + H + 40} ${l.to.x + W / 2},${l.to.y + H + 40} ${l.to.x + W / 2},${l.to.y + H}`
      : `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}`;
    const p = svg('path', { d, class: 'edge ' + l.mtls, 'data-from': l.from.id, 'data-to': l.to.id, 'marker-end': 'url(#arrow)' });
    p.append(svg('title', {}, `${l.from.id} → ${l.to.id}: ${l.mtls}`));
    root.append(p);
    const success = l.req ? l.ok / l.req : null;
    const lx = back ? (l.from.x + l.to.x + W) / 2 : (x1 + x2) / 2, ly = back ? Math.max(l.from.y, l.to.y) + H + 34 : (y1 + y2) / 2 - 6;
    root.append(svg('text', { x: lx, y: ly, 'text-anchor': 'middle', class: 'edge-label' },
      `${rps(l.rps)} rps · ${pct(success)}${l.mtls === 'mtls' ? ' · mTLS' : ''}`));
  }
  const defs = svg('defs');
  const marker = svg('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: 'auto-start-reverse' });
  marker.append(svg('path', { d: 'M 0 0 L 10 5 L 0 10 z', fill: '#64748b' }));
  defs.append(marker);
  root.prepend(defs);
  for (const n of nodes.values()) {
    const [ns, name] = n.id.includes('/') ? n.id.split('/') : ['', n.id];
    const g = svg('g', { class: 'node ' + n.kind, 'data-name': name, 'data-namespace': ns, transform: `translate(${n.x},${n.y})` });
    g.append(svg('rect', { width: W, height: H, rx: 6 }));
    g.append(svg('text', { x: 10, y: 19 }, name));
    g.append(svg('text', { x: 10, y: 35, class: 'sub' }, (n.kind === 'service' ? 'service' : 'workload') + (ns && ns !== 'default' ? ' · ' + ns : '')));
    if (n.kind === 'service' && ns) g.addEventListener('click', () => { location.hash = '#/service/' + encodeURIComponent(ns) + '/' + encodeURIComponent(name); });
    root.append(g);
  }
  box.replaceChildren(root);
}

// ---------------------------------------------------------------- service

async function serviceDetail() {
  const { ns, name } = state.service;
  const w = windowParam();
  const [svcs, stat, routes, edges, traces] = await Promise.all([
    api('/api/v1/services'), api('/api/v1/stat?kind=service&window=' + w), api('/api/v1/stat?kind=route&window=' + w),
    api('/api/v1/edges?window=' + w), api('/api/v1/traces?limit=15&service=' + encodeURIComponent(name)),
  ]);
  $('svc-title').textContent = (ns === 'default' ? '' : ns + '/') + name;
  const r = stat.rows.find((x) => x.namespace === ns && x.name === name) || {};
  const sig = $('svc-signals').tBodies[0];
  sig.replaceChildren();
  for (const [k, v, cls] of [['requests/s', rps(r.rps)], ['success', pct(r.successRate), health(r.successRate)], ['p50', ms(r.p50Ms)], ['p95', ms(r.p95Ms)], ['p99', ms(r.p99Ms)], ['mTLS', pct(r.tlsShare)]]) {
    sig.append(el('tr', {}, el('th', {}, k), num(v, cls)));
  }
  const svc = svcs.find((s) => s.namespace === ns && s.name === name);
  const eps = $('svc-endpoints').tBodies[0];
  eps.replaceChildren();
  for (const e of (svc ? svc.endpoints : [])) eps.append(el('tr', {}, el('td', {}, e.instance), el('td', {}, e.workload), el('td', {}, e.address), el('td', {}, e.identity)));
  const rt = $('svc-routes').tBodies[0];
  rt.replaceChildren();
  for (const x of routes.rows.filter((x) => x.namespace === ns && x.service === name)) {
    rt.append(el('tr', {}, el('td', {}, x.name || '(no route)'), num(rps(x.rps)), num(pct(x.successRate), health(x.successRate)), num(ms(x.p99Ms))));
  }
  const cl = $('svc-callers').tBodies[0];
  cl.replaceChildren();
  for (const e of edges.edges.filter((e) => e.destinationNamespace === ns && e.destinationService === name)) {
    cl.append(el('tr', {}, el('td', {}, e.sourceWorkload ? e.sourceNamespace + '/' + e.sourceWorkload : '(outside the mesh)'),
      num(rps(e.rps)), num(pct(e.successRate), health(e.successRate)), el('td', {}, e.mtls)));
  }
  fillTraces($('svc-traces').tBodies[0], traces.traces, false);
}

// ---------------------------------------------------------------- traces

function fillTraces(body, traces, withServices) {
  body.replaceChildren();
  if (!traces.length) { body.append(el('tr', {}, el('td', { colspan: 6, class: 'empty' }, 'No traces kept yet (see Mesh.tracing.sampling).'))); return; }
  for (const t of traces) {
    const cells = [el('td', {}, el('a', { href: '#/trace/' + t.traceId }, t.traceId.slice(0, 16) + '…')), el('td', {}, t.rootService + ': ' + t.rootName)];
    if (withServices) cells.push(el('td', {}, t.services.join(', ')));
    cells.push(num(String(t.spans)), num(ms(t.durationMs), t.errors ? 'bad' : ''), el('td', {}, when(t.startUnixNanos)));
    body.append(el('tr', { 'data-trace': t.traceId }, ...cells));
  }
}

async function tracesView() {
  const t = await api('/api/v1/traces?limit=50');
  fillTraces($('traces').tBodies[0], t.traces, true);
}

async function traceView() {
  const t = await api('/api/v1/traces/' + encodeURIComponent(state.trace));
  $('trace-title').textContent = 'Trace ' + t.traceId;
  const spans = t.spans;
  const byId = new Map(spans.map((s) => [s.spanId, s]));
  const depth = (s, n = 0) => (n < 50 && s.parentSpanId && byId.has(s.parentSpanId) ? depth(byId.get(s.parentSpanId), n + 1) : n);
  const start = Math.min(...spans.map((s) => s.startUnixNanos));
  const end = Math.max(...spans.map((s) => s.endUnixNanos));
  const total = Math.max(end - start, 1);
  const box = $('waterfall');
  box.replaceChildren();
  for (const s of spans) {
    const bar = el('div', { class: 'bar' + (s.error ? ' error' : '') });
    bar.style.left = (100 * (s.startUnixNanos - start) / total) + '%';
    bar.style.width = (100 * (s.endUnixNanos - s.startUnixNanos) / total) + '%';
    const label = el('div', { class: 'label', title: JSON.stringify(s.attributes) }, '\u00a0'.repeat(2 * depth(s)) + s.service + ' · ' + s.kind + ' · ' + s.name);
    box.append(el('div', { class: 'row', 'data-span': s.spanId, 'data-parent': s.parentSpanId }, label, el('div', { class: 'track' }, bar), el('div', { class: 'dur' }, ms(s.durationMs))));
  }
}

// ---------------------------------------------------------------- tap

function stopTap() {
  if (state.tap) { state.tap.abort(); state.tap = null; }
  $('tap-start').disabled = false;
  $('tap-stop').disabled = true;
}

async function startTap(ev) {
  ev.preventDefault();
  stopTap();
  const q = new URLSearchParams();
  if ($('tap-workload').value.trim()) q.set('workload', $('tap-workload').value.trim());
  if ($('tap-path').value.trim()) q.set('path', $('tap-path').value.trim());
  const ctl = new AbortController();
  state.tap = ctl;
  $('tap-start').disabled = true;
  $('tap-stop').disabled = false;
  $('tap-state').textContent = 'starting…';
  const rows = $('tap-events').tBodies[0];
  try {
    const r = await fetch('/api/v1/tap?' + q, { headers: authHeaders(), signal: ctl.signal });
    if (r.status === 401) $('signin').hidden = false;
    if (!r.ok) { let m = r.status; try { m = (await r.json()).error; } catch (_) { /* */ } throw new Error(m); }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line) continue;
        const e = JSON.parse(line);
        if (e.tap) { $('tap-state').textContent = `tapping ${e.proxies} proxies`; continue; }
        rows.prepend(el('tr', {}, el('td', {}, when(e.timestampUnixNanos)), el('td', {}, e.proxy), el('td', {}, e.direction),
          el('td', {}, e.method), el('td', {}, e.authority), el('td', {}, e.path), num(String(e.status), e.status >= 500 ? 'bad' : ''),
          num(e.durationMs.toFixed(1)), el('td', {}, e.route), el('td', {}, (e.sourceIdentity || '?') + ' → ' + (e.destinationIdentity || e.destinationService)),
          el('td', {}, e.tls ? 'yes' : 'no')));
        while (rows.rows.length > 500) rows.deleteRow(rows.rows.length - 1);
      }
    }
    $('tap-state').textContent = 'ended';
  } catch (e) {
    if (e.name !== 'AbortError') $('tap-state').textContent = 'error: ' + (e.message || e);
  }
  stopTap();
}

$('tap-form').addEventListener('submit', startTap);
$('signin').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const t = $('signin-token').value.trim();
  $('signin-token').value = '';
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  route();
});
$('tap-stop').addEventListener('click', () => { stopTap(); $('tap-state').textContent = 'stopped'; });
$('window').addEventListener('change', refresh);
window.addEventListener('hashchange', route);
route();
