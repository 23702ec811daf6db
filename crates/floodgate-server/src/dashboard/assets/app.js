// Floodgate dashboard: plain JavaScript, no build step, no outside requests.
// Routes: #/ the overview; #/limiter/NAME one limiter. Live data comes by server-sent events.
'use strict';

const $ = (id) => document.getElementById(id);
const main = $('main');
// Hooks the browser tests read (counts only; no timing is asserted).
const fg = window.__fg = {overviewUpdates: 0, overviewDeltas: 0, limiterUpdates: 0, chartDraws: 0, firstRender: null};

let source = null;   // the open EventSource
let overviewRows = [];
let sortKey = 'name', sortDir = 1, filter = '';
const MAX_ROWS = 1000; // rows drawn at once; the filter finds the rest

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
}
// A client's text (a holder label) with its invisible characters written as \u{XXXX}, as the
// server's logs show them (floodgate-server's shown.rs): the API refuses only controls, so a
// label may carry U+202E (which reverses the rest of the cell) or U+200B (two labels alike), or
// characters that draw nothing (U+034F, variation selectors, the Hangul fillers: Unicode's
// Default_Ignorable_Code_Point).
function shown(s) {
  return String(s).replace(/(?! )[\p{C}\p{Z}\p{Default_Ignorable_Code_Point}]/gu,
    (c) => '\\u{' + c.codePointAt(0).toString(16).toUpperCase().padStart(4, '0') + '}');
}
function ms(v) {
  if (v == null || v < 0) return '–';
  if (v < 1) return v.toFixed(2) + ' ms';
  if (v < 999.5) return Math.round(v) + ' ms';
  if (v < 59950) return (v / 1000).toFixed(1) + ' s';
  // Rounded to whole seconds before the split: 119.7 s reads 2m00s, not 1m60s.
  const s = Math.round(v / 1000);
  return Math.floor(s / 60) + 'm' + String(s % 60).padStart(2, '0') + 's';
}
function num(v) { return v == null || v < 0 ? '–' : (Math.round(v * 10) / 10).toString(); }

function setStore(store, t) {
  const el = $('store');
  const ok = store === 'ok';
  el.textContent = ok ? 'store: ok' : 'store: ' + store;
  el.className = ok ? 'store' : 'store bad';
  if (t) $('updated').textContent = 'updated ' + new Date(t * 1000).toLocaleTimeString();
}

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    credentials: 'same-origin',
    headers: {'Content-Type': 'application/json', 'X-Floodgate-Dashboard': '1'},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401) { location.replace('/login'); throw new Error('signed out'); }
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.message || ('HTTP ' + r.status));
  return data;
}

function confirmAction(text) {
  return new Promise((resolve) => {
    $('confirm-text').textContent = text;
    $('confirm').hidden = false;
    const done = (v) => { $('confirm').hidden = true; $('confirm-yes').onclick = $('confirm-no').onclick = null; resolve(v); };
    $('confirm-yes').onclick = () => done(true);
    $('confirm-no').onclick = () => done(false);
  });
}

function listen(path, handlers) {
  if (source) source.close();
  source = new EventSource(path, {withCredentials: true});
  for (const [ev, fn] of Object.entries(handlers)) source.addEventListener(ev, (e) => fn(JSON.parse(e.data)));
  source.onerror = () => {
    setStore('connection lost, retrying', null);
    // The browser retries a dropped stream by itself, but not one answered with an error: a
    // 401 (the session ended: the server restarted, or it expired) closes it for good, and
    // the page would show old numbers for ever. Ask why: sign in again, or listen anew.
    if (source.readyState !== EventSource.CLOSED) return;
    const closed = source;
    setTimeout(async () => {
      if (source !== closed) return;  // the page moved on and listens elsewhere
      try { await api('GET', '/dashboard/api/overview'); } catch (e) {
        if (e.message === 'signed out') return;  // api() is taking the page to /login
      }
      if (source === closed) listen(path, handlers);
    }, 1000);
  };
}

// ---------- overview ----------
const COLS = [
  ['name', 'Limiter'], ['in_use', 'In use / limit'], ['waiting', 'Waiting'], ['oldest_wait_ms', 'Oldest wait'],
  ['grants_s', 'Grants/s'], ['timeouts_s', 'Timeouts/s'], ['wait_p50_ms', 'Wait p50'], ['wait_p99_ms', 'Wait p99'],
  ['throttles_s', 'Throttles/s'], ['throttled', 'Throttled'], ['expired', 'Expired'],
];

