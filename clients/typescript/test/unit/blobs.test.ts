import assert from 'node:assert/strict';
import { test } from 'node:test';
import { chunkBlobs, mergeBlobHandle } from '../../src/blobs.js';

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

test('blob reports are split at the server limit', () => {
  const blobs = Array.from({ length: 2500 }, (_, i) => ({ sha256: i.toString(16).padStart(64, '0'), size: i }));
  assert.deepEqual(chunkBlobs(blobs, 1000).map((c) => c.length), [1000, 1000, 500]);
});
