// deeprecall-sync admin page. Plain ES module, no framework, no build step: the server embeds this file.
//
// The admin token is kept in sessionStorage only (gone when the tab closes) and sent only to this server, as a
// bearer token. Every value from the server is put into the page with textContent, never as HTML: filenames are
// user data.

const TOKEN_KEY = 'deeprecall.adminToken';
const HEALTH_EVERY_MS = 2000;
const SPARK_POINTS = 60;

const $ = (id) => document.getElementById(id);

// ---- formatting ----

const nf = new Intl.NumberFormat('en');
const fmtInt = (n) => (n === null || n === undefined ? '–' : nf.format(n));

function fmtBytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = Math.abs(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  const sign = n < 0 ? '-' : '';
  return `${sign}${i === 0 ? v : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${units[i]}`;
}

const short = (id) => (id ? `${String(id).slice(0, 8)}…` : '–');

function fmtTime(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toISOString().replace('T', ' ').slice(0, 19);
}

/** Builds an element; children are nodes or strings (inserted as text). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const svg = (tag, attrs = {}) => {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
};

const num = (text, title) => el('td', { class: 'num', title }, text);

// ---- API ----

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const token = () => sessionStorage.getItem(TOKEN_KEY);

async function api(path, params = {}) {
  const url = new URL(path, document.baseURI);
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') url.searchParams.set(k, String(v));
  }
  const res = await fetch(url, { headers: { Authorization: `Bearer ${token()}` }, cache: 'no-store' });
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON: reported below by status
  }
  if (!res.ok) {
    const err = body?.error ?? {};
    throw new ApiError(res.status, err.code ?? 'http_error', err.message ?? `HTTP ${res.status}`);
  }
  return body;
}

// ---- state ----

const state = {
  filters: { q: '', mime: null, owner_id: null, device_id: null, missing: false },
  sort: 'owner_id',
  order: 'asc',
  limit: 50,
  cursors: [null], // cursor of each page visited; the last one is the current page
  starts: [0], // the row number each visited page starts at: a page ends at `limit` rows or 4 MiB, so pages vary
  shown: 0, // rows on the current page
  nextCursor: null,
  lastSample: null,
  lagHistory: [],
  healthTimer: null,
  generation: 0, // bumps on every reload so late answers of an older request are dropped
};

function filterParams() {
  const f = state.filters;
  return {
    q: f.q || undefined,
    mime: f.mime === null ? undefined : f.mime,
    owner_id: f.owner_id ?? undefined,
    device_id: f.device_id ?? undefined,
    missing: f.missing ? 'true' : undefined,
  };
}

// ---- session ----

function showError(message) {
  const p = $('auth-error');
  p.textContent = message;
  p.hidden = !message;
}

function signOut(message = '') {
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(state.healthTimer);
  state.healthTimer = null;
  $('app').hidden = true;
  $('session').hidden = true;
  $('token-form').hidden = false;
  $('intro').hidden = false;
  $('token-input').value = '';
  showError(message);
}

/** Reads `sub` from the token for display only; the server is what verifies it. */
function tokenSubject(jwt) {
  try {
    const part = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part)).sub ?? '?';
  } catch {
    return '?';
  }
}

function handleError(err, where) {
  if (err instanceof ApiError && err.status === 401) {
    signOut(`The server refused this token (401 ${err.code}): ${err.message}`);
  } else if (err instanceof ApiError && err.status === 403) {
    signOut(`This token is not an admin token (403 ${err.code}): ${err.message}`);
  } else {
    showError(`${where}: ${err.message}`);
  }
}

async function signIn(jwt) {
  sessionStorage.setItem(TOKEN_KEY, jwt);
  showError('');
  try {
    // Validates the token before showing anything.
    const sample = await api('v1/admin/stats');
    $('token-form').hidden = true;
    $('intro').hidden = true;
    $('session').hidden = false;
    $('whoami').textContent = `admin ${short(tokenSubject(jwt))}`;
    $('app').hidden = false;
    renderHealth(sample);
    clearInterval(state.healthTimer);
    state.healthTimer = setInterval(pollHealth, HEALTH_EVERY_MS);
    await reload();
  } catch (err) {
    handleError(err, 'Sign-in failed');
  }
}

