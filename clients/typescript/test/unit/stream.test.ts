// The live connection's state machine against a scripted WebSocket: subscribe with stored offsets, resume after a
// server restart (1001), reconnect at once with a new token after 4001, stop on 4003, refresh_token before expiry,
// nothing more applied from a socket once a frame of it failed, backoff for subscription errors and for an app that
// hands back the same token.
import 'fake-indexeddb/auto';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Applier, type ApplierEvents } from '../../src/applier.js';
import { SyncDatabase } from '../../src/database.js';
import { Emitter, SerialQueue } from '../../src/events.js';
import { LiveStream, type StreamEvents, type StreamStatus } from '../../src/stream.js';
import { TokenSource } from '../../src/token.js';

class FakeSocket {
  static all: FakeSocket[] = [];
  readonly OPEN = 1;
  readyState = 0;
  sent: Array<Record<string, unknown>> = [];
  onopen: (() => void) | null = null;
  onmessage: ((ev: { data: string }) => void) | null = null;
  onclose: ((ev: { code: number }) => void) | null = null;
  onerror: (() => void) | null = null;
  constructor(readonly url: string) {
    FakeSocket.all.push(this);
  }
  send(data: string): void {
    this.sent.push(JSON.parse(data) as Record<string, unknown>);
  }
  close(code = 1000): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code }));
  }
  // server side
  open(): void {
    this.readyState = 1;
    this.onopen?.();
  }
  push(msg: unknown): void {
    this.onmessage?.({ data: JSON.stringify(msg) });
  }
  drop(code: number): void {
    this.readyState = 3;
    this.onclose?.({ code });
  }
}