function renderOverviewShell() {
  main.innerHTML = '<div class="tools"><input id="filter" placeholder="filter by name" size="30">' +
    '<span id="count" class="muted"></span></div>' +
    '<table id="overview"><thead><tr>' +
    COLS.map(([k, t]) => '<th data-key="' + k + '">' + t + '</th>').join('') +
    '</tr></thead><tbody id="rows"></tbody></table>';
  $('filter').value = filter;
  $('filter').addEventListener('input', (e) => { filter = e.target.value; drawRows(); });
  for (const th of main.querySelectorAll('th')) {
    th.addEventListener('click', () => {
      const k = th.dataset.key;
      if (sortKey === k) sortDir = -sortDir; else { sortKey = k; sortDir = k === 'name' ? 1 : -1; }
      drawRows();
    });
  }
}

function drawRows() {
  const body = $('rows');
  if (!body) return;
  const f = filter.toLowerCase();
  let rows = f ? overviewRows.filter((r) => r.name.toLowerCase().includes(f)) : overviewRows.slice();
  const key = sortKey === 'in_use' ? (r) => (r.limit ? r.in_use / r.limit : 0) : (r) => r[sortKey];
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * sortDir || (a.name < b.name ? -1 : 1);
  });
  const shown = rows.slice(0, MAX_ROWS);
  const html = [];
  for (const r of shown) {
    const frac = r.limit ? Math.min(1, r.in_use / r.limit) : 0;
    const sat = r.limit && r.in_use >= r.limit;
    html.push('<tr data-name="' + esc(r.name) + '"' + (sat ? ' class="sat"' : '') + '>' +
      '<td><a href="#/limiter/' + encodeURIComponent(r.name) + '">' + esc(r.name) + '</a></td>' +
      '<td class="inuse">' + r.in_use + ' / ' + (r.limit == null ? '–' : r.limit) +
      '<span class="bar"><i class="' + (sat ? 'full' : '') + '" style="width:' + (frac * 100).toFixed(0) + '%"></i></span></td>' +
      '<td class="waiting">' + r.waiting + '</td><td>' + ms(r.waiting ? r.oldest_wait_ms : -1) + '</td>' +
      '<td class="grants">' + num(r.grants_s) + '</td><td>' + num(r.timeouts_s) + '</td>' +
      '<td>' + ms(r.wait_p50_ms) + '</td><td>' + ms(r.wait_p99_ms) + '</td>' +
      '<td>' + num(r.throttles_s) + '</td><td>' + r.throttled + '</td><td>' + r.expired + '</td></tr>');
  }
  body.innerHTML = html.join('');
  $('count').textContent = rows.length + ' of ' + overviewRows.length + ' limiters' +
    (rows.length > MAX_ROWS ? ' (first ' + MAX_ROWS + ' shown; filter to see others)' : '');
  for (const th of main.querySelectorAll('th')) {
    th.textContent = COLS.find(([k]) => k === th.dataset.key)[1] + (th.dataset.key === sortKey ? (sortDir > 0 ? ' ▲' : ' ▼') : '');
  }
}

let overviewSeq = null; // the render the rows are at: a delta applies only to the one before it

function onOverview(data) {
  overviewRows = data.limiters;
  overviewSeq = data.seq;
  overviewShown(data);
}

// What changed since the render before: the rows that differ, and the limiters gone.
function onOverviewDelta(d) {
  if (overviewSeq !== null && d.seq <= overviewSeq) return;  // already shown
  if (overviewSeq === null || d.seq !== overviewSeq + 1) {
    // Not the render after ours (cannot happen on one stream): read the whole again.
    api('GET', '/dashboard/api/overview').then(onOverview, (e) => setStore(String(e.message), null));
    return;
  }
  if (d.changed.length || d.removed.length) {
    const rows = new Map(overviewRows.map((r) => [r.name, r]));
    for (const r of d.changed) rows.set(r.name, r);
    for (const name of d.removed) rows.delete(name);
    overviewRows = Array.from(rows.values());
  }
  overviewSeq = d.seq;
  fg.overviewDeltas++;
  overviewShown(d);
}

function overviewShown(data) {
  setStore(data.store, data.t);
  drawRows();
  fg.overviewUpdates++;
  if (fg.firstRender === null && $('rows')) {
    performance.mark('fg-first-render');
    fg.firstRender = performance.now();
  }
}

async function showOverview() {
  renderOverviewShell();
  try { onOverview(await api('GET', '/dashboard/api/overview')); } catch (e) { setStore(String(e.message), null); }
  listen('/dashboard/events', {overview: onOverview, 'overview-delta': onOverviewDelta});
}

// ---------- one limiter ----------
let page = null; // {name, start, samples, status, holders}

