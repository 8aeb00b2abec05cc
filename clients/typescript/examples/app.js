// Example app: a list of works with add / edit / delete on top of @deeprecall/sync-client (dist/browser.js, Dexie
// bundled). The end-to-end tests drive this page. Query parameters:
//   api    the sync server's base URL (required; another origin than this page)
//   user   the user id the "Sign in" button signs in as (stands in for NextAuth)
//   ttl    token lifetime in seconds (default 600)
//   batch  ops per /v1/batch request (default: the server's 1000)
// The page's own origin answers GET /api/sync-token?sub=…&ttl=… with {token}, like the Next.js route in
// docs/client.md.
import { createSyncClient, liveQuery } from '/dist/browser.js';

const params = new URLSearchParams(location.search);
const api = params.get('api');
const ttl = params.get('ttl') ?? '600';
const batch = params.get('batch');
const SIGNED_IN = 'example:signed-in-user';

// A persistent device id, generated once per browser profile.
let deviceId = localStorage.getItem('example:device-id');
if (!deviceId) {
  deviceId = crypto.randomUUID();
  localStorage.setItem('example:device-id', deviceId);
}

async function getToken() {
  const user = localStorage.getItem(SIGNED_IN);
  if (!user) return null; // guest
  const res = await fetch(`/api/sync-token?sub=${encodeURIComponent(user)}&ttl=${encodeURIComponent(ttl)}`, { cache: 'no-store' });
  if (res.status === 401) return null;
  if (!res.ok) throw new Error(`token route answered ${res.status}`);
  return (await res.json()).token;
}

const $ = (id) => document.getElementById(id);
const events = { rejected: [], repaired: [], blobRejected: [], errors: [], states: [] };

if ('serviceWorker' in navigator) {
  // Lets the page (and this script) load while offline: reloads keep working, the outbox waits in IndexedDB.
  navigator.serviceWorker.register('/sw.js').catch((e) => console.warn('service worker', e));
}

const sync = await createSyncClient({
  url: api,
  deviceId,
  getToken,
  // This page keeps no files, so its CAS is empty; the end-to-end tests set window.app.localBlobs to report some.
  localBlobs: async () => (window.app?.localBlobs ? window.app.localBlobs() : []),
  ...(batch ? { maxOpsPerBatch: Number(batch) } : {}),
});

function renderHeader() {
  $('state').textContent = sync.state;
  $('state').dataset.state = sync.state;
  $('who').textContent = sync.userId ? `user ${sync.userId.slice(0, 8)}…` : 'guest';
  $('sign-in').hidden = sync.userId !== null;
  $('sign-out').hidden = sync.userId === null;
  $('banner').hidden = sync.userId !== null;
}

function renderWorks(works, pendingIds) {
  const ul = $('works');
  ul.replaceChildren();
  works.sort((a, b) => String(a.title).localeCompare(String(b.title)) || String(a.id).localeCompare(String(b.id)));
  for (const w of works) {
    const li = document.createElement('li');
    li.dataset.id = w.id;
    if (pendingIds.has(w.id)) li.classList.add('pending');
    const title = document.createElement('span');
    title.className = 'title';
    title.textContent = w.title;
    const edit = document.createElement('button');
    edit.className = 'edit';
    edit.textContent = 'Edit';
    edit.onclick = () => startEdit(li, w);
    const del = document.createElement('button');
    del.className = 'delete';
    del.textContent = 'Delete';
    del.onclick = () => sync.write([{ table: 'works', kind: 'delete', row: { id: w.id } }]);
    li.append(title, edit, del);
    ul.append(li);
  }
}

function startEdit(li, w) {
  const input = document.createElement('input');
  input.type = 'text';
  input.className = 'edit-title';
  input.value = w.title;
  const save = document.createElement('button');
  save.className = 'save';
  save.textContent = 'Save';
  save.onclick = async () => {
    await sync.write([{ table: 'works', kind: 'update', row: { id: w.id, title: input.value } }]);
  };
  li.replaceChildren(input, save);
  input.focus();
}

// Re-subscribed whenever sync.db changes (sign-in / sign-out switch databases).
let subscription = null;
function watch() {
  subscription?.unsubscribe();
  subscription = liveQuery(async () => {
    const works = await sync.rows('works');
    const pending = await sync.pendingOps('works');
    return { works, pendingIds: new Set(pending.map((p) => p.rowId)), count: await sync.pendingCount() };
  }).subscribe({
    next: ({ works, pendingIds, count }) => {
      renderWorks(works, pendingIds);
      $('pending').textContent = count > 0 ? `${count} pending` : '';
    },
    error: (e) => console.error(e),
  });
}

sync.onStateChange((s) => {
  events.states.push(s);
  renderHeader();
});
sync.on('database', () => {
  renderHeader();
  watch();
});
sync.onRejected((r) => {
  events.rejected.push(r);
  const li = document.createElement('li');
  li.textContent = `${r.op.kind} ${r.table} ${String(r.op.row.title ?? r.rowId)}: ${r.code}: ${r.message}`;
  li.dataset.code = r.code;
  $('rejections').append(li);
});
sync.on('repaired', (r) => events.repaired.push(r));
sync.on('blobRejected', (r) => events.blobRejected.push(r));
sync.on('error', (e) => events.errors.push(e));

$('add').onsubmit = async (ev) => {
  ev.preventDefault();
  const title = $('title').value.trim();
  if (!title) return;
  $('title').value = '';
  await sync.write([{ table: 'works', kind: 'insert', row: { title } }]);
};

async function signIn() {
  const user = params.get('user');
  if (!user) throw new Error('no ?user= to sign in as');
  localStorage.setItem(SIGNED_IN, user); // what a NextAuth session cookie would be
  await sync.signIn();
  renderHeader();
}
async function signOut() {
  localStorage.removeItem(SIGNED_IN);
  await sync.signOut();
  renderHeader();
}
$('sign-in').onclick = () => signIn().catch((e) => events.errors.push({ source: 'page', message: String(e) }));
$('sign-out').onclick = () => signOut();

renderHeader();
watch();

// For the end-to-end tests (and the curious, in the console).
window.app = { sync, events, signIn, signOut, deviceId };
document.body.dataset.ready = 'true';