function jwt(sub: string, ttlSeconds: number): string {
  const now = Math.floor(Date.now() / 1000);
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub, iat: now, exp: now + ttlSeconds, n: Math.random() })}.sig`;
}

const until = async (what: string, f: () => boolean, ms = 5000): Promise<void> => {
  const end = Date.now() + ms;
  while (!f()) {
    if (Date.now() > end) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
};

let n = 0;
function setup(opts: { sub?: string; ttl?: number; tokenSub?: () => string; getToken?: () => string; healthyAfterMs?: number } = {}) {
  FakeSocket.all = [];
  const db = new SyncDatabase(`stream-${++n}`, ['works', 'annotations']);
  const applier = new Applier(db, new SerialQueue(), new Emitter<ApplierEvents>());
  let tokenCalls = 0;
  const tokens = new TokenSource(async () => {
    tokenCalls++;
    return opts.getToken?.() ?? jwt(opts.tokenSub?.() ?? 'user-1', opts.ttl ?? 3600);
  });
  const events = new Emitter<StreamEvents>();
  const statuses: StreamStatus[] = [];
  const stopped: string[] = [];
  events.on('status', (s) => statuses.push(s));
  events.on('stopped', (s) => stopped.push(s.reason));
  const stream = new LiveStream({
    url: 'http://sync.test',
    tokens,
    applier,
    userId: opts.sub ?? 'user-1',
    events,
    WebSocket: FakeSocket as unknown as typeof WebSocket,
    ...(opts.healthyAfterMs !== undefined ? { healthyAfterMs: opts.healthyAfterMs } : {}),
  });
  return { db, stream, statuses, stopped, calls: () => tokenCalls, events };
}

function subscribes(ws: FakeSocket) {
  return ws.sent.filter((m) => m['type'] === 'subscribe');
}

/** Opens the first socket and brings both tables live with offset `1-01` (works with the given rows). */
async function liveSocket(t: ReturnType<typeof setup>, works: Array<{ id: string }> = []): Promise<FakeSocket> {
  t.stream.start();
  await until('socket', () => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0]!;
  ws.open();
  await until('two subscribes', () => subscribes(ws).length === 2);
  ws.push({ type: 'snapshot', id: 'works', rows: works });
  ws.push({ type: 'up_to_date', id: 'works', offset: '1-01' });
  ws.push({ type: 'snapshot', id: 'annotations', rows: [] });
  ws.push({ type: 'up_to_date', id: 'annotations', offset: '1-01' });
  await until('live', () => t.statuses.at(-1) === 'live');
  return ws;
}

async function offsetOf(db: SyncDatabase, table: string): Promise<string | null | undefined> {
  const s = await db.state.get(`sub:${table}`);
  return s && 'offset' in s ? s.offset : undefined;
}

/** Makes storing a row with this id fail, as a full disk (quota) would. */
function failOn(db: SyncDatabase, table: string, id: string): void {
  db.table(table).hook('creating', (_key, row: { id: string }) => {
    if (row.id === id) throw new Error('QuotaExceededError (simulated)');
  });
}

const insert = (table: string, id: string) => ({ id: table, table, op: 'insert', row: { id, title: id } });

test('subscribes every table, goes live, and resumes from stored offsets after a server restart (1001)', async () => {
  const t = setup();
  t.stream.start();
  await until('socket', () => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0]!;
  assert.match(ws.url, /^ws:\/\/sync\.test\/v1\/stream\?access_token=/);
  ws.open();
  await until('two subscribes', () => subscribes(ws).length === 2);
  assert.deepEqual(subscribes(ws).map((m) => [m['id'], m['offset']]), [['works', undefined], ['annotations', undefined]]);
  for (const id of ['works', 'annotations']) {
    ws.push({ type: 'snapshot', id, rows: [] });
    ws.push({ type: 'up_to_date', id, offset: `1-0${id.length}` });
  }
  await until('live', () => t.statuses.at(-1) === 'live');
  ws.push({ type: 'txn', xid: '9', lsn: '0/1', offset: '1-20', changes: [{ id: 'works', table: 'works', op: 'insert', row: { id: 'w', title: 'T' } }] });
  ws.push({ type: 'up_to_date', id: 'works', offset: '1-21' }); // the server's final positions at shutdown
  await until('applied', () => t.statuses.length > 0);
  await new Promise((r) => setTimeout(r, 20));
  ws.drop(1001);
  await until('reconnected', () => FakeSocket.all.length === 2, 3000);
  const ws2 = FakeSocket.all[1]!;
  ws2.open();
  await until('resubscribed', () => subscribes(ws2).length === 2);
  assert.deepEqual(subscribes(ws2).map((m) => [m['id'], m['offset']]), [['works', '1-21'], ['annotations', '1-011']]);
  assert.equal((await t.db.synced('works').get('w'))?.['title'], 'T');
  await t.stream.stop();
  t.db.close();
});

test('4001: a new token from getToken() and an immediate reconnect', async () => {
  const t = setup();
  t.stream.start();
  await until('socket', () => FakeSocket.all.length === 1);
  FakeSocket.all[0]!.open();
  const before = t.calls();
  const started = Date.now();
  FakeSocket.all[0]!.drop(4001);
  await until('reconnected', () => FakeSocket.all.length === 2);
  assert.ok(Date.now() - started < 200, 'no backoff');
  assert.equal(t.calls(), before + 1, 'asked the app for a new token');
  assert.notEqual(FakeSocket.all[0]!.url, FakeSocket.all[1]!.url);
  await t.stream.stop();
  t.db.close();
});

test('4003 (a token of another user) stops for good', async () => {
  const t = setup();
  t.stream.start();
  await until('socket', () => FakeSocket.all.length === 1);
  FakeSocket.all[0]!.open();
  FakeSocket.all[0]!.drop(4003);
  await until('stopped', () => t.stopped.length === 1);
  assert.deepEqual(t.stopped, ['other_user']);
  await new Promise((r) => setTimeout(r, 600));
  assert.equal(FakeSocket.all.length, 1, 'no reconnect');
  await t.stream.stop();
  t.db.close();
});

test('a token of another user is never used for this database', async () => {
  const t = setup({ tokenSub: () => 'someone-else' });
  t.stream.start();
  await until('stopped', () => t.stopped.length === 1);
  assert.deepEqual(t.stopped, ['other_user']);
  assert.equal(FakeSocket.all.length, 0);
  await t.stream.stop();
  t.db.close();
});

test('refresh_token is sent on the open socket before the token expires', async () => {
  const t = setup({ ttl: 2 }); // refresh after 3/4 of 2 s
  t.stream.start();
  await until('socket', () => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0]!;
  ws.open();
  await until('refresh_token', () => ws.sent.some((m) => m['type'] === 'refresh_token'), 4000);
  const refresh = ws.sent.find((m) => m['type'] === 'refresh_token')!;
  assert.ok(typeof refresh['access_token'] === 'string' && !ws.url.endsWith(refresh['access_token'] as string));
  ws.push({ type: 'token_refreshed', expires_at: Math.floor(Date.now() / 1000) + 2 });
  // The next refresh is scheduled from the new token.
  await until('second refresh_token', () => ws.sent.filter((m) => m['type'] === 'refresh_token').length === 2, 4000);
  assert.equal(FakeSocket.all.length, 1, 'same socket throughout');
  await t.stream.stop();
  t.db.close();
});

test('a failure before open asks for a new token and retries with backoff', async () => {
  const t = setup();
  t.stream.start();
  await until('socket', () => FakeSocket.all.length === 1);
  const before = t.calls();
  FakeSocket.all[0]!.drop(1006);
  await until('retried', () => FakeSocket.all.length === 2, 3000);
  assert.equal(t.calls(), before + 1);
  await t.stream.stop();
  t.db.close();
});

test('1013 (server on standby): back off, reconnect and resume from the stored offsets, like 1001', async () => {
  const t = setup();
  const errors: string[] = [];
  t.events.on('error', (e) => errors.push(e.code));
  t.stream.start();
  await until('socket', () => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0]!;
  ws.open();
  await until('two subscribes', () => subscribes(ws).length === 2);
  for (const id of ['works', 'annotations']) {
    ws.push({ type: 'snapshot', id, rows: [] });
    ws.push({ type: 'up_to_date', id, offset: `1-0a${id.length}` });
  }
  await until('live', () => t.statuses.at(-1) === 'live');
  const before = t.calls();
  const closedAt = Date.now();
  ws.drop(1013);
  await until('reconnected', () => FakeSocket.all.length === 2, 3000);
  assert.ok(Date.now() - closedAt >= 100, 'after a backoff, not at once');
  assert.equal(t.calls(), before, 'the token was fine: not refreshed');
  assert.ok(errors.includes('server_standby'));
  const ws2 = FakeSocket.all[1]!;
  ws2.open();
  await until('resubscribed', () => subscribes(ws2).length === 2);
  assert.deepEqual(subscribes(ws2).map((m) => [m['id'], m['offset']]), [['works', '1-0a5'], ['annotations', '1-0a11']]);
  await t.stream.stop();
  t.db.close();
});

test('a transaction in parts through the socket: applied part by part, live, offset only from the last part', async () => {
  const t = setup();
  t.stream.start();
  await until('socket', () => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0]!;
  ws.open();
  await until('two subscribes', () => subscribes(ws).length === 2);
  for (const id of ['works', 'annotations']) {
    ws.push({ type: 'snapshot', id, rows: [] });
    ws.push({ type: 'up_to_date', id, offset: '1-01' });
  }
  await until('live', () => t.statuses.at(-1) === 'live');
  const change = (i: number) => ({ id: 'works', table: 'works', op: 'insert', row: { id: `w${i}`, title: `T${i}` } });
  ws.push({ type: 'txn', xid: '50', lsn: '0/5', part: 0, more: true, changes: [change(1), change(2)] });
  ws.push({ type: 'txn', xid: '50', lsn: '0/5', part: 1, more: true, changes: [change(3)] });
  const stored = async (): Promise<string | null | undefined> => {
    const s = await t.db.state.get('sub:works');
    return s && 'offset' in s ? s.offset : undefined;
  };
  const settle = async (what: string, f: () => Promise<boolean>): Promise<void> => {
    const end = Date.now() + 2000;
    while (!(await f())) {
      if (Date.now() > end) throw new Error(`timed out: ${what}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  };
  await settle('two parts applied', async () => (await t.db.synced('works').count()) === 3);
  assert.deepEqual(await t.db.state.get('sub:works'), { key: 'sub:works', offset: '1-01' });
  ws.push({ type: 'txn', xid: '50', lsn: '0/5', part: 2, offset: '1-09', changes: [change(4)] });
  await settle('last part applied', async () => (await stored()) === '1-09');
  assert.deepEqual(await t.db.state.get('sub:works'), { key: 'sub:works', offset: '1-09' });
  assert.equal(await t.db.synced('works').count(), 4);
  assert.equal(FakeSocket.all.length, 1, 'no reconnect');
  await t.stream.stop();
  t.db.close();
});

