// The applier with transactions in parts (docs/protocol.md, "Large transactions in parts"): each part applied on
// its own, no offset stored before the last part, own ops settled only by the last part, awaitTxId only then.
import 'fake-indexeddb/auto';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Applier, type ApplierEvents } from '../../src/applier.js';
import { SyncDatabase, type OutboxRecord } from '../../src/database.js';
import { Emitter, SerialQueue } from '../../src/events.js';
import { parseServerMessage, type Change, type ServerMessage } from '../../src/protocol.js';

let n = 0;
async function live() {
  const db = new SyncDatabase(`parts-${++n}`, ['works', 'annotations']);
  const events = new Emitter<ApplierEvents>();
  const applied: string[] = [];
  events.on('applied', ({ xid }) => applied.push(xid));
  const applier = new Applier(db, new SerialQueue(), events);
  for (const id of ['works', 'annotations']) {
    applier.subscribing(id);
    await applier.handle({ type: 'snapshot', id, rows: [] });
    await applier.handle({ type: 'up_to_date', id, offset: '1-0100' });
  }
  return { db, applier, applied };
}

const work = (id: string, title: string): Change => ({ id: 'works', table: 'works', op: 'insert', row: { id, title } });
const note = (id: string): Change => ({ id: 'annotations', table: 'annotations', op: 'insert', row: { id, body: 'n' } });
/** Frames as the server writes them, through the parser. */
const frame = (o: Record<string, unknown>): ServerMessage => parseServerMessage(JSON.stringify({ type: 'txn', lsn: '0/3B2C1D0', ...o }));

async function offsets(db: SyncDatabase) {
  return Object.fromEntries((await db.state.toArray()).filter((s) => s.key.startsWith('sub:')).map((s) => [s.key, 'offset' in s ? s.offset : '?']));
}

async function ownOp(db: SyncDatabase, seq: number, rowId: string, txid: string, ackedAt = Date.now()): Promise<void> {
  const op: OutboxRecord = {
    seq, opId: `op-${seq}`, table: 'works', rowId, kind: 'insert', row: { id: rowId, title: 'mine' },
    status: 'acked', txid, ackedAt, createdAt: Date.now(),
  };
  await db.outbox.add(op);
  await db.local.put({ table: 'works', id: rowId, row: op.row });
}

test('each part is applied as it comes; offsets, own ops and awaitTxId wait for the last part', async () => {
  const { db, applier, applied } = await live();
  await ownOp(db, 1, 'w1', '812');
  let done = false;
  void applier.awaitTxId('812').then(() => (done = true));

  await applier.handle(frame({ xid: '812', part: 0, more: true, changes: [work('w1', 'mine'), work('w2', 'B')] }));
  assert.deepEqual((await db.synced('works').toArray()).map((r) => r.id).sort(), ['w1', 'w2'], 'part 0 applied');
  assert.deepEqual(await offsets(db), { 'sub:works': '1-0100', 'sub:annotations': '1-0100' }, 'no offset moved');
  assert.equal(await db.outbox.count(), 1, 'own op kept: its transaction is not complete');
  assert.ok(await db.local.get(['works', 'w1']), 'still laid over');

  await applier.handle(frame({ xid: '812', part: 1, more: true, changes: [note('n1')] }));
  assert.equal(await db.synced('annotations').count(), 1);
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(done, false, 'awaitTxId waits for the whole transaction');
  assert.deepEqual(applied, []);

  // The last part: nothing of this connection's in it, but it carries the offset.
  await applier.handle(frame({ xid: '812', part: 2, offset: '1-0200', changes: [] }));
  assert.deepEqual(await offsets(db), { 'sub:works': '1-0200', 'sub:annotations': '1-0200' }, 'every subscription any part touched');
  assert.equal(await db.outbox.count(), 0, 'own op settled by the last part');
  assert.equal(await db.local.count(), 0);
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(done, true);
  assert.deepEqual(applied, ['812']);
  assert.ok(applier.seen('812'));
  db.close();
});

test('a subscription only in an earlier part still gets the last part\'s offset; one in no part keeps its own', async () => {
  const { db, applier } = await live();
  await applier.handle(frame({ xid: '900', part: 0, more: true, changes: [work('w', 'W')] }));
  await applier.handle(frame({ xid: '900', part: 3, offset: '1-0300', changes: [work('x', 'X')] }));
  assert.deepEqual(await offsets(db), { 'sub:works': '1-0300', 'sub:annotations': '1-0100' });
  db.close();
});