// ---- health ----

async function pollHealth() {
  if (!token()) return;
  try {
    renderHealth(await api('v1/admin/stats'));
  } catch (err) {
    handleError(err, 'Health');
  }
}

function renderHealth(s) {
  const prev = state.lastSample;
  state.lastSample = s;
  const sample = s.slot.sample;
  const streaming = s.database_up && s.slot.exists && sample.active;
  $('h-slot').textContent = !s.database_up
    ? 'database down'
    : !s.slot.exists
      ? 'slot missing'
      : streaming
        ? 'streaming'
        : 'not streaming';
  $('h-slot').dataset.warn = streaming ? 'false' : 'true';
  $('h-slot-sub').textContent = `slot ${s.slot.name} · generation ${s.stream.generation}`;
  const status = !s.database_up ? 'unknown' : s.slot.exists ? (sample.wal_status ?? 'unknown') : 'missing';
  const badge = $('h-wal-status');
  badge.textContent = status;
  badge.dataset.status = status;
  $('h-safe-wal').textContent =
    sample && sample.safe_wal_size !== null ? `${fmtBytes(sample.safe_wal_size)} before loss` : 'no WAL limit';
  const lag = sample?.lag_bytes ?? null;
  $('h-lag').textContent = fmtBytes(lag);
  $('h-lag').title = lag === null ? '' : `${fmtInt(lag)} bytes`;
  $('h-retained').textContent = fmtBytes(sample?.retained_bytes ?? null);
  $('h-clients').textContent = fmtInt(s.stream.connections);
  $('h-clients-sub').textContent =
    `${fmtInt(s.stream.users)} users · ${fmtInt(s.stream.subscriptions)} subscriptions`;
  if (prev && s.sampled_at_ms > prev.sampled_at_ms) {
    const dt = (s.sampled_at_ms - prev.sampled_at_ms) / 1000;
    const rate = (a, b) => Math.max(0, (a - b) / dt);
    $('h-changes').textContent = rate(s.stream.changes_total, prev.stream.changes_total).toFixed(1);
    $('h-txns').textContent =
      `${rate(s.stream.transactions_total, prev.stream.transactions_total).toFixed(1)} transactions/s`;
  } else {
    $('h-changes').textContent = '…';
  }
  $('h-pool').textContent = `${s.pool.in_use} / ${s.pool.max_size}`;
  $('h-pool-sub').textContent = `${s.pool.size} open · ${s.pool.waiting} waiting`;
  $('h-pool').dataset.warn = s.pool.waiting > 0 ? 'true' : 'false';
  $('health-updated').textContent = `updated ${new Date(s.sampled_at_ms).toLocaleTimeString('en-GB')}`;
  state.lagHistory.push(lag ?? 0);
  if (state.lagHistory.length > SPARK_POINTS) state.lagHistory.shift();
  drawSpark($('h-lag-spark'), state.lagHistory);
}

function drawSpark(node, values) {
  node.replaceChildren();
  if (values.length < 2) return;
  const max = Math.max(1, ...values);
  const step = 200 / (SPARK_POINTS - 1);
  const x0 = 200 - (values.length - 1) * step;
  const points = values.map((v, i) => `${(x0 + i * step).toFixed(1)},${(34 - (v / max) * 32).toFixed(1)}`);
  node.append(svg('polyline', { points: points.join(' '), class: 'spark-line' }));
}

// ---- inventory, totals, groups ----

