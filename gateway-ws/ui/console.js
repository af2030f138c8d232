// The operator console: reads /v1/admin with an admin API key that lives in
// this module's memory only (never in storage, a cookie or a URL).
const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;

let key = null;
let timer = null;
let node = null;
let previous = null; // last stats sample, for rates

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function row(cells, props = {}) {
  return el('tr', props, ...cells.map((c) => el('td', {}, c)));
}

class Refused extends Error {}

async function get(path) {
  const res = await fetch(path, { headers: { Authorization: `Bearer ${key}` }, cache: 'no-store' });
  const body = await res.json().catch(() => ({}));
  if (res.status === 401 || res.status === 403) throw new Refused(`${body.code}: ${body.message}`);
  if (!res.ok) throw new Error(`${path}: ${res.status} ${body.code || ''} ${body.message || ''}`);
  return body;
}

function lock(reason) {
  key = null;
  clearTimeout(timer);
  $('console').hidden = true;
  $('unlock').hidden = false;
  $('lock').hidden = true;
  $('status').textContent = 'locked';
  if (reason) $('errors').textContent = reason;
}

const fmt = (n, digits = 1) => (n == null ? '–' : Number(n).toFixed(digits));
const ms = (s) => (s == null ? '–' : `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`);

function renderStats(s) {
  const now = performance.now();
  const rate = (sample) => {
    if (!previous) return null;
    const before = previous.s.messages.find((m) => m.kind === sample.kind && m.feature === sample.feature);
    return (sample.total - (before ? before.total : 0)) / ((now - previous.at) / 1000);
  };
  const tiles = [['connections', fmt(s.connections, 0)]];
  for (const m of s.messages) tiles.push([`${m.kind} ${m.feature}/s`, fmt(rate(m)), `${fmt(m.total, 0)} in all`]);
  tiles.push(['delivery p50', ms(s.deliveryLatency.p50)], ['delivery p99', ms(s.deliveryLatency.p99), `${fmt(s.deliveryLatency.count, 0)} measured`]);
  const refused = s.refusals.reduce((a, r) => a + r.total, 0);
  tiles.push(['refusals', fmt(refused, 0), s.refusals.map((r) => `${r.code} ${r.total}`).join(', ')]);
  $('stats').replaceChildren(...tiles.map(([name, value, sub]) => el('div', {}, name, el('b', {}, value), sub ? el('span', { class: 'details' }, sub) : null)));
  previous = { s, at: now };
}

function renderCluster(c) {
  const rows = c.members.map((m) => row([
    m.id + (m.this ? ' (this)' : ''),
    m.roles.join(', '),
    m.addr,
    m.foreign ? 'other mesh secret: ignored' : 'registered',
  ], { 'data-id': m.id }));
  if (!c.discovery) rows.push(row([node.node + ' (this)', node.roles.join(', '), '–', 'no discovery: the deployment is this process'], { 'data-id': node.node }));
  $('members').replaceChildren(...rows);
}

function renderFederation(f, stats) {
  $('federation').textContent = f.error ? f.error : f.domains.length ? (f.enabled ? 'this domain federates' : 'this process does not federate') : 'no federation topology';
  $('domains-table').hidden = !f.domains.length;
  $('links-table').hidden = !f.links.length;
  $('domains').replaceChildren(...f.domains.map((d) => row([d.name, d.client, d.federation])));
  const outbox = new Map(stats.links.map((l) => [l.peer, l]));
  $('links').replaceChildren(...f.links.map((l) => {
    const here = outbox.get(l.a === node.domain ? l.b : l.a);
    const cls = l.state === 'up' ? 'ok' : l.state === 'down' ? 'bad' : '';
    return row([`${l.a} – ${l.b}`, String(l.weight), el('span', { class: cls }, l.state), here ? fmt(here.outboxDepth, 0) : '–']);
  }));
}

async function refresh() {
  try {
    if (!node) node = await get('/v1/admin/node');
    const [stats, cluster, federation] = await Promise.all([get('/v1/admin/stats'), get('/v1/admin/cluster'), get('/v1/admin/federation')]);
    const checks = node.checks.map((c) => `${c.name} ${c.ok ? 'ok' : c.error}`).join(' · ');
    $('node').textContent = `${node.node} · domain ${node.domain} · roles ${node.roles.join(', ')} · ${checks}`;
    $('trace').hidden = !node.jaegerUrl;
    renderStats(stats);
    renderCluster(cluster);
    renderFederation(federation, stats);
    $('status').textContent = `updated ${new Date().toLocaleTimeString()}`;
    $('errors').textContent = '';
  } catch (e) {
    if (e instanceof Refused) { lock(e.message); return; }
    $('errors').textContent = e.message;
  }
  if (key) timer = setTimeout(refresh, POLL_MS);
}

$('unlock').addEventListener('submit', (ev) => {
  ev.preventDefault();
  key = $('key').value;
  $('key').value = '';
  node = null;
  previous = null;
  $('unlock').hidden = true;
  $('console').hidden = false;
  $('lock').hidden = false;
  refresh();
});

$('lock').addEventListener('click', () => lock());

$('trace-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const id = $('trace-id').value.trim();
  const link = $('trace-link');
  // Jaeger's search by the span attribute every role records.
  const query = new URLSearchParams({ service: node.traceService, tags: JSON.stringify({ 'message.id': id }) });
  link.href = `${node.jaegerUrl.replace(/\/$/, '')}/search?${query}`;
  link.hidden = false;
  link.focus();
});
