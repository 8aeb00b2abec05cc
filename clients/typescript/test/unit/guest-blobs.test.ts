// The guest -> user upgrade with the guest's blobs, through the whole client against simulated /v1/blobs/coordinate
// and /v1/batch endpoints (fake-server.ts): one bad blob report does not block the sign-in (it is repaired or left
// out, and the app told), a server that takes fewer blobs per request is met by halving, a transient failure still
// fails the sign-in with nothing left out, and the blob reports go out only as the user the upgrade is for. A guest's
// asset whose blob has no shell is refused, but the annotations on it are not lost: they go with asset_id null.
import 'fake-indexeddb/auto';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SignInError, createSyncClient } from '../../src/client.js';
import type { BlobRejection, BlobReport, Rejection, Repair, SyncClientOptions } from '../../src/types.js';
import { DeadSocket, FakeBatchServer, FakeCoordinateServer, routes } from './fake-server.js';

/** A token of `sub`; `expSecs` from now (0: due for replacement at once, so the next request asks getToken() again). */
function jwt(sub: string, expSecs = 3600): string {
  const now = Math.floor(Date.now() / 1000);
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub, iat: now - 60, exp: now + expSecs })}.sig`;
}

const sha = (n: number) => n.toString(16).padStart(64, '0');

let devices = 0;
/** Postgres's answer to an asset whose blob has no `blobs_meta` row (docs/api.md). */
const ASSET_FK = {
  status: 422,
  code: 'foreign_key_violation',
  message: 'insert or update on table "assets" violates foreign key constraint "assets_owner_id_sha256_fkey" (Key is not present in table "blobs_meta".)',
};

/** Postgres's answer to an annotation whose asset_id names no asset (with row-level security: no key values). */
const ANNOTATION_FK = {
  status: 422,
  code: 'foreign_key_violation',
  message: 'insert or update on table "annotations" violates foreign key constraint "annotations_owner_id_asset_id_fkey" (Key is not present in table "assets".)',
};

function setup(opts: { getToken: () => string | null; localBlobs?: () => Promise<BlobReport[]>; maxBlobs?: number; extra?: Partial<SyncClientOptions> }) {
  const blobs = new FakeCoordinateServer(opts.maxBlobs);
  // assets (owner_id, sha256) references blobs_meta: an asset needs its blob's shell (tests sign in one user);
  // annotations (owner_id, asset_id) references assets.
  const hasShell = (sha256: unknown) => [...blobs.meta.values()].some((m) => m.has(String(sha256)));
  const batch = new FakeBatchServer((op, table) => {
    const writes = op.kind === 'insert' || op.kind === 'upsert' || op.kind === 'update';
    if (op.table === 'assets' && writes && op.row['sha256'] !== undefined && !hasShell(op.row['sha256'])) return ASSET_FK;
    const asset = op.row['asset_id'];
    const known = (id: string) => [...table('assets').keys()].some((k) => k.toLowerCase() === id.toLowerCase()); // uuid
    if (op.table === 'annotations' && writes && typeof asset === 'string' && !known(asset)) return ANNOTATION_FK;
    return undefined;
  });
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

test('the upgrade reports the guest\'s blobs only with a token of the user it is for, like its ops', async (ctx) => {
  // getToken() answers for user-1 when signIn() asks, and for user-2 from then on (the app switched accounts during
  // the upgrade); user-1's token is due for replacement at once, so the coordinate request asks again.
  let tokens: Array<string | null> = [null];
  const next = () => (tokens.length > 1 ? tokens.shift()! : tokens[0]!);
  const t = setup({ getToken: next, localBlobs: async () => [{ sha256: sha(1), size: 10 }] });
  const c = await createSyncClient(t.options);
  ctx.after(() => c.close()); // also when an assertion fails (its timers would keep the run alive)
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

test('bad blob reports and a server that takes fewer blobs per request do not block the sign-in; the app is told', async (ctx) => {
  let token: string | null = null;
  const asset = sha(1);
  const many: BlobReport[] = Array.from({ length: 600 }, (_, i) => ({ sha256: sha(i + 1), size: i + 1, mime: 'application/pdf' }));
  const bad: BlobReport[] = [
    { sha256: sha(1000), size: 5, page_count: -1 }, // 400 invalid_value: page_count must be >= 0
    { sha256: sha(1), size: 1 }, // 422 duplicate_sha256 (says less than the first report of sha(1))
    { sha256: 'ABCDEF'.repeat(10) + 'ABCD', size: 7 }, // 422 invalid_sha256: upper case
    { sha256: sha(1001), size: 8, path: '/cas/\u0000' }, // 400 invalid_value: NUL in path
    { sha256: 'not a hash', size: 9 },
  ];
  // The server takes 500 blobs per request; the client is configured for 1000 (the default).
  const t = setup({ getToken: () => token, localBlobs: async () => [...many, ...bad], maxBlobs: 500 });
  const c = await createSyncClient(t.options);
  ctx.after(() => c.close()); // also when an assertion fails (its timers would keep the run alive)
  const told: BlobRejection[] = [];
  c.on('blobRejected', (r) => told.push(r));
  const [a] = await c.write({ table: 'assets', kind: 'insert', row: { sha256: asset, title: 'paper' } });
  token = jwt('user-1');
  await c.signIn();
  assert.equal(c.userId, 'user-1', 'signed in');
  assert.equal(t.blobs.shas('user-1').length, 603, '600 + page_count repaired + sha256 lowered + path left out');
  assert.ok(t.blobs.shas('user-1').includes('abcdef'.repeat(10) + 'abcd'));
  assert.equal(t.blobs.meta.get('user-1')!.get(sha(1000))!['page_count'], null);
  assert.deepEqual(t.blobs.requests.map((r) => [(r.body.blobs as unknown[]).length, r.status]), [[603, 413], [301, 200], [301, 200], [1, 200]], 'halved after the 413');
  assert.ok(t.batch.table('assets').has(a!.rowId), 'the guest\'s asset arrived (its shell was reported)');
  // Told: the duplicate (merged), page_count and the path (left out of their reports), the report that is no sha256
  // (not sent). The sha256 in upper case is simply sent in lower case.
  assert.deepEqual(told.map((r) => [r.code, r.blob.sha256, r.sent === null]), [
    ['invalid_sha256', 'not a hash', true],
    ['invalid_value', sha(1000), false],
    ['invalid_value', sha(1001), false],
    ['duplicate_sha256', sha(1), false],
  ]);
  await c.close();
});

test('a blob report refused for a reason not tied to one blob (503, network) still fails the sign-in, and nothing is left out', async (ctx) => {
  let token: string | null = null;
  const t = setup({ getToken: () => token, localBlobs: async () => [{ sha256: sha(1), size: 1 }] });
  const c = await createSyncClient(t.options);
  ctx.after(() => c.close()); // also when an assertion fails (its timers would keep the run alive)
  const told: BlobRejection[] = [];
  c.on('blobRejected', (r) => told.push(r));
  await c.write({ table: 'assets', kind: 'insert', row: { sha256: sha(1) } });
  token = jwt('user-1');
  t.blobs.faults = ['unavailable'];
  await assert.rejects(c.signIn(), (e: unknown) => e instanceof SignInError && e.code === 'database_unavailable');
  t.blobs.faults = ['drop'];
  await assert.rejects(c.signIn(), (e: unknown) => e instanceof SignInError && e.code === 'network');
  assert.equal(c.userId, null);
  assert.equal(t.batch.requests.length, 0, 'no op is sent before the blobs are reported');
  await c.signIn();
  assert.equal(c.userId, 'user-1');
  assert.deepEqual(t.blobs.shas('user-1'), [sha(1)]);
  assert.equal(t.batch.table('assets').size, 1);
  assert.deepEqual(told, []);
  await c.close();
});

test('a guest\'s asset without its blob\'s shell is refused, but its highlights survive: they go with asset_id null', async (ctx) => {
  let token: string | null = null;
  // No localBlobs: the app did not configure it (or the file left the CAS before the sign-in).
  const t = setup({ getToken: () => token });
  const c = await createSyncClient(t.options);
  ctx.after(() => c.close());
  const rejected: Rejection[] = [];
  const repaired: Repair[] = [];
  c.onRejected((r) => rejected.push(r));
  c.on('repaired', (r) => repaired.push(r));
  const [w] = await c.write({ table: 'works', kind: 'insert', row: { title: 'Deep learning' } });
  const [a] = await c.write({ table: 'assets', kind: 'insert', row: { sha256: sha(9), work_id: w!.rowId } });
  const geometry = { rects: [{ x: 1, y: 2, w: 3, h: 4 }] };
  const [h1, h2, note] = await c.write([
    { table: 'annotations', kind: 'insert', row: { work_id: w!.rowId, asset_id: a!.rowId, sha256: sha(9), page: 2, geometry, quote: 'deep' } },
    { table: 'annotations', kind: 'insert', row: { work_id: w!.rowId, asset_id: a!.rowId, sha256: sha(9), page: 3, quote: 'learning' } },
    { table: 'annotations', kind: 'insert', row: { work_id: w!.rowId, page: 4, kind: 'note', body: 'no asset' } },
  ]);
  await c.write({ table: 'annotations', kind: 'update', row: { id: h2!.rowId, color: 'yellow' } });
  token = jwt('user-1');
  await c.signIn();
  assert.equal(c.userId, 'user-1');
  assert.deepEqual(rejected.map((r) => [r.table, r.rowId, r.code]), [['assets', a!.rowId, 'foreign_key_violation']], 'the asset\'s refusal is told as before');
  const anns = t.batch.table('annotations');
  assert.deepEqual([...anns.keys()].sort(), [h1!.rowId, h2!.rowId, note!.rowId].sort(), 'no highlight lost');
  assert.deepEqual(anns.get(h1!.rowId), {
    id: h1!.rowId, work_id: w!.rowId, asset_id: null, sha256: sha(9), page: 2, geometry, quote: 'deep',
  });
  assert.equal(anns.get(h2!.rowId)!['asset_id'], null);
  assert.equal(anns.get(h2!.rowId)!['sha256'], sha(9));
  assert.equal(anns.get(h2!.rowId)!['color'], 'yellow', 'the later update of the highlight went through too');
  assert.deepEqual(repaired.map((r) => [r.rowId, r.op.row['asset_id'], r.row['asset_id'], r.code]), [
    [h1!.rowId, a!.rowId, null, 'foreign_key_violation'],
    [h2!.rowId, a!.rowId, null, 'foreign_key_violation'],
  ]);
  // The seqs stayed contiguous: every op once, one request refused per repair or rejection.
  assert.equal(new Set(t.batch.applied).size, t.batch.applied.length);
  assert.deepEqual(t.batch.requests.map((r) => r.status), [422, 422, 200]);
});

test('only the annotations before the asset is created lose their asset_id; those after it keep it', async (ctx) => {
  let token: string | null = null;
  const t = setup({ getToken: () => token, localBlobs: async () => [{ sha256: sha(9), size: 1 }] });
  const c = await createSyncClient(t.options);
  ctx.after(() => c.close());
  const asset = 'aaaaaaaa-4444-4555-8666-bbbbbbbbbbbb';
  // Written in the wrong order by the app: a highlight naming the asset (in upper case: a uuid all the same) before
  // the asset itself.
  const [early] = await c.write({ table: 'annotations', kind: 'insert', row: { asset_id: asset.toUpperCase(), sha256: sha(9), page: 1 } });
  await c.write({ table: 'assets', kind: 'insert', row: { id: asset, sha256: sha(9) } });
  const [late] = await c.write({ table: 'annotations', kind: 'insert', row: { asset_id: asset.toUpperCase(), sha256: sha(9), page: 2 } });
  token = jwt('user-1');
  await c.signIn();
  const anns = t.batch.table('annotations');
  assert.equal(anns.get(early!.rowId)!['asset_id'], null);
  assert.ok(t.batch.table('assets').has(asset));
  assert.equal(anns.get(late!.rowId)!['asset_id'], asset.toUpperCase(), 'after the asset\'s insert: unchanged');
});
