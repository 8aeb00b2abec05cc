// The live connection's state machine against a scripted WebSocket: subscribe with stored offsets, resume after a
// server restart (1001), reconnect at once with a new token after 4001, stop on 4003, refresh_token before expiry.
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
function setup(opts: { sub?: string; ttl?: number; tokenSub?: () => string } = {}) {
  FakeSocket.all = [];
  const db = new SyncDatabase(`stream-${++n}`, ['works', 'annotations']);
  const applier = new Applier(db, new SerialQueue(), new Emitter<ApplierEvents>());
  let tokenCalls = 0;
  const tokens = new TokenSource(async () => {
    tokenCalls++;
    return jwt(opts.tokenSub?.() ?? 'user-1', opts.ttl ?? 3600);
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
  });
  return { db, stream, statuses, stopped, calls: () => tokenCalls, events };
}

function subscribes(ws: FakeSocket) {
  return ws.sent.filter((m) => m['type'] === 'subscribe');
}

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