test('a txn frame that fails to apply: the frames already received behind it are not applied, and the next socket resumes from before it', async () => {
  const t = setup();
  const errors: string[] = [];
  t.events.on('error', (e) => errors.push(e.code));
  const ws = await liveSocket(t);
  failOn(t.db, 'works', 'bad');
  // Both frames arrive before the first is applied.
  ws.push({ type: 'txn', xid: '10', lsn: '0/1', offset: '1-10', changes: [insert('works', 'bad')] });
  ws.push({ type: 'txn', xid: '11', lsn: '0/2', offset: '1-11', changes: [insert('works', 'w11'), insert('annotations', 'n11')] });
  await until('reconnected', () => FakeSocket.all.length === 2, 3000);
  assert.ok(errors.includes('apply_failed'));
  assert.equal(await t.db.synced('works').get('w11'), undefined, 'the frame behind the failed one is not applied');
  assert.equal(await t.db.synced('annotations').get('n11'), undefined);
  assert.equal(await offsetOf(t.db, 'works'), '1-01', 'no offset past the failed frame');
  assert.equal(await offsetOf(t.db, 'annotations'), '1-01');
  const ws2 = FakeSocket.all[1]!;
  ws2.open();
  await until('resubscribed', () => subscribes(ws2).length === 2);
  assert.deepEqual(subscribes(ws2).map((m) => [m['id'], m['offset']]), [['works', '1-01'], ['annotations', '1-01']]);
  await t.stream.stop();
  t.db.close();
});

