// Several tabs of one device (two clients on one database, in one process): a fake Web Locks (one leader per
// database) and Node's BroadcastChannel between them. The leader's stream stopping (getToken() returned null) is
// heard by the followers, a follower's signIn() starts it again; `rejected` is heard in every tab.
import 'fake-indexeddb/auto';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createSyncClient, type SyncClient } from '../../src/client.js';
import type { SyncClientOptions } from '../../src/types.js';
import { FakeBatchServer } from './fake-server.js';

/** Web Locks as browsers grant them: one holder per name, the others wait in request order. */
class FakeLocks {
  private readonly queues = new Map<string, Array<() => void>>();
  private readonly held = new Set<string>();
  request<T>(name: string, a: unknown, b?: unknown): Promise<T> {
    const cb = (typeof a === 'function' ? a : b) as () => Promise<T> | T;
    const signal = (typeof a === 'function' ? undefined : (a as { signal?: AbortSignal })?.signal) ?? undefined;
    return new Promise<T>((resolve, reject) => {
      const grant = (): void => {
        signal?.removeEventListener('abort', onAbort);
        this.held.add(name);
        Promise.resolve()
          .then(cb)
          .then(resolve, reject)
          .finally(() => {
            this.held.delete(name);
            this.queues.get(name)?.shift()?.();
          });
      };
      const onAbort = (): void => {
        const q = this.queues.get(name) ?? [];
        const i = q.indexOf(grant);
        if (i >= 0) q.splice(i, 1);
        reject(new DOMException('aborted', 'AbortError'));
      };
      if (signal?.aborted) return onAbort();
      if (!this.held.has(name)) return grant();
      signal?.addEventListener('abort', onAbort, { once: true });
      const q = this.queues.get(name) ?? [];
      q.push(grant);
      this.queues.set(name, q);
    });
  }
}
Object.defineProperty(globalThis, 'navigator', { value: { locks: new FakeLocks(), onLine: true }, configurable: true });

/** A socket that fails before it opens (every time): the stream backs off and asks getToken() again. */
class RefusedSocket {
  static count = 0;
  readonly OPEN = 1;
  readyState = 0;
  onopen: (() => void) | null = null;
  onmessage: ((ev: { data: string }) => void) | null = null;
  onclose: ((ev: { code: number }) => void) | null = null;
  onerror: (() => void) | null = null;
  constructor(readonly url: string) {
    RefusedSocket.count++;
    setTimeout(() => this.close(1006), 5);
  }
  send(): void {}
  close(code = 1000): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code }));
  }
}

function jwt(sub: string): string {
  const now = Math.floor(Date.now() / 1000);
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub, iat: now, exp: now + 3600 })}.sig`;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(what: string, f: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > end) throw new Error(`timed out: ${what}`);
    await sleep(10);
  }
}

let devices = 0;
function device(server: FakeBatchServer, token: () => string | null, extra: Partial<SyncClientOptions> = {}): SyncClientOptions {
  const deviceId = `22222222-3333-4444-8555-${String(++devices).padStart(12, '0')}`;
  return {
    url: 'http://sync.test',
    deviceId,
    getToken: async () => token(),
    fetch: server.fetch,
    WebSocket: RefusedSocket as unknown as typeof WebSocket,
    ...extra,
  };
}

function record(c: SyncClient) {
  const seen = { signedOut: 0, states: [] as string[] };
  c.on('signedOut', () => seen.signedOut++);
  c.on('state', (s) => seen.states.push(s));
  return seen;
}

test('getToken() returns null: the follower tab goes offline and hears signedOut too; its signIn() starts the stream again', async () => {
  const server = new FakeBatchServer();
  let token: string | null = jwt('user-1');
  const opts = device(server, () => token);
  const leader = await createSyncClient(opts);
  const follower = await createSyncClient(opts);
  const l = record(leader);
  const f = record(follower);
  try {
  await until('follower mirrors the leader', () => follower.state === 'connecting');
  token = null; // the session ends: the leader's stream stops at its next getToken()
  await until('leader signed out', () => l.signedOut === 1 && leader.state === 'offline');
  await until('follower signed out', () => f.signedOut === 1 && follower.state === 'offline');
  await sleep(200);
  const sockets = RefusedSocket.count;
  token = jwt('user-1');
  await follower.signIn();
  await until('the stream runs again', () => RefusedSocket.count > sockets && leader.state === 'connecting' && follower.state === 'connecting');
  assert.equal(l.signedOut, 1);
  assert.equal(f.signedOut, 1);
  } finally {
    await follower.close();
    await leader.close();
  }
});

test('a token of another user (the stream stops for good): the follower tab goes offline with the leader', async () => {
  const server = new FakeBatchServer();
  let token: string | null = jwt('user-1');
  const opts = device(server, () => token);
  const leader = await createSyncClient(opts);
  const follower = await createSyncClient(opts);
  const f = record(follower);
  try {
  await until('follower mirrors the leader', () => follower.state === 'connecting');
  token = jwt('user-2');
  await until('leader stopped', () => leader.state === 'offline');
  await until('follower stopped', () => follower.state === 'offline');
  assert.equal(f.signedOut, 0, 'not signed out: another user');
  } finally {
    await follower.close();
    await leader.close();
  }
});

test('a write the server refuses is heard as `rejected` in every tab, once each, whichever tab sent it', async () => {
  const server = new FakeBatchServer(undefined, (op) =>
    op.row['title'] === 'bad' ? { status: 400, code: 'invalid_value', message: 'not a title' } : undefined,
  );
  const opts = device(server, () => jwt('user-1'));
  const leader = await createSyncClient(opts);
  const follower = await createSyncClient(opts);
  const heard = { leader: [] as string[], follower: [] as string[] };
  leader.onRejected((r) => heard.leader.push(r.op.opId));
  follower.onRejected((r) => heard.follower.push(r.op.opId));
  try {
    const [bad] = await follower.write({ table: 'works', kind: 'insert', row: { title: 'bad' } });
    await leader.write({ table: 'works', kind: 'insert', row: { title: 'good' } });
    await until('both tabs heard it', () => heard.leader.length > 0 && heard.follower.length > 0);
    await sleep(200);
    assert.deepEqual(heard.leader, [bad!.opId]);
    assert.deepEqual(heard.follower, [bad!.opId]);
    assert.deepEqual([...server.table('works').values()].map((r) => r['title']), ['good']);
  } finally {
    await follower.close();
    await leader.close();
  }
});
