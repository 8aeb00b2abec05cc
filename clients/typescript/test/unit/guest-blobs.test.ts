// The guest -> user upgrade with the guest's blobs, through the whole client against simulated /v1/blobs/coordinate
// and /v1/batch endpoints (fake-server.ts): the blob reports go out only as the user the upgrade is for.
import 'fake-indexeddb/auto';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SignInError, createSyncClient } from '../../src/client.js';
import type { BlobReport, SyncClientOptions } from '../../src/types.js';
import { FakeBatchServer, FakeCoordinateServer, routes } from './fake-server.js';

/** A socket that never opens (the user's database stays `connecting`); closed only by the client. */
class DeadSocket {
  readonly OPEN = 1;
  readyState = 0;
  onopen: (() => void) | null = null;
  onmessage: ((ev: { data: string }) => void) | null = null;
  onclose: ((ev: { code: number }) => void) | null = null;
  onerror: (() => void) | null = null;
  constructor(readonly url: string) {}
  send(): void {}
  close(): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code: 1006 }));
  }
}

/** A token of `sub`; `expSecs` from now (0: due for replacement at once, so the next request asks getToken() again). */
function jwt(sub: string, expSecs = 3600): string {
  const now = Math.floor(Date.now() / 1000);
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub, iat: now - 60, exp: now + expSecs })}.sig`;
}

const sha = (n: number) => n.toString(16).padStart(64, '0');

let devices = 0;
function setup(opts: { getToken: () => string | null; localBlobs?: () => Promise<BlobReport[]>; maxBlobs?: number; extra?: Partial<SyncClientOptions> }) {
  const batch = new FakeBatchServer();
  const blobs = new FakeCoordinateServer(opts.maxBlobs);
  const options: SyncClientOptions = {
    url: 'http://sync.test',
    deviceId: `22222222-3333-4444-8555-${String(++devices).padStart(12, '0')}`,
    getToken: async () => opts.getToken(),
    fetch: routes({ '/v1/batch': batch.fetch, '/v1/blobs/coordinate': blobs.fetch }),
    WebSocket: DeadSocket as unknown as typeof WebSocket,
    signInCatchUpMs: 50,
    ...(opts.localBlobs ? { localBlobs: opts.localBlobs } : {}),
    ...opts.extra,
  };
  return { batch, blobs, options };
}

test('the upgrade reports the guest\'s blobs only with a token of the user it is for, like its ops', async () => {
  // getToken() answers for user-1 when signIn() asks, and for user-2 from then on (the app switched accounts during
  // the upgrade); user-1's token is due for replacement at once, so the coordinate request asks again.
  let tokens: Array<string | null> = [null];
  const next = () => (tokens.length > 1 ? tokens.shift()! : tokens[0]!);
  const t = setup({ getToken: next, localBlobs: async () => [{ sha256: sha(1), size: 10 }] });
  const c = await createSyncClient(t.options);
  await c.write({ table: 'works', kind: 'insert', row: { title: 'guest work' } });
  tokens = [jwt('user-1', 0), jwt('user-2')];
  const err = await c.signIn().then(() => null, (e: unknown) => e);
  assert.ok(err instanceof SignInError && err.code === 'other_user', `signIn() settled with ${String(err)}`);
  assert.deepEqual(t.blobs.requests.map((r) => r.user), [], 'no blob report was sent as user-2 (or at all)');
  assert.deepEqual(t.blobs.shas('user-2'), []);
  assert.equal(t.batch.requests.length, 0, 'and no op');
  assert.equal(c.userId, null, 'still a guest; the next signIn() tries again');
  assert.equal(await c.pendingCount(), 1);
  // Back to user-1: the same signIn() now goes through, as user-1.
  tokens = [jwt('user-1')];
  await c.signIn();
  assert.equal(c.userId, 'user-1');
  assert.deepEqual(t.blobs.requests.map((r) => r.user), ['user-1']);
  assert.deepEqual(t.blobs.shas('user-1'), [sha(1)]);
  await c.close();
});