test('a snapshot frame that fails to apply: the up_to_date behind it deletes no row as stale and stores no offset', async () => {
  const t = setup();
  await t.db.synced('works').bulkPut([{ id: 'keep', title: 'stored before' }]);
  failOn(t.db, 'works', 'bad');
  t.stream.start();
  await until('socket', () => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0]!;
  ws.open();
  await until('two subscribes', () => subscribes(ws).length === 2);
  ws.push({ type: 'snapshot', id: 'works', rows: [{ id: 'keep', title: 'stored before' }, { id: 'bad' }] });
  ws.push({ type: 'snapshot', id: 'works', rows: [{ id: 'w2' }] });
  ws.push({ type: 'up_to_date', id: 'works', offset: '1-05' });
  await until('reconnected', () => FakeSocket.all.length === 2, 3000);
  assert.ok(await t.db.synced('works').get('keep'), 'a row of the failed frame is not deleted as stale');
  assert.equal(await t.db.synced('works').get('w2'), undefined);
  assert.equal(await offsetOf(t.db, 'works'), undefined, 'no offset: the next socket takes the snapshot again');
  await t.stream.stop();
  t.db.close();
});

test('a frame of another transaction before the last part (frames lost): nothing more from that socket is applied', async () => {
  const t = setup();
  const ws = await liveSocket(t);
  ws.push({ type: 'must_refetch', id: 'annotations', reason: 'truncated' });
  ws.push({ type: 'snapshot', id: 'annotations', rows: [] });
  ws.push({ type: 'txn', xid: '900', lsn: '0/9', part: 0, more: true, changes: [insert('works', 'w900')] });
  // Against the protocol: a whole transaction and an up_to_date between the parts of another.
  ws.push({ type: 'txn', xid: '880', lsn: '0/8', offset: '1-20', changes: [insert('annotations', 'n880')] });
  ws.push({ type: 'up_to_date', id: 'annotations', offset: '1-30' });
  await until('reconnected', () => FakeSocket.all.length === 2, 3000);
  assert.equal(await t.db.synced('annotations').get('n880'), undefined);
  assert.equal(await offsetOf(t.db, 'annotations'), null, 'the refetch is still to do: no offset stored');
  assert.equal(await offsetOf(t.db, 'works'), '1-01');
  await t.stream.stop();
  t.db.close();
});

