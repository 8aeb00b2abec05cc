import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { OverlayOp } from '../../src/overlay.js';
import { applyOp, localEntry, mergeRows, normaliseRow, overlayRow } from '../../src/overlay.js';

const synced = { id: 'w1', title: 'Synced', year: 2015, owner_id: 'u1' };

test('insert shows what the user wrote', () => {
  assert.deepEqual(applyOp(undefined, { kind: 'insert', row: { id: 'w1', title: 'New' } }), { id: 'w1', title: 'New' });
});

test('update merges only the named columns over the current row', () => {
  assert.deepEqual(applyOp(synced, { kind: 'update', row: { id: 'w1', title: 'Edited' } }), { ...synced, title: 'Edited' });
});

test('update or delete of a row that does not exist changes nothing (the server answers not_found)', () => {
  assert.equal(applyOp(undefined, { kind: 'update', row: { id: 'x', title: 'T' } }), undefined);
  assert.equal(applyOp(undefined, { kind: 'delete', row: { id: 'x' } }), undefined);
  assert.equal(applyOp(null, { kind: 'update', row: { id: 'x', title: 'T' } }), null);
});

test('upsert inserts or merges', () => {
  assert.deepEqual(applyOp(undefined, { kind: 'upsert', row: { id: 'w1', title: 'U' } }), { id: 'w1', title: 'U' });
  assert.deepEqual(applyOp(synced, { kind: 'upsert', row: { id: 'w1', year: 2016 } }), { ...synced, year: 2016 });
});

test('delete hides the synced row (null), and a later insert brings it back', () => {
  const deleted = applyOp(synced, { kind: 'delete', row: { id: 'w1' } });
  assert.equal(deleted, null);
  assert.deepEqual(applyOp(deleted, { kind: 'insert', row: { id: 'w1', title: 'Again' } }), { id: 'w1', title: 'Again' });
});

test('pending ops apply in outbox order', () => {
  const ops: OverlayOp[] = [
    { kind: 'update', row: { id: 'w1', title: 'First' } },
    { kind: 'update', row: { id: 'w1', title: 'Second', year: 1 } },
  ];
  assert.deepEqual(overlayRow(synced, ops), { ...synced, title: 'Second', year: 1 });
  assert.deepEqual(overlayRow(synced, [...ops].reverse()), { ...synced, title: 'First', year: 1 });
});

test('localEntry: nothing pending means no entry; an update of a missing row hides nothing but is an entry', () => {
  assert.equal(localEntry(synced, []), undefined);
  assert.deepEqual(localEntry(undefined, [{ kind: 'update', row: { id: 'x', a: 1 } }]), { row: null });
  assert.deepEqual(localEntry(synced, [{ kind: 'update', row: { id: 'w1', year: 3 } }]), { row: { ...synced, year: 3 } });
});

test('mergeRows lays local entries over synced rows and hides deleted ones', () => {
  const rows = mergeRows(
    [synced, { id: 'w2', title: 'Two' }, { id: 'w3', title: 'Three' }],
    [
      { id: 'w2', row: null },
      { id: 'w3', row: { id: 'w3', title: 'Three (edited)' } },
      { id: 'w4', row: { id: 'w4', title: 'Optimistic' } },
    ],
  );
  assert.deepEqual(
    rows.map((r) => r['title']),
    ['Synced', 'Three (edited)', 'Optimistic'],
  );
});

test('normaliseRow: JSON only, owner_id removed, clear errors', () => {
  assert.deepEqual(normaliseRow({ id: 'a', owner_id: 'someone', when: new Date(0), n: 1 }, 'op'), {
    id: 'a',
    when: '1970-01-01T00:00:00.000Z',
    n: 1,
  });
  assert.throws(() => normaliseRow([], 'op 2'), /op 2: row must be an object/);
  assert.throws(() => normaliseRow(null, 'op 0'), /row must be an object/);
  const cyclic: Record<string, unknown> = {};
  cyclic['self'] = cyclic;
  assert.throws(() => normaliseRow(cyclic, 'op 1'), /not JSON-serialisable/);
});