test('no stored offset is ever undefined: a part followed by more stores none, even if it carried one', async () => {
  const { db, applier } = await live();
  await applier.handle(frame({ xid: '901', part: 0, more: true, offset: '1-9999', changes: [work('w', 'W')] }));
  assert.deepEqual(await offsets(db), { 'sub:works': '1-0100', 'sub:annotations': '1-0100' });
  await applier.handle(frame({ xid: '901', part: 1, offset: '1-0400', changes: [] }));
  for (const s of await db.state.toArray()) {
    if (s.key.startsWith('sub:')) assert.equal(typeof (s as { offset: unknown }).offset, 'string', s.key);
  }
  db.close();
});

test('disconnected in the middle of a transaction: its parts stay, the offsets stay before it, the next transaction applies', async () => {
  const { db, applier, applied } = await live();
  await ownOp(db, 1, 'w1', '950');
  await applier.handle(frame({ xid: '950', part: 0, more: true, changes: [work('w1', 'mine')] }));
  applier.disconnected();
  // The resume (from 1-0100) refetches: must_refetch, snapshot, up_to_date, then live frames.
  await applier.handle({ type: 'must_refetch', id: 'works', reason: 'offset_older_than_server_history' });
  await applier.handle({ type: 'snapshot', id: 'works', rows: [{ id: 'w1', title: 'mine' }] });
  await applier.handle({ type: 'up_to_date', id: 'works', offset: '1-0500' });
  await applier.handle(frame({ xid: '951', offset: '1-0600', changes: [work('w9', 'after')] }));
  assert.deepEqual(await offsets(db), { 'sub:works': '1-0600', 'sub:annotations': '1-0100' });
  assert.deepEqual(applied, ['951'], 'the incomplete transaction is never reported applied');
  db.close();
});

test('a new transaction while another\'s parts are incomplete is a lost frame: the applier refuses it (the stream reconnects)', async () => {
  const { db, applier } = await live();
  await applier.handle(frame({ xid: '970', part: 0, more: true, changes: [work('a', 'A')] }));
  await assert.rejects(applier.handle(frame({ xid: '971', offset: '1-0700', changes: [work('b', 'B')] })), /970 came in parts/);
  assert.equal(await db.synced('works').get('b'), undefined, 'nothing of the unexpected frame applied');
  assert.deepEqual(await offsets(db), { 'sub:works': '1-0100', 'sub:annotations': '1-0100' });
  db.close();
});

test('the sweep of echoes that never came spares the ops of a transaction whose parts are still arriving', async () => {
  const { db, applier } = await live();
  await ownOp(db, 1, 'w1', '990', 0); // acknowledged long ago
  await ownOp(db, 2, 'w2', '991', 0); // another transaction whose echo never came
  await applier.handle(frame({ xid: '990', part: 0, more: true, changes: [work('w1', 'mine')] }));
  await applier.sweep(15_000, 2_000);
  assert.deepEqual((await db.outbox.toArray()).map((o) => o.txid), ['990'], 'only the op of the incomplete transaction stays');
  assert.equal(applier.seen('990'), false);
  await applier.handle(frame({ xid: '990', part: 1, offset: '1-0800', changes: [] }));
  assert.equal(await db.outbox.count(), 0);
  db.close();
});

test('after a refused frame the applier applies nothing more of that connection, until it is replaced', async () => {
  const { db, applier } = await live();
  applier.subscribing('annotations');
  await applier.handle({ type: 'must_refetch', id: 'annotations', reason: 'truncated' });
  await applier.handle({ type: 'snapshot', id: 'annotations', rows: [] });
  await applier.handle(frame({ xid: '975', part: 0, more: true, changes: [work('a', 'A')] }));
  await assert.rejects(applier.handle(frame({ xid: '976', offset: '1-0700', changes: [note('n')] })), /975 came in parts/);
  // What the connection sent behind the refused frame depends on it: its up_to_date must not store an offset.
  await assert.rejects(applier.handle({ type: 'up_to_date', id: 'annotations', offset: '1-0800' }), /earlier message/);
  await assert.rejects(applier.handle(frame({ xid: '977', offset: '1-0900', changes: [work('c', 'C')] })), /earlier message/);
  assert.equal(await db.synced('works').get('c'), undefined);
  assert.deepEqual(await offsets(db), { 'sub:works': '1-0100', 'sub:annotations': null });
  // A new connection starts clean.
  applier.disconnected();
  await applier.handle(frame({ xid: '978', offset: '1-1000', changes: [work('d', 'D')] }));
  assert.ok(await db.synced('works').get('d'));
  db.close();
});