test('snapshot frames and control messages of another subscription between the parts of a transaction leave it whole', async () => {
  const t = setup();
  const errors: string[] = [];
  t.events.on('error', (e) => errors.push(e.code));
  const ws = await liveSocket(t);
  ws.push({ type: 'txn', xid: '60', lsn: '0/6', part: 0, more: true, changes: [insert('works', 'w1')] });
  ws.push({ type: 'must_refetch', id: 'annotations', reason: 'truncated' });
  ws.push({ type: 'snapshot', id: 'annotations', rows: [{ id: 'n1' }] });
  ws.push({ type: 'pong' });
  ws.push({ type: 'txn', xid: '60', lsn: '0/6', part: 1, more: true, changes: [insert('works', 'w2')] });
  ws.push({ type: 'snapshot', id: 'annotations', rows: [{ id: 'n2' }] });
  ws.push({ type: 'txn', xid: '60', lsn: '0/6', part: 2, offset: '1-60', changes: [insert('works', 'w3')] });
  ws.push({ type: 'up_to_date', id: 'annotations', offset: '1-61' });
  const settle = Date.now() + 2000;
  while ((await offsetOf(t.db, 'annotations')) !== '1-61' && Date.now() < settle) await new Promise((r) => setTimeout(r, 5));
  assert.equal(await offsetOf(t.db, 'works'), '1-60');
  assert.equal(await offsetOf(t.db, 'annotations'), '1-61');
  assert.equal(await t.db.synced('works').count(), 3);
  assert.deepEqual((await t.db.synced('annotations').toArray()).map((r) => r.id).sort(), ['n1', 'n2']);
  assert.equal(FakeSocket.all.length, 1, 'no reconnect');
  assert.deepEqual(errors, []);
  await t.stream.stop();
  t.db.close();
});

test('getToken() handing back the same near-expiry token: refresh_token is retried with a growing pause, not in a loop', async () => {
  const now = Math.floor(Date.now() / 1000);
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  // Valid for 55 s more, issued an hour ago: due for refresh (a minute before exp) from the start. The app's own
  // cache (with a smaller margin) keeps returning it.
  const token = `${b64({ alg: 'HS256' })}.${b64({ sub: 'user-1', iat: now - 3545, exp: now + 55 })}.sig`;
  const t = setup({ getToken: () => token });
  t.stream.start();
  await until('socket', () => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0]!;
  const send = ws.send.bind(ws);
  ws.send = (data: string): void => {
    send(data);
    if ((JSON.parse(data) as { type: string }).type === 'refresh_token') {
      setTimeout(() => ws.push({ type: 'token_refreshed', expires_at: now + 55 }), 1);
    }
  };
  ws.open();
  await new Promise((r) => setTimeout(r, 1500));
  const refreshes = ws.sent.filter((m) => m['type'] === 'refresh_token').length;
  assert.ok(refreshes >= 1, 'the token is due: it is refreshed');
  assert.ok(t.calls() <= 4, `getToken() called ${t.calls()} times in 1.5 s`);
  assert.ok(refreshes <= 3, `${refreshes} refresh_token messages in 1.5 s`);
  await t.stream.stop();
  t.db.close();
});