async function reload() {
  state.generation += 1;
  const gen = state.generation;
  const params = filterParams();
  try {
    const [owners, devices, mimes, missing] = await Promise.all([
      api('v1/admin/blobs', { ...params, group_by: 'owner_id', limit: 20 }),
      api('v1/admin/blobs', { ...params, group_by: 'device_id', limit: 20 }),
      api('v1/admin/blobs', { ...params, group_by: 'mime', limit: 50 }),
      api('v1/admin/blobs', { ...params, missing: 'true', sort: 'size', order: 'desc', limit: 20, count: 'true' }),
      loadPage(gen),
    ]);
    if (gen !== state.generation) return;
    renderTotals(owners.totals);
    renderOwners(owners);
    renderDevices(devices);
    renderMimes(mimes);
    renderMissing(missing);
    showError('');
  } catch (err) {
    handleError(err, 'Loading the inventory failed');
  }
}

async function loadPage(gen = state.generation) {
  const cursor = state.cursors[state.cursors.length - 1];
  const page = await api('v1/admin/blobs', {
    ...filterParams(),
    sort: state.sort,
    order: state.order,
    limit: state.limit,
    cursor,
    count: 'true',
  });
  if (gen !== state.generation) return;
  state.nextCursor = page.next_cursor;
  state.shown = page.items.length;
  renderInventory(page);
}

function renderTotals(t) {
  $('t-blobs').textContent = fmtInt(t.blobs);
  $('t-owners').textContent = fmtInt(t.owners);
  $('t-devices').textContent = fmtInt(t.devices);
  $('t-bytes').textContent = fmtBytes(t.bytes);
  $('t-bytes').title = `${fmtInt(t.bytes)} bytes`;
  $('t-stored').textContent = fmtBytes(t.stored_bytes);
  $('t-stored').title = `${fmtInt(t.stored_bytes)} bytes`;
  $('t-missing').textContent = fmtInt(t.missing_everywhere);
  $('t-missing').dataset.warn = t.missing_everywhere > 0 ? 'true' : 'false';
}

function filterLink(text, title, apply) {
  return el('button', { type: 'button', class: 'link', title, onclick: apply }, text);
}

function renderOwners(res) {
  $('owner-rows').replaceChildren(
    ...res.groups.map((g) =>
      el(
        'tr',
        { 'data-owner': g.owner_id },
        el('td', {}, filterLink(short(g.owner_id), `${g.owner_id} — show only this owner`, () => setFilter({ owner_id: g.owner_id }))),
        num(fmtInt(g.blobs)),
        num(fmtBytes(g.bytes), `${fmtInt(g.bytes)} bytes`),
        num(fmtBytes(g.stored_bytes), `${fmtInt(g.stored_bytes)} bytes`),
        num(fmtInt(g.devices)),
        num(fmtInt(g.missing_everywhere)),
      ),
    ),
  );
  $('owner-more').hidden = !res.more;
}

function renderDevices(res) {
  $('device-rows').replaceChildren(
    ...res.groups.map((g) =>
      el(
        'tr',
        { 'data-device': g.device_id },
        el('td', {}, filterLink(short(g.device_id), `${g.device_id} — show only blobs on this device`, () => setFilter({ device_id: g.device_id }))),
        el('td', { title: g.owner_id }, short(g.owner_id)),
        num(fmtInt(g.blobs)),
        num(fmtBytes(g.bytes), `${fmtInt(g.bytes)} bytes`),
        num(fmtInt(g.missing)),
      ),
    ),
  );
  $('device-more').hidden = !res.more;
}

const mimeLabel = (m) => (m === null ? '(none)' : m);

function renderMimes(res) {
  $('mime-rows').replaceChildren(
    ...res.groups.map((g) =>
      el(
        'tr',
        {},
        el('td', {}, filterLink(mimeLabel(g.mime), 'show only this MIME type', () => setFilter({ mime: g.mime ?? '' }))),
        num(fmtInt(g.blobs)),
        num(fmtBytes(g.bytes), `${fmtInt(g.bytes)} bytes`),
        num(fmtBytes(g.stored_bytes), `${fmtInt(g.stored_bytes)} bytes`),
        num(fmtInt(g.missing_everywhere)),
      ),
    ),
  );
  drawMimeChart(res.groups.slice(0, 8));
  // The MIME filter lists the types seen without a MIME filter, so the choice survives narrowing.
  if (state.filters.mime === null) {
    const select = $('f-mime');
    const options = [el('option', { value: '__all' }, 'All MIME types')];
    for (const g of res.groups) options.push(el('option', { value: g.mime ?? '' }, mimeLabel(g.mime)));
    select.replaceChildren(...options);
    select.value = '__all';
  }
}

