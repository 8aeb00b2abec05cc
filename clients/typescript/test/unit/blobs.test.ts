import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlobError, chunkBlobs, coordinate, fetchBlobHandle, mergeBlobHandle, prepareBlobReports } from '../../src/blobs.js';
import { TokenSource } from '../../src/token.js';
import { Transport } from '../../src/transport.js';
import type { BlobRejection, BlobReport } from '../../src/types.js';
import { FakeCoordinateServer } from './fake-server.js';

const sha = 'a'.repeat(64);
const other = 'b'.repeat(64);

test('the BlobHandle merges the three tables for one sha256', () => {
  const h = mergeBlobHandle(
    sha,
    [{ id: 'm1', sha256: sha, size: 10 }, { id: 'm2', sha256: other, size: 1 }],
    [
      { id: 'd2', sha256: sha, device_id: 'zz', present: false },
      { id: 'd1', sha256: sha, device_id: 'aa', present: true },
      { id: 'd3', sha256: other, device_id: 'aa', present: true },
    ],
    [
      { id: 'a2', sha256: sha, created_at: '2026-11-28 10:00:01+00' },
      { id: 'a1', sha256: sha, created_at: '2026-11-28 10:00:00+00' },
    ],
    true,
  );
  assert.equal(h.meta?.['id'], 'm1');
  assert.deepEqual(h.devices.map((d) => d['device_id']), ['aa', 'zz']);
  assert.deepEqual(h.assets.map((a) => a['id']), ['a1', 'a2']);
  assert.deepEqual(h.availableOn, ['aa']);
  assert.equal(h.availableLocally, true);
});

test('a guest: assets without meta give a handle with meta null', () => {
  const h = mergeBlobHandle(sha, [], [], [{ id: 'a', sha256: sha }], false);
  assert.equal(h.meta, null);
  assert.deepEqual(h.availableOn, []);
});

test("the server's BlobHandle says when it cut devices or assets; a local one never does", async () => {
  const answer = {
    sha256: sha,
    meta: { size: 1 },
    devices: [{ device_id: 'aa', present: true }],
    devices_truncated: false,
    assets: [{ id: 'a1' }],
    assets_truncated: true,
    available_on: ['aa'],
  };
  const fetchImpl = (async () => new Response(JSON.stringify(answer), { status: 200 })) as typeof fetch;
  const transport = new Transport('http://sync.test', new TokenSource(async () => jwt('u')), fetchImpl);
  const h = await fetchBlobHandle(transport, sha, false);
  assert.equal(h?.assetsTruncated, true);
  assert.equal(h?.devicesTruncated, false);
  assert.deepEqual(h?.availableOn, ['aa']);
  const local = mergeBlobHandle(sha, [], [], [{ id: 'a', sha256: sha }], false);
  assert.deepEqual([local.devicesTruncated, local.assetsTruncated], [false, false]);
});

test('blob reports are split at the server limit', () => {
  const blobs = Array.from({ length: 2500 }, (_, i) => ({ sha256: i.toString(16).padStart(64, '0'), size: i }));
  assert.deepEqual(chunkBlobs(blobs, 1000).map((c) => c.length), [1000, 1000, 500]);
});