test('a subscription error that is retried (database_error) backs off further while it goes on', async () => {
  const random = Math.random;
  Math.random = () => 0; // the shortest delay of each backoff step
  const t = setup();
  try {
    t.stream.start();
    await until('socket', () => FakeSocket.all.length === 1);
    const ws = FakeSocket.all[0]!;
    ws.open();
    await until('two subscribes', () => subscribes(ws).length === 2);
    const worksSubscribes = () => subscribes(ws).filter((m) => m['id'] === 'works').length;
    ws.push({ type: 'error', id: 'works', code: 'database_error', message: 'the snapshot query failed' });
    let at = Date.now();
    await until('first resubscribe', () => worksSubscribes() === 2, 3000);
    const first = Date.now() - at;
    ws.push({ type: 'error', id: 'works', code: 'database_error', message: 'the snapshot query failed' });
    at = Date.now();
    await until('second resubscribe', () => worksSubscribes() === 3, 5000);
    const second = Date.now() - at;
    assert.ok(first >= 900, `first retry after ${first} ms`);
    assert.ok(second >= 1900, `second retry after ${second} ms: longer than the first`);
  } finally {
    Math.random = random;
    await t.stream.stop();
    t.db.close();
  }
});

test('a frame that fails on every new socket (a full disk): the reconnects back off further each time, the open does not reset it', async () => {
  const random = Math.random;
  Math.random = () => 0; // the shortest delay of each backoff step
  const t = setup();
  const errors: string[] = [];
  t.events.on('error', (e) => errors.push(e.code));
  failOn(t.db, 'works', 'bad');
  // The server: every socket opens at once and, once subscribed, sends the frame the local database cannot store.
  const opened = new Set<FakeSocket>();
  const pushed = new Set<FakeSocket>();
  const server = setInterval(() => {
    for (const ws of FakeSocket.all) {
      if (!opened.has(ws)) {
        opened.add(ws);
        ws.open();
      } else if (!pushed.has(ws) && subscribes(ws).length === 2) {
        pushed.add(ws);
        ws.push({ type: 'snapshot', id: 'works', rows: [{ id: 'bad' }] });
      }
    }
  }, 2);
  try {
    t.stream.start();
    await new Promise((r) => setTimeout(r, 3000));
    const n = FakeSocket.all.length;
    // Pauses of 250, 500, 1000, 2000 ms: 4 sockets in 3 s. Reset at every open, it was one every 250 ms (about 12).
    assert.ok(n >= 3, `${n} sockets in 3 s`);
    assert.ok(n <= 5, `${n} sockets in 3 s: the backoff did not grow`);
    assert.ok(errors.filter((c) => c === 'apply_failed').length >= 3);
  } finally {
    clearInterval(server);
    Math.random = random;
    await t.stream.stop();
    t.db.close();
  }
});

test('a socket that stayed open and healthy for healthyAfterMs starts the backoff over', async () => {
  const random = Math.random;
  Math.random = () => 0;
  const t = setup({ healthyAfterMs: 100 });
  try {
    t.stream.start();
    // Two failures before open: the backoff grows (250 ms, then 500 ms).
    await until('socket 1', () => FakeSocket.all.length === 1);
    FakeSocket.all[0]!.drop(1006);
    await until('socket 2', () => FakeSocket.all.length === 2, 2000);
    FakeSocket.all[1]!.drop(1006);
    await until('socket 3', () => FakeSocket.all.length === 3, 2000);
    const ws = FakeSocket.all[2]!;
    ws.open();
    await until('two subscribes', () => subscribes(ws).length === 2);
    await new Promise((r) => setTimeout(r, 200)); // healthy for longer than healthyAfterMs
    const at = Date.now();
    ws.drop(1001);
    await until('socket 4', () => FakeSocket.all.length === 4, 3000);
    const pause = Date.now() - at;
    assert.ok(pause < 900, `reconnected after ${pause} ms: the backoff should have started over (250 ms)`);
  } finally {
    Math.random = random;
    await t.stream.stop();
    t.db.close();
  }
});