const CHARTS = [
  {id: 'c-inuse', title: 'In use against the limit in force', series: [['in_use', '#2f81f7', 'in use'], ['limit', '#d29922', 'limit']], marks: true},
  {id: 'c-wait', title: 'Waiters and oldest wait (s)', series: [['waiting', '#a371f7', 'waiting'], ['oldest_s', '#f85149', 'oldest wait s']]},
  {id: 'c-rate', title: 'Grants and timeouts per second', series: [['grants', '#3fb950', 'grants/s'], ['timeouts', '#f85149', 'timeouts/s']]},
  {id: 'c-lat', title: 'Wait p50 / p99 (ms, this server)', series: [['wait_p50_ms', '#2f81f7', 'p50'], ['wait_p99_ms', '#d29922', 'p99']]},
  {id: 'c-tokens', title: 'Rate tokens available', series: [['rate_tokens', '#3fb950', 'tokens']]},
];

function value(s, key) {
  if (key === 'oldest_s') return s.oldest_wait_ms / 1000;
  return s[key];
}

function drawChart(canvas, def) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext('2d');
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const samples = page.samples, n = samples.length;
  const left = 44, right = w - 6, top = 6, bottom = h - 18;
  let max = 1;
  for (const s of samples) for (const [k] of def.series) { const v = value(s, k); if (v > max) max = v; }
  max *= 1.1;
  g.strokeStyle = '#2a333d'; g.fillStyle = '#8b949e'; g.font = '10px system-ui'; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = bottom - (bottom - top) * i / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(right, y); g.stroke();
    g.fillText(num(max * i / 4), 2, y + 3);
  }
  // Seconds on the axis: the history held (at least a minute), up to the full 15 minutes.
  const span = Math.min(900, Math.max(60, n));
  const end = page.start + n - 1;
  const x = (t) => left + (right - left) * (1 - (end - t) / (span - 1));
  for (let q = 0; q <= 4; q++) {
    const ago = Math.round(span * q / 4);
    const label = q === 0 ? 'now' : ago >= 120 ? '-' + Math.round(ago / 60) + 'm' : '-' + ago + 's';
    g.fillText(label, Math.max(left, x(end - ago) - 10), h - 4);
  }
  if (def.marks) {
    // Throttle feedback (red) and adaptive limit moves (amber down, green up) on the time axis.
    samples.forEach((s, i) => {
      const t = page.start + i;
      if (end - t >= span) return;
      const mark = (color) => { g.fillStyle = color; g.fillRect(x(t) - 1, bottom - 6, 2, 6); };
      if (s.throttles > 0) mark('#f85149');
      if (s.limit_down > 0) mark('#d29922');
      if (s.limit_up > 0) mark('#3fb950');
    });
  }
  let points = 0;
  for (const [k, color] of def.series) {
    g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
    let pen = false;
    samples.forEach((s, i) => {
      if (end - (page.start + i) >= span) return;
      const v = value(s, k);
      if (v == null || v < 0) { pen = false; return; }
      const px = x(page.start + i), py = bottom - (bottom - top) * v / max;
      if (pen) g.lineTo(px, py); else g.moveTo(px, py);
      pen = true; points++;
    });
    g.stroke();
  }
  canvas.dataset.points = points;
  canvas.dataset.end = end;
  fg.chartDraws++;
}

function drawCharts() {
  for (const def of CHARTS) { const c = $(def.id); if (c) drawChart(c, def); }
}

function renderStatus() {
  const s = page.status, h = page.holders;
  $('kv').innerHTML = [
    ['In use', s.in_use + ' / ' + (s.limit == null ? '–' : s.limit)], ['Holders', h.total_holders],
    ['Waiting', h.waiting], ['Oldest wait', ms(h.oldest_wait_ms)], ['Granted', s.counters.granted],
    ['Expired', s.counters.expired], ['Throttled', s.counters.feedback_throttled],
    ['Limit moves', s.counters.limit_decreases + s.counters.limit_increases + (s.adaptive ? ' (adaptive ' + s.adaptive.min + '–' + s.adaptive.max + ')' : '')],
  ].map(([k, v]) => '<div><span class="muted">' + k + '</span><b id="kv-' + k.toLowerCase().replace(/ /g, '-') + '">' + esc(v) + '</b></div>').join('');
  const rows = h.holders.map((x) => '<tr data-token="' + x.fencing_token + '"><td class="label">' + esc(x.label == null ? '–' : shown(x.label)) + '</td>' +
    '<td>' + x.permits + '</td><td>' + ms(x.age_ms) + '</td><td>' + ms(x.lease_left_ms) + '</td><td>' + x.fencing_token + '</td>' +
    '<td>' + (s.api_writes ? '<button class="release" data-token="' + x.fencing_token + '">Release</button>' : '') + '</td></tr>');
  $('holders').innerHTML = rows.join('');
  $('holders-note').textContent = h.truncated ? ('showing ' + h.holders.length + ' of ' + h.total_holders + ', lease ending soonest first') : '';
  $('admin').hidden = !s.api_writes;
}