function jwt(sub: string): string {
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + 3600 })}.sig`;
}

const DEVICE = 'd0d0d0d0-1111-4222-8333-444455556666';
const hex = (n: number) => n.toString(16).padStart(64, '0');

/** coordinate() against a simulated /v1/blobs/coordinate, collecting what it tells through onRefused. */
function against(server: FakeCoordinateServer) {
  const transport = new Transport('http://sync.test', new TokenSource(async () => jwt('u')), server.fetch);
  const refused: BlobRejection[] = [];
  const run = (blobs: BlobReport[], opts: { complete?: boolean; maxPerRequest?: number } = {}) =>
    coordinate(transport, DEVICE, blobs, { ...opts, onRefused: (r) => refused.push(r) });
  return { run, refused };
}

test('reports the server would refuse are repaired where that is certain, else left out; the rest is sent, and the app told', async () => {
  const server = new FakeCoordinateServer();
  const { run, refused } = against(server);
  const upper = 'AB'.repeat(32);
  const blobs = [
    { sha256: sha, size: 10 },
    { sha256: other, size: 20, page_count: -1, mime: 'application/pdf' }, // page_count left out
    { sha256: sha, size: 10, mime: 'application/pdf', filename: 'a.pdf' }, // the same sha256 again, saying more: kept
    { sha256: upper, size: 30, path: '/cas/x\u0000y' }, // upper case lowered; the path with NUL left out
    { sha256: hex(4), size: 40, filename: 'bad \ud800 name' }, // a lone surrogate: the server could not parse the body
    { sha256: 'xyz', size: 1 }, // not a sha256: left out
    { sha256: hex(5), size: -1 }, // a size below zero: left out
    { sha256: hex(6), size: 1, health: 'gone' as BlobReport['health'] }, // unknown health: left out
    { sha256: hex(7), size: 1, color: 'red' } as BlobReport, // a field the server does not know: not sent
  ];
  const result = await run(blobs);
  assert.equal(server.requests.length, 1);
  assert.equal(server.requests[0]!.status, 200, JSON.stringify(server.requests[0]!.error));
  assert.deepEqual(server.shas('u'), [sha, other, 'ab'.repeat(32), hex(4), hex(7)].sort());
  assert.equal(result.meta_created, 5);
  const meta = server.meta.get('u')!;
  assert.equal(meta.get(sha)!['filename'], 'a.pdf', 'the report that says more was kept');
  assert.equal(meta.get(other)!['page_count'], null);
  assert.equal(meta.get(other)!['mime'], 'application/pdf', 'only the bad field is left out');
  assert.deepEqual(
    refused.map((r) => [r.blob.sha256, r.code, r.sent === null, r.status]),
    [
      ['xyz', 'invalid_sha256', true, 0],
      [hex(5), 'invalid_value', true, 0],
      [hex(6), 'invalid_value', true, 0],
      [other, 'invalid_value', false, 0],
      [upper, 'invalid_value', false, 0],
      [hex(4), 'invalid_value', false, 0],
      [sha, 'duplicate_sha256', false, 0],
    ],
  );
  assert.equal(refused.find((r) => r.code === 'duplicate_sha256')!.sent!['filename'], 'a.pdf');
  const sent = server.requests[0]!.body.blobs as Array<Record<string, unknown>>;
  assert.deepEqual(sent.find((b) => b['sha256'] === hex(7)), { sha256: hex(7), size: 1 }, 'sent without the unknown field');
});

test('a report too large alone is left out, and the requests after it are as large as before the 413s', async () => {
  const server = new FakeCoordinateServer();
  server.maxBodyBytes = 100_000;
  const { run, refused } = against(server);
  const blobs: BlobReport[] = Array.from({ length: 64 }, (_, i) => ({ sha256: hex(100 + i), size: i + 1 }));
  blobs[0] = { ...blobs[0]!, path: '/x'.repeat(60_000) }; // 120 kB: no request can hold it
  await run(blobs, { maxPerRequest: 64 });
  assert.equal(server.shas('u').length, 63);
  assert.deepEqual(refused.map((r) => [r.code, r.blob.sha256]), [['payload_too_large', hex(100)]]);
  // 64, 32, 16, 8, 4, 2, 1 refused (413), then the other 63 in one request, not one by one.
  assert.deepEqual(
    server.requests.map((r) => [(r.body.blobs as unknown[]).length, r.status]),
    [[64, 413], [32, 413], [16, 413], [8, 413], [4, 413], [2, 413], [1, 413], [63, 200]],
  );
});

test("a blob refused by an operator's check constraint (no blob_index) is found by halving and left out; the rest is sent", async () => {
  const server = new FakeCoordinateServer();
  server.constraint = (b) => b['mime'] === 'application/x-forbidden';
  const { run, refused } = against(server);
  const blobs: BlobReport[] = Array.from({ length: 8 }, (_, i) => ({ sha256: hex(200 + i), size: i + 1 }));
  blobs[5] = { ...blobs[5]!, mime: 'application/x-forbidden' };
  await run(blobs, { maxPerRequest: 8 });
  assert.deepEqual(server.shas('u'), blobs.filter((_, i) => i !== 5).map((b) => b.sha256).sort());
  assert.deepEqual(refused.map((r) => [r.code, r.blob.sha256]), [['constraint_violation', hex(205)]]);
  // 8 refused; 0-3 sent; 4-7 refused, 4-5 refused, 4 sent, 5 refused alone and left out; then 6-7 at the size before
  // the halving.
  assert.deepEqual(
    server.requests.map((r) => [(r.body.blobs as unknown[]).length, r.status]),
    [[8, 422], [4, 200], [4, 422], [2, 422], [1, 200], [1, 422], [2, 200]],
  );
});

test('a refusal without blob_index that is not a constraint still fails the call, with nothing left out', async () => {
  const server = new FakeCoordinateServer();
  const { refused } = against(server);
  const transport = new Transport('http://sync.test', new TokenSource(async () => jwt('u')), server.fetch);
  await assert.rejects(
    coordinate(transport, '00000000-0000-0000-0000-000000000000', [{ sha256: hex(1), size: 1 }, { sha256: hex(2), size: 2 }], {}),
    (e: unknown) => e instanceof BlobError && e.code === 'invalid_value',
  );
  assert.equal(server.requests.length, 1);
  assert.deepEqual(refused, []);
});

test('a 413 halves the requests (the server takes fewer blobs than configured) instead of failing', async () => {
  const server = new FakeCoordinateServer(500);
  const { run, refused } = against(server);
  const blobs = Array.from({ length: 600 }, (_, i) => ({ sha256: hex(i + 1), size: i }));
  const result = await run(blobs, { maxPerRequest: 1000 });
  assert.deepEqual(server.requests.map((r) => [(r.body.blobs as unknown[]).length, r.status]), [[600, 413], [300, 200], [300, 200]]);
  assert.equal(server.shas('u').length, 600);
  assert.equal(result.txids.length, 2);
  assert.deepEqual(refused, []);
});

test('a blob the server refuses by blob_index is left out and told; the request goes again without it', async () => {
  // A check the client does not know (a newer server): refused with blob_index, like every check of the report.
  const server = new FakeCoordinateServer(1000, (b) =>
    b['mime'] === 'application/x-forbidden' ? { status: 400, code: 'invalid_value', message: 'mime is not allowed' } : undefined,
  );
  const { run, refused } = against(server);
  const blobs = [
    { sha256: hex(1), size: 1 },
    { sha256: hex(2), size: 2, mime: 'application/x-forbidden' },
    { sha256: hex(3), size: 3 },
  ];
  await run(blobs);
  assert.deepEqual(server.requests.map((r) => [r.status, r.error?.blob_index]), [[400, 1], [200, undefined]]);
  assert.deepEqual(server.shas('u'), [hex(1), hex(3)]);
  assert.deepEqual(refused.map((r) => [r.blob.sha256, r.code, r.status, r.sent]), [[hex(2), 'invalid_value', 400, null]]);
});

test('a refusal not tied to one blob, a 5xx or a network failure throws and leaves nothing out', async () => {
  const server = new FakeCoordinateServer();
  const { run, refused } = against(server);
  const blobs = [{ sha256: hex(1), size: 1 }];
  server.faults = ['unavailable'];
  await assert.rejects(run(blobs), (e: unknown) => e instanceof BlobError && e.status === 503);
  server.faults = ['drop'];
  await assert.rejects(run(blobs), (e: unknown) => e instanceof BlobError && e.code === 'network');
  assert.deepEqual(refused, []);
  assert.deepEqual(server.shas('u'), []);
  await run(blobs);
  assert.deepEqual(server.shas('u'), [hex(1)]);
});

test('complete: true cannot leave a blob out (it would be marked missing): a report that cannot be sent throws, nothing sent', async () => {
  const server = new FakeCoordinateServer();
  const { run } = against(server);
  await assert.rejects(run([{ sha256: hex(1), size: 1 }, { sha256: hex(2), size: -5 }], { complete: true }), (e: unknown) => e instanceof BlobError && e.code === 'invalid_value');
  assert.equal(server.requests.length, 0);
  // Repaired reports are fine: the blob is still in the list.
  await run([{ sha256: hex(1), size: 1 }, { sha256: hex(2), size: 2, page_count: -1 }], { complete: true });
  assert.deepEqual(server.shas('u'), [hex(1), hex(2)]);
});

test('prepareBlobReports keeps the first of two reports that say as much, and the one that says more', () => {
  const { prepared, refused } = prepareBlobReports([
    { sha256: sha, size: 1, mime: 'a' },
    { sha256: sha.toUpperCase(), size: 1, filename: 'b' },
    { sha256: other, size: 1 },
    { sha256: other, size: 1, path: '/p', health: 'relocated' },
  ]);
  assert.deepEqual(prepared.map((p) => p.report), [
    { sha256: sha, size: 1, mime: 'a' },
    { sha256: other, size: 1, path: '/p', health: 'relocated' },
  ]);
  assert.deepEqual(refused.map((r) => [r.code, r.blob.sha256]), [['duplicate_sha256', sha.toUpperCase()], ['duplicate_sha256', other]]);
});