/** Horizontal bar chart of stored bytes per MIME type, drawn as inline SVG. */
function drawMimeChart(groups) {
  const chart = $('mime-chart');
  chart.replaceChildren();
  // Drawn at the chart's own width, so the text keeps its size (a scaled viewBox would shrink it).
  const rowH = 26;
  const width = Math.max(320, chart.clientWidth || 480);
  const labelW = Math.min(170, Math.round(width * 0.38));
  const height = Math.max(rowH, groups.length * rowH);
  chart.setAttribute('viewBox', `0 0 ${width} ${height}`);
  chart.setAttribute('height', String(height));
  const max = Math.max(1, ...groups.map((g) => g.stored_bytes));
  groups.forEach((g, i) => {
    const y = i * rowH;
    const w = Math.max(g.stored_bytes > 0 ? 2 : 0, ((width - labelW - 72) * g.stored_bytes) / max);
    const label = svg('text', { x: labelW - 8, y: y + 17, 'text-anchor': 'end', class: 'chart-label' });
    const name = mimeLabel(g.mime);
    const fits = Math.floor((labelW - 10) / 6.5); // characters of 12 px text that fit left of the bars
    label.textContent = name.length > fits ? `${name.slice(0, fits - 1)}…` : name;
    const bar = svg('rect', { x: labelW, y: y + 5, width: w.toFixed(1), height: rowH - 10, rx: 3, class: `bar bar-${i % 8}` });
    const title = svg('title');
    title.textContent = `${mimeLabel(g.mime)}: ${fmtInt(g.stored_bytes)} bytes stored, ${fmtInt(g.blobs)} blobs`;
    bar.append(title);
    const value = svg('text', { x: labelW + w + 6, y: y + 17, class: 'chart-value' });
    value.textContent = fmtBytes(g.stored_bytes);
    chart.append(label, bar, value);
  });
  if (groups.length === 0) {
    const t = svg('text', { x: 8, y: 17, class: 'chart-label' });
    t.textContent = 'no blobs';
    chart.append(t);
  }
}

function renderMissing(res) {
  $('missing-count').textContent =
    res.total > res.items.length ? `largest ${res.items.length} of ${fmtInt(res.total)}` : `${fmtInt(res.total)} blobs`;
  $('missing-rows').replaceChildren(
    ...(res.items.length === 0
      ? [el('tr', {}, el('td', { colspan: 7, class: 'muted' }, 'Every blob is on at least one device.'))]
      : res.items.map((b) =>
          el(
            'tr',
            {},
            el('td', { title: b.owner_id }, short(b.owner_id)),
            el('td', { class: 'mono', title: b.sha256 }, b.sha256.slice(0, 12)),
            el('td', {}, b.filename ?? '–'),
            el('td', {}, mimeLabel(b.mime)),
            num(fmtBytes(b.size), `${fmtInt(b.size)} bytes`),
            el('td', { title: b.missing_on.join('\n') + (b.missing_on_truncated ? '\n…' : '') }, b.missing_on.length ? b.missing_on.map(short).join(', ') : 'never reported'),
            el('td', {}, fmtTime(b.last_seen_at)),
          ),
        )),
  );
}

