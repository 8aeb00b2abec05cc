import assert from 'node:assert/strict';
import { test } from 'node:test';
import { applyPatch, planFrame, staleIds, subscriptionsIn } from '../../src/frames.js';
import type { Change } from '../../src/protocol.js';

const subs = new Set(['works', 'annotations']);
const w = (id: string, extra: Record<string, string | number | null> = {}) => ({ id, owner_id: 'u', title: id, ...extra });

test('changes of one row fold to the last one, in transaction order', () => {
  const changes: Change[] = [
    { id: 'works', table: 'works', op: 'insert', row: w('a') },
    { id: 'works', table: 'works', op: 'update', row: w('a', { title: 'A2' }) },
    { id: 'works', table: 'works', op: 'insert', row: w('b') },
    { id: 'works', table: 'works', op: 'delete', row: w('b') },
  ];
  const plan = planFrame(changes, subs);
  assert.deepEqual(plan.get('works')?.get('a'), { kind: 'put', row: w('a', { title: 'A2' }) });
  assert.deepEqual(plan.get('works')?.get('b'), { kind: 'delete' });
});

test('a delete then an insert of the same id puts the new row', () => {
  const plan = planFrame(
    [
      { id: 'works', table: 'works', op: 'delete', row: w('a') },
      { id: 'works', table: 'works', op: 'insert', row: w('a', { title: 'reborn' }) },
    ],
    subs,
  );
  assert.deepEqual(plan.get('works')?.get('a'), { kind: 'put', row: w('a', { title: 'reborn' }) });
});

test('changes for subscriptions this client does not have are ignored', () => {
  const plan = planFrame([{ id: 'old-sub', table: 'works', op: 'insert', row: w('a') }], subs);
  assert.equal(plan.size, 0);
});

test('an unchanged patch keeps the stored values of the listed columns', () => {
  const plan = planFrame(
    [{ id: 'works', table: 'works', op: 'update', row: w('a', { title: 'new', abstract: null }), unchanged: ['abstract'] }],
    subs,
  );
  const effect = plan.get('works')?.get('a');
  assert.equal(effect?.kind, 'patch');
  if (effect?.kind !== 'patch') return;
  assert.ok(!('abstract' in effect.row));
  const stored = w('a', { title: 'old', abstract: 'a very long abstract' });
  assert.deepEqual(applyPatch(stored, effect.row), { ...stored, title: 'new' });
});

test('a patch after an insert in the same frame merges into the inserted row', () => {
  const plan = planFrame(
    [
      { id: 'works', table: 'works', op: 'insert', row: w('a', { abstract: 'long' }) },
      { id: 'works', table: 'works', op: 'update', row: w('a', { title: 'T2' }), unchanged: ['abstract'] },
    ],
    subs,
  );
  assert.deepEqual(plan.get('works')?.get('a'), { kind: 'put', row: w('a', { title: 'T2', abstract: 'long' }) });
});

test('tables stay apart', () => {
  const plan = planFrame(
    [
      { id: 'works', table: 'works', op: 'insert', row: w('x') },
      { id: 'annotations', table: 'annotations', op: 'insert', row: { id: 'x', work_id: 'x' } },
    ],
    subs,
  );
  assert.equal(plan.get('works')?.size, 1);
  assert.equal(plan.get('annotations')?.size, 1);
  assert.deepEqual([...subscriptionsIn([{ id: 'works', table: 'works', op: 'insert', row: w('x') }])], ['works']);
});

test('staleIds: what a refetch removes', () => {
  assert.deepEqual(staleIds(['a', 'b', 'c'], new Set(['b', 'd'])), ['a', 'c']);
});
