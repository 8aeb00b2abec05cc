// The client's identity switches (guest -> user in signIn(), back in signOut()) against a simulated /v1/batch
// (fake-server.ts) and sockets that never open: no guest write is lost when the guest database is deleted (another
// guest tab writing during the sign-in, a resumed upgrade overtaken by a sign-out), and a signOut() during a
// signIn() leaves a guest with no user session running.
import 'fake-indexeddb/auto';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Dexie } from 'dexie';
import { SignInError, createSyncClient } from '../../src/client.js';
import { DEFAULT_TABLES, SyncDatabase, guestDbName, userDbName } from '../../src/database.js';
import type { SyncClientOptions } from '../../src/types.js';
import { DeadSocket, FakeBatchServer } from './fake-server.js';

function jwt(sub: string): string {
  const now = Math.floor(Date.now() / 1000);
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub, iat: now, exp: now + 3600 })}.sig`;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let devices = 0;
/** A fresh device (its own databases) whose getToken() returns `token()`. */
function device(server: FakeBatchServer, token: () => string | null, extra: Partial<SyncClientOptions> = {}): SyncClientOptions {
  DeadSocket.all = [];
  const deviceId = `11111111-2222-4333-8444-${String(++devices).padStart(12, '0')}`;
  return {
    url: 'http://sync.test',
    deviceId,
    getToken: async () => token(),
    fetch: server.fetch,
    WebSocket: DeadSocket as unknown as typeof WebSocket,
    ...extra,
  };
}

const titles = (server: FakeBatchServer) => [...server.table('works').values()].map((r) => r['title']).sort();

async function until(what: string, f: () => boolean | Promise<boolean>, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > end) throw new Error(`timed out: ${what}`);
    await sleep(10);
  }
}

test('two guest tabs: a write in the second while the first signs in goes to the user, not away with the guest database', async () => {
  const server = new FakeBatchServer();
  let token: string | null = null;
  const opts = device(server, () => token, { signInCatchUpMs: 300 });
  const tab1 = await createSyncClient(opts);
  const tab2 = await createSyncClient(opts);
  await tab1.write({ table: 'works', kind: 'insert', row: { title: 'A (tab 1)' } });
  token = jwt('user-1');
  const signingIn = tab1.signIn();
  await sleep(100); // tab 1 has sent the guest's work and waits for the user's database to catch up
  await tab2.write({ table: 'works', kind: 'insert', row: { title: 'B (tab 2)' } });
  await signingIn;
  assert.equal(tab1.userId, 'user-1');
  assert.deepEqual(titles(server), ['A (tab 1)', 'B (tab 2)'], 'the second tab\'s write was sent before the deletion');
  assert.equal(await Dexie.exists(guestDbName(opts.deviceId)), false, 'the guest database is deleted');
  await tab1.close();
  await tab2.close();
});

test('a guest tab whose write meets a sealed guest database continues as the user its work went to, and writes there', async () => {
  const server = new FakeBatchServer();
  let token: string | null = null;
  const opts = device(server, () => token);
  const tab = await createSyncClient(opts);
  await tab.write({ table: 'works', kind: 'insert', row: { title: 'guest work' } });
  // Another tab's sign-in as user-2 has sent the guest's work and sealed the guest database (guest.ts).
  const other = new SyncDatabase(guestDbName(opts.deviceId), DEFAULT_TABLES);
  await other.state.put({ key: 'sealed', userId: 'user-2', sealedAt: Date.now() });
  other.close();
  token = jwt('user-2');
  const [w] = await tab.write({ table: 'works', kind: 'insert', row: { title: 'after the seal' } });
  assert.equal(tab.userId, 'user-2');
  assert.equal(tab.db.name, userDbName('user-2', opts.deviceId));
  assert.equal((await tab.row('works', w!.rowId))?.['title'], 'after the seal');
  await until('sent as user-2', () => titles(server).includes('after the seal'));
  await tab.close();
});

test('signOut() during a resumed upgrade: the new guest\'s writes stay in the guest database, and are not sent as the old user', async () => {
  const server = new FakeBatchServer();
  let token: string | null = null;
  // Every /v1/batch answer takes 200 ms.
  const slow = (async (url: string | URL | Request, init?: RequestInit) => {
    await sleep(200);
    return server.fetch(url, init);
  }) as typeof fetch;
  const opts = device(server, () => token, { fetch: slow });
  const guest = await createSyncClient(opts);
  await guest.write({ table: 'works', kind: 'insert', row: { title: 'old guest' } });
  await guest.close();
  // The next start is signed in: it finds the guest database and finishes the upgrade in the background.
  token = jwt('user-1');
  const c = await createSyncClient(opts);
  await sleep(50);
  token = null;
  await c.signOut();
  assert.equal(c.userId, null);
  await c.write({ table: 'works', kind: 'insert', row: { title: 'new guest' } });
  await sleep(400); // whatever the resumed upgrade would still do
  assert.ok(await Dexie.exists(guestDbName(opts.deviceId)), 'the guest database is kept');
  assert.equal(await c.pendingCount(), 1, 'the new guest\'s write is still queued');
  assert.ok((await c.rows('works')).some((r) => r['title'] === 'new guest'));
  assert.ok(!titles(server).includes('new guest'), 'never sent as the user who signed out');
  await c.close();
});

test('signOut() while signIn() waits for the user\'s database to catch up: the sign-in is cancelled, the client stays a guest', async () => {
  const server = new FakeBatchServer();
  let token: string | null = null;
  const opts = device(server, () => token, { signInCatchUpMs: 1000 });
  const c = await createSyncClient(opts);
  await c.write({ table: 'works', kind: 'insert', row: { title: 'guest work' } });
  token = jwt('user-A');
  const outcome = c.signIn().then(() => 'resolved', (e: unknown) => e);
  await sleep(150); // the guest's work is sent; the user's database is catching up
  token = null;
  await c.signOut();
  assert.equal(c.userId, null);
  assert.equal(c.db.name, guestDbName(opts.deviceId));
  const err = await outcome;
  assert.ok(err instanceof SignInError && err.code === 'cancelled', `signIn() settled with ${String(err)}`);
  assert.equal(c.userId, null, 'still a guest after signIn() settled');
  assert.equal(c.state, 'guest');
  assert.ok(DeadSocket.all.length > 0 && DeadSocket.all.every((s) => s.readyState === 3), 'no user session runs');
  await c.write({ table: 'works', kind: 'insert', row: { title: 'written after the sign-out' } });
  assert.equal(c.db.name, guestDbName(opts.deviceId));
  assert.equal(await c.pendingCount(), 1, 'queued as a guest (the first write was sent by the cancelled sign-in)');
  await c.close();
});

test('signOut() racing a signIn() as another user: the switches run one after the other and no user session is left running', async () => {
  const server = new FakeBatchServer();
  let token: string | null = jwt('user-A');
  const opts = device(server, () => token);
  const c = await createSyncClient(opts);
  assert.equal(c.userId, 'user-A');
  token = jwt('user-B');
  const outcome = c.signIn().then(() => 'resolved', (e: unknown) => e);
  token = null;
  await c.signOut();
  assert.equal(c.userId, null);
  const settled = await Promise.race([outcome, sleep(3000).then(() => 'still running')]);
  assert.notEqual(settled, 'still running', 'signIn() has settled');
  await sleep(50);
  assert.equal(c.userId, null);
  assert.equal(c.db.name, guestDbName(opts.deviceId));
  const open = DeadSocket.all.filter((s) => s.readyState !== 3).map((s) => s.url);
  assert.deepEqual(open, [], 'every user session\'s stream is stopped');
  await c.close();
});

test('signIn() right after signOut() (an "other account" button) starts a new sign-in instead of returning the cancelled one', async () => {
  const server = new FakeBatchServer();
  let token: string | null = jwt('user-A');
  const opts = device(server, () => token, { signInCatchUpMs: 200 });
  const c = await createSyncClient(opts);
  assert.equal(c.userId, 'user-A');
  token = jwt('user-B');
  const first = c.signIn().then(() => 'resolved', (e: unknown) => e);
  const out = c.signOut();
  const second = c.signIn();
  await out;
  await second;
  assert.equal(c.userId, 'user-B', 'the second signIn() signed in');
  const settled = await first;
  assert.ok(settled === 'resolved' || (settled instanceof SignInError && settled.code === 'cancelled'), String(settled));
  await c.close();
});

test('signOut() does not wait for a getToken() that never settles', async () => {
  const server = new FakeBatchServer();
  let hang = false;
  const opts = device(server, () => null, {});
  const c = await createSyncClient({
    ...opts,
    getToken: async () => (hang ? new Promise<string | null>(() => {}) : null),
  });
  hang = true;
  const outcome = c.signIn().then(() => 'resolved', (e: unknown) => e);
  await sleep(20);
  const done = await Promise.race([c.signOut().then(() => 'signed out'), sleep(2000).then(() => 'still waiting')]);
  assert.equal(done, 'signed out');
  const err = await outcome;
  assert.ok(err instanceof SignInError && err.code === 'cancelled', String(err));
  assert.equal(c.userId, null);
  await c.close();
});

test('a guest tab whose guest database another tab\'s sign-in deleted continues as that user: no new, empty guest database, nothing left unsent', async () => {
  const server = new FakeBatchServer();
  let token: string | null = null;
  const opts = device(server, () => token, { signInCatchUpMs: 100 });
  const tab1 = await createSyncClient(opts);
  const tab2 = await createSyncClient(opts);
  const databases: Array<string | null> = [];
  tab2.on('database', (d) => databases.push(d.userId));
  try {
    await tab1.write({ table: 'works', kind: 'insert', row: { title: 'A (tab 1)' } });
    await tab2.write({ table: 'works', kind: 'insert', row: { title: 'B (tab 2)' } });
    token = jwt('user-1');
    await tab1.signIn();
    assert.equal(await Dexie.exists(guestDbName(opts.deviceId)), false, 'the guest database is deleted');
    // Tab 2 writes on, as it did before (its app never called signIn()).
    const [w] = await tab2.write({ table: 'works', kind: 'insert', row: { title: 'C (tab 2, after the sign-in)' } });
    assert.equal(tab2.userId, 'user-1', 'tab 2 continues as the user');
    assert.deepEqual(databases, ['user-1']);
    assert.equal(tab2.db.name, userDbName('user-1', opts.deviceId));
    assert.equal((await tab2.row('works', w!.rowId))?.['title'], 'C (tab 2, after the sign-in)');
    assert.equal(await Dexie.exists(guestDbName(opts.deviceId)), false, 'no new guest database');
    await until('sent', async () => titles(server).length === 3);
    assert.deepEqual(titles(server), ['A (tab 1)', 'B (tab 2)', 'C (tab 2, after the sign-in)']);
    assert.equal(new Set(server.applied).size, server.applied.length, 'nothing applied twice');
  } finally {
    await tab1.close();
    await tab2.close();
  }
});