function renderInventory(page) {
  const first = state.starts[state.starts.length - 1];
  $('inv-range').textContent =
    page.items.length === 0 ? 'no blobs match' : `${fmtInt(first + 1)}–${fmtInt(first + page.items.length)} of ${fmtInt(page.total)}`;
  $('inv-prev').disabled = state.cursors.length <= 1;
  $('inv-next').disabled = !page.next_cursor;
  for (const th of document.querySelectorAll('#inv-table th[data-sort]')) {
    const active = th.dataset.sort === state.sort;
    th.setAttribute('aria-sort', active ? (state.order === 'asc' ? 'ascending' : 'descending') : 'none');
  }
  $('inv-rows').replaceChildren(
    ...page.items.map((b) =>
      el(
        'tr',
        { 'data-sha256': b.sha256, 'data-owner': b.owner_id },
        el('td', { title: b.owner_id }, short(b.owner_id)),
        el('td', { class: 'mono', title: b.sha256 }, b.sha256.slice(0, 12)),
        el('td', { title: b.filename ?? '' }, b.filename ?? '–'),
        el('td', {}, mimeLabel(b.mime)),
        num(fmtBytes(b.size), `${fmtInt(b.size)} bytes`),
        num(fmtInt(b.device_count), b.devices.join('\n') + (b.devices_truncated ? '\n…' : '')),
        num(fmtBytes(b.stored_bytes), `${fmtInt(b.stored_bytes)} bytes`),
        num(fmtInt(b.asset_count)),
        el('td', {}, fmtTime(b.last_seen_at)),
      ),
    ),
  );
}

// ---- filters ----

function renderChips() {
  const chip = (node, label, value, key) => {
    node.hidden = value === null;
    if (value === null) return;
    node.replaceChildren(
      `${label} ${short(value)} `,
      el('button', { type: 'button', class: 'link', title: 'remove this filter', onclick: () => setFilter({ [key]: null }) }, '×'),
    );
  };
  chip($('f-owner'), 'owner', state.filters.owner_id, 'owner_id');
  chip($('f-device'), 'device', state.filters.device_id, 'device_id');
  $('f-mime').value = state.filters.mime ?? '__all';
  $('f-missing').checked = state.filters.missing;
}

function resetPaging() {
  state.cursors = [null];
  state.starts = [0];
}

function setFilter(change) {
  Object.assign(state.filters, change);
  resetPaging();
  renderChips();
  reload();
}

function setSort(column) {
  if (state.sort === column) state.order = state.order === 'asc' ? 'desc' : 'asc';
  else {
    state.sort = column;
    // Sizes and counts are most interesting largest first.
    state.order = ['size', 'stored_bytes', 'device_count', 'asset_count', 'last_seen_at'].includes(column) ? 'desc' : 'asc';
  }
  resetPaging();
  loadPage().catch((err) => handleError(err, 'Loading the inventory failed'));
}

function wire() {
  $('token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const value = $('token-input').value.trim();
    if (value) signIn(value);
  });
  $('sign-out').addEventListener('click', () => signOut());
  $('refresh').addEventListener('click', () => {
    reload();
    pollHealth();
  });
  let debounce = null;
  $('f-q').addEventListener('input', (e) => {
    clearTimeout(debounce);
    debounce = setTimeout(() => setFilter({ q: e.target.value.trim() }), 250);
  });
  $('f-mime').addEventListener('change', (e) => setFilter({ mime: e.target.value === '__all' ? null : e.target.value }));
  $('f-missing').addEventListener('change', (e) => setFilter({ missing: e.target.checked }));
  $('inv-limit').addEventListener('change', (e) => {
    state.limit = Number(e.target.value);
    resetPaging();
    loadPage().catch((err) => handleError(err, 'Loading the inventory failed'));
  });
  $('inv-next').addEventListener('click', () => {
    if (!state.nextCursor) return;
    state.starts.push(state.starts[state.starts.length - 1] + state.shown);
    state.cursors.push(state.nextCursor);
    loadPage().catch((err) => handleError(err, 'Loading the inventory failed'));
  });
  $('inv-prev').addEventListener('click', () => {
    if (state.cursors.length <= 1) return;
    state.cursors.pop();
    state.starts.pop();
    loadPage().catch((err) => handleError(err, 'Loading the inventory failed'));
  });
  for (const th of document.querySelectorAll('#inv-table th[data-sort]')) {
    th.tabIndex = 0;
    th.addEventListener('click', () => setSort(th.dataset.sort));
    th.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' || e.key === ' ') {
        e.preventDefault();
        setSort(th.dataset.sort);
      }
    });
  }
}

wire();
const saved = token();
if (saved) signIn(saved);
