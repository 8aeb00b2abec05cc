// Pure sequence numbering (sequence.ts): migration of an outbox that sent no seqs, wire seqs, what goes into one
// request, what a seq_gap does, fillers.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { fillerOp, loadSequence, planGap, rotate, sendable, wireSeq, type Sequence } from '../../src/sequence.js';

let ids = 0;
const newId = () => `id-${++ids}`;

test('a new outbox starts at seq 1; a stored one is kept; one from a version without seqs starts at its next op', () => {
  assert.deepEqual(loadSequence(undefined, undefined, () => 'fresh'), { key: 'outbox', clientId: 'fresh', nextSeq: 1, seqFrom: 1, seqBase: 0 });
  const stored: Sequence = { key: 'outbox', clientId: 'c', nextSeq: 9, seqFrom: 4, seqBase: 3 };
  assert.deepEqual(loadSequence(stored, 100, newId), stored);
  // Older version: ops 1-41 may have been sent by op_id; op 42 (the next one queued) is seq 1 of this client id.
  assert.deepEqual(loadSequence({ key: 'outbox', clientId: 'old', nextSeq: 42 }, undefined, newId), {
    key: 'outbox', clientId: 'old', nextSeq: 42, seqFrom: 42, seqBase: 41,
  });
  // State lost but ops present: a new client id after them; the ops present go by op_id.
  assert.deepEqual(loadSequence(undefined, 17, () => 'new'), { key: 'outbox', clientId: 'new', nextSeq: 18, seqFrom: 18, seqBase: 17 });
});

test('wire seqs: position minus base from seqFrom on, none before', () => {
  const s: Sequence = { key: 'outbox', clientId: 'c', nextSeq: 50, seqFrom: 42, seqBase: 41 };
  assert.equal(wireSeq(s, 41), undefined);
  assert.equal(wireSeq(s, 42), 1);
  assert.equal(wireSeq(s, 49), 8);
});

test('one request holds either the op_id-only ops or a run of consecutive positions under the client id', () => {
  const s: Sequence = { key: 'outbox', clientId: 'c', nextSeq: 50, seqFrom: 5, seqBase: 4 };
  const ops = (...seqs: number[]) => seqs.map((seq) => ({ seq }));
  assert.deepEqual(sendable(ops(2, 3, 5, 6), s), { ops: ops(2, 3) }, 'op_id-only ops first, alone');
  assert.deepEqual(sendable(ops(5, 6, 7), s), { ops: ops(5, 6, 7), clientId: 'c' });
  assert.deepEqual(sendable(ops(5, 6, 8, 9), s), { ops: ops(5, 6), clientId: 'c' }, 'a hole ends the run');
  assert.deepEqual(sendable([], s), { ops: [] });
});

test('seq_gap: resend from last_seq + 1 when every op from there is still held, acknowledged under this client id', () => {
  const s: Sequence = { key: 'outbox', clientId: 'c', nextSeq: 20, seqFrom: 11, seqBase: 10 };
  const acked = (seq: number, by = 'c') => ({ seq, status: 'acked' as const, ackedBy: by });
  // Server says last_seq 2 (position 12); first pending is position 15 (seq 5): 13, 14 must be resent.
  assert.deepEqual(planGap(s, 2, 15, [acked(11), acked(12), acked(13), acked(14)], newId), { kind: 'resend', seqs: [13, 14] });
  assert.deepEqual(planGap(s, 4, 15, [], newId), { kind: 'none' }, 'not behind: nothing to repair');
  assert.deepEqual(planGap(s, 7, 15, [], newId), { kind: 'none' });
  // Position 13 is gone (its echo removed it): the server's sequence cannot be continued.
  const rotated = planGap(s, 2, 15, [acked(14)], () => 'c2');
  assert.deepEqual(rotated, { kind: 'rotate', sequence: { key: 'outbox', clientId: 'c2', nextSeq: 20, seqFrom: 15, seqBase: 14 } });
  // Settled by op_id (an older tab) or under another client id: not ours to resend.
  assert.equal(planGap(s, 2, 15, [{ seq: 13, status: 'acked' }, acked(14)], newId).kind, 'rotate');
  assert.equal(planGap(s, 2, 15, [acked(13, 'other'), acked(14)], newId).kind, 'rotate');
});

test('rotate: the op at the given position becomes seq 1 of a new client id', () => {
  const s: Sequence = { key: 'outbox', clientId: 'c', nextSeq: 20, seqFrom: 1, seqBase: 0 };
  const r = rotate(s, 12, () => 'n');
  assert.deepEqual(r, { key: 'outbox', clientId: 'n', nextSeq: 20, seqFrom: 12, seqBase: 11 });
  assert.equal(wireSeq(r, 12), 1);
  assert.equal(wireSeq(r, 11), undefined);
});

test('fillers: a delete of a fresh id, in the refused op\'s table unless the server does not know that table', () => {
  const f = fillerOp({ table: 'annotations' }, 'constraint_violation', ['works', 'annotations'], () => 'fresh');
  assert.deepEqual(f, { table: 'annotations', kind: 'delete', rowId: 'fresh', row: { id: 'fresh' } });
  assert.equal(fillerOp({ table: 'annotations' }, 'unknown_table', ['annotations', 'works'], newId).table, 'works');
  assert.equal(fillerOp({ table: 'works' }, 'unknown_table', ['works'], newId).table, 'works', 'no other table: the same');
});
