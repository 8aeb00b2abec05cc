import assert from 'node:assert/strict';
import { test } from 'node:test';
import { planChunk, settleBatch, shrink, type QueuedOp } from '../../src/batching.js';

const DEVICE = 'd0d0d0d0-1111-4222-8333-444455556666';
function op(seq: number, title = `work ${seq}`): QueuedOp {
  return { seq, opId: `op-${seq}`, table: 'works', kind: 'insert', row: { id: `w${seq}`, title } };
}

test('a chunk keeps outbox order and stops at the op limit', () => {
  const ops = Array.from({ length: 25 }, (_, i) => op(i + 1));
  const plan = planChunk(ops, DEVICE, { maxOps: 10, maxBytes: 1 << 20 });
  assert.ok('chunk' in plan);
  assert.deepEqual(plan.chunk.map((o) => o.seq), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
});

test('a chunk stops before the byte limit, measured as the request body the server will see', () => {
  const ops = Array.from({ length: 10 }, (_, i) => op(i + 1, 'x'.repeat(1000)));
  const limit = 5000;
  const plan = planChunk(ops, DEVICE, { maxOps: 1000, maxBytes: limit });
  assert.ok('chunk' in plan);
  assert.ok(plan.chunk.length >= 1 && plan.chunk.length < 10);
  const body = JSON.stringify({
    device_id: DEVICE,
    ops: plan.chunk.map((o) => ({ op_id: o.opId, table: o.table, kind: o.kind, row: o.row })),
  });
  assert.ok(new TextEncoder().encode(body).length <= limit, 'the body fits');
  const oneMore = JSON.stringify({
    device_id: DEVICE,
    ops: ops.slice(0, plan.chunk.length + 1).map((o) => ({ op_id: o.opId, table: o.table, kind: o.kind, row: o.row })),
  });
  assert.ok(new TextEncoder().encode(oneMore).length > limit, 'one more op would not fit');
});

test('multi-byte characters count as bytes, not characters', () => {
  const ops = [op(1, 'é'.repeat(600)), op(2, 'é'.repeat(600))];
  const plan = planChunk(ops, DEVICE, { maxOps: 10, maxBytes: 1500 });
  assert.ok('chunk' in plan);
  assert.equal(plan.chunk.length, 1);
});

test('an op larger than a whole request is reported, not sent', () => {
  const plan = planChunk([op(1, 'x'.repeat(10_000)), op(2)], DEVICE, { maxOps: 10, maxBytes: 2000 });
  assert.ok('tooLarge' in plan);
  assert.equal(plan.tooLarge.seq, 1);
});

test('settleBatch: applied ops wait for their echo; duplicate and not_found are told apart', () => {
  const chunk = [op(1), op(2), op(3), op(4)];
  const s = settleBatch(chunk, {
    txid: '900',
    results: [
      { op_id: 'op-1', status: 'applied' },
      { op_id: 'op-2', status: 'duplicate' },
      { op_id: 'op-3', status: 'not_found' },
    ],
  });
  assert.deepEqual(s.acked, [1]);
  assert.deepEqual(s.duplicate, [2]);
  assert.deepEqual(s.notFound, [3]);
  assert.equal(s.echoExpected, true);
});

test('settleBatch: an all-duplicate answer expects no echo (its transaction changed nothing)', () => {
  const s = settleBatch([op(1), op(2)], {
    txid: '901',
    results: [
      { op_id: 'op-1', status: 'duplicate' },
      { op_id: 'op-2', status: 'duplicate' },
    ],
  });
  assert.equal(s.echoExpected, false);
  assert.deepEqual(s.acked, []);
});

test('shrink halves the op count after a 413 and gives up at one op', () => {
  assert.deepEqual(shrink({ maxOps: 1000, maxBytes: 100 }, 1000), { maxOps: 500, maxBytes: 100 });
  assert.deepEqual(shrink({ maxOps: 1000, maxBytes: 100 }, 3), { maxOps: 1, maxBytes: 100 });
  assert.equal(shrink({ maxOps: 1000, maxBytes: 100 }, 1), null);
});