async function showLimiter(name) {
  const data = await api('GET', '/dashboard/api/limiters/' + encodeURIComponent(name)).catch((e) => {
    main.innerHTML = '<p>' + esc(e.message) + '</p><p><a href="#/">back</a></p>';
    return null;
  });
  if (!data) return;
  page = {name, start: data.history.start, samples: data.history.samples, status: data.status, holders: data.holders};
  main.innerHTML = '<p><a href="#/">← all limiters</a></p><h2 id="title">' + esc(name) + '</h2><div class="kv" id="kv"></div>' +
    '<div class="tools" id="admin" hidden><label>Concurrency <input id="new-limit" type="number" min="1" size="6"></label>' +
    '<button id="set-limit">Set limit</button><button id="delete" class="danger">Delete limiter</button><span id="msg" class="msg"></span></div>' +
    '<div class="grid">' + CHARTS.map((c) => '<div class="card"><h3>' + c.title + '</h3><div class="legend">' +
      c.series.map(([, color, label]) => '<span style="color:' + color + '">■ ' + label + '</span>').join('') +
      (c.marks ? '<span style="color:#f85149">| throttle</span><span style="color:#d29922">| limit down</span><span style="color:#3fb950">| limit up</span>' : '') +
      '</div><canvas id="' + c.id + '"></canvas></div>').join('') + '</div>' +
    '<div class="card" style="margin-top:12px"><h3>Holders <span id="holders-note" class="muted"></span></h3>' +
    '<table><thead><tr><th>Label</th><th>Permits</th><th>Age</th><th>Lease left</th><th>Fencing token</th><th></th></tr></thead>' +
    '<tbody id="holders"></tbody></table></div>';
  if (page.status.rate == null) $('c-tokens').parentElement.hidden = true;
  $('new-limit').value = page.status.concurrency == null ? '' : page.status.concurrency;
  renderStatus();
  drawCharts();
  $('set-limit').onclick = async () => {
    const v = parseInt($('new-limit').value, 10);
    if (!(v >= 1)) { $('msg').textContent = 'enter a limit of at least 1'; return; }
    if (!await confirmAction('Set the concurrency of ' + name + ' to ' + v + '?')) return;
    try { await api('PUT', '/dashboard/api/limiters/' + encodeURIComponent(name) + '/limit', {concurrency: v}); $('msg').textContent = 'limit set to ' + v; }
    catch (e) { $('msg').textContent = e.message; }
  };
  $('delete').onclick = async () => {
    if (!await confirmAction('Delete the limiter ' + name + '? Its waiters are refused and its permits are no longer held.')) return;
    try { await api('DELETE', '/dashboard/api/limiters/' + encodeURIComponent(name)); location.hash = '#/'; }
    catch (e) { $('msg').textContent = e.message; }
  };
  $('holders').onclick = async (ev) => {
    const b = ev.target.closest('button.release');
    if (!b) return;
    const token = Number(b.dataset.token);
    if (!await confirmAction('Release permit ' + token + ' of ' + name + '? Its holder loses it (its next extend answers permit_lost).')) return;
    try { const r = await api('POST', '/dashboard/api/limiters/' + encodeURIComponent(name) + '/release', {fencing_token: token}); $('msg').textContent = r.released ? 'released' : 'it was no longer held'; }
    catch (e) { $('msg').textContent = e.message; }
  };
  listen('/dashboard/events/' + encodeURIComponent(name), {
    limiter: (d) => {
      if (!page || page.name !== name) return;
      page.status = d.status; page.holders = d.holders;
      if (d.sample && d.sample.s) {
        const end = page.start + page.samples.length - 1;
        if (page.samples.length === 0) { page.start = d.sample.t; page.samples.push(d.sample.s); }
        else if (d.sample.t > end) {
          // Fill seconds missed (a late tick) with the new sample, then trim to 15 minutes.
          for (let t = end + 1; t <= d.sample.t; t++) page.samples.push(d.sample.s);
        }
        const extra = page.samples.length - 900;
        if (extra > 0) { page.samples.splice(0, extra); page.start += extra; }
      }
      setStore('ok', d.sample ? d.sample.t : null);
      renderStatus();
      drawCharts();
      fg.limiterUpdates++;
    },
    gone: () => { main.innerHTML = '<p>The limiter ' + esc(name) + ' no longer exists.</p><p><a href="#/">back</a></p>'; source.close(); },
    store_error: (d) => setStore(d.message, null),
  });
}

function route() {
  const m = location.hash.match(/^#\/limiter\/(.+)$/);
  page = null;
  if (m) showLimiter(decodeURIComponent(m[1])); else showOverview();
}

$('logout').onclick = async () => {
  await fetch('/dashboard/logout', {method: 'POST', credentials: 'same-origin', headers: {'X-Floodgate-Dashboard': '1'}});
  location.replace('/login');
};
window.addEventListener('hashchange', route);
window.addEventListener('resize', () => { if (page) drawCharts(); });
route();
