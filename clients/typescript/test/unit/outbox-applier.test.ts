// The outbox and the applier together on an in-memory IndexedDB (fake-indexeddb), with a scripted server:
// ordering, echo removal, rejection rollback, persistence across a "reload", refetch replacement.
import 'fake-indexeddb/auto';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Applier, type ApplierEvents } from '../../src/applier.js';
import { SyncDatabase } from '../../src/database.js';
import { Emitter, SerialQueue } from '../../src/events.js';
import { Outbox, type OutboxEvents } from '../../src/outbox.js';
import { mergeRows } from '../../src/overlay.js';
import { TokenSource } from '../../src/token.js';
import { Transport, type BatchOp } from '../../src/transport.js';
import type { Rejection, Repair } from '../../src/types.js';

function jwt(): string {
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub: 'u', exp: Math.floor(Date.now() / 1000) + 3600 })}.sig`;
}

type Reply = (ops: BatchOp[]) => { status: number; body: unknown };

let dbCount = 0;
function setup(reply: Reply, opts: { name?: string; maxOps?: number } = {}) {
  const name = opts.name ?? `test-${++dbCount}`;
  const db = new SyncDatabase(name, ['works', 'annotations']);
  const requests: BatchOp[][] = [];
  const fakeFetch = (async (_url: string, init: RequestInit) => {
    const body = JSON.parse(String(init.body)) as { ops: BatchOp[] };
    requests.push(body.ops);
    const r = reply(body.ops);
    return new Response(JSON.stringify(r.body), { status: r.status });
  }) as typeof fetch;
  const transport = new Transport('http://sync.test', new TokenSource(async () => jwt()), fakeFetch);
  const writer = new SerialQueue();
  const applier = new Applier(db, writer, new Emitter<ApplierEvents>());
  const events = new Emitter<OutboxEvents>();
  const rejections: Rejection[] = [];
  events.on('rejected', (r) => rejections.push(r));
  const outbox = new Outbox({
    db,
    transport,
    deviceId: 'd0d0d0d0-1111-4222-8333-444455556666',
    writer,
    events,
    seenXid: (x) => applier.seen(x),
    limits: opts.maxOps ? { maxOps: opts.maxOps } : {},
    userId: 'u',
  });
  const rows = async (table: string) => mergeRows(await db.synced(table).toArray(), await db.local.where('table').equals(table).toArray());
  return { db, outbox, applier, requests, rejections, rows, name };
}

const applyAll: Reply = (ops) => ({ status: 200, body: { txid: '100', results: ops.map((o) => ({ op_id: o.op_id, status: 'applied' })) } });

test('writes show at once, are sent in order in chunks, and leave the outbox when their echo arrives', async () => {
  let txid = 100;
  const t = setup((ops) => ({ status: 200, body: { txid: String(++txid), results: ops.map((o) => ({ op_id: o.op_id, status: 'applied' })) } }), { maxOps: 2 });
  await t.applier.handle({ type: 'snapshot', id: 'works', rows: [] });
  await t.applier.handle({ type: 'up_to_date', id: 'works', offset: '1-01' });
  const written = await t.outbox.enqueue([
    { table: 'works', kind: 'insert', row: { title: 'A' } },
    { table: 'works', kind: 'insert', row: { title: 'B' } },
  ]);
  await t.outbox.enqueue([{ table: 'works', kind: 'update', row: { id: written[0]!.rowId, title: 'A2' } }]);
  assert.deepEqual((await t.rows('works')).map((r) => r['title']).sort(), ['A2', 'B']);
  assert.deepEqual(written.map((w) => w.seq), [1, 2]);

  const txids = await t.outbox.flush();
  assert.deepEqual(txids, ['101', '102']);
  assert.deepEqual(t.requests.map((r) => r.map((o) => o.kind)), [['insert', 'insert'], ['update']]);
  assert.equal(t.requests[0]![0]!.op_id, written[0]!.opId, 'op ids as generated at write time');
  assert.equal(await t.outbox.pendingCount(), 0);
  assert.equal(await t.db.outbox.count(), 3, 'acked ops stay until their echo');

  // The echo of the first request: the ops of txid 101 leave; the local view now comes from the synced row.
  await t.applier.handle({
    type: 'txn', xid: '101', lsn: '', offset: '1-02',
    changes: [
      { id: 'works', table: 'works', op: 'insert', row: { id: written[0]!.rowId, title: 'A', owner_id: 'u' } },
      { id: 'works', table: 'works', op: 'insert', row: { id: written[1]!.rowId, title: 'B', owner_id: 'u' } },
    ],
  });
  assert.equal(await t.db.outbox.count(), 1);
  assert.deepEqual((await t.rows('works')).map((r) => r['title']).sort(), ['A2', 'B'], 'the pending update still lies over the synced row');
  await t.applier.handle({
    type: 'txn', xid: '102', lsn: '', offset: '1-03',
    changes: [{ id: 'works', table: 'works', op: 'update', row: { id: written[0]!.rowId, title: 'A2', owner_id: 'u' } }],
  });
  assert.equal(await t.db.outbox.count(), 0);
  assert.equal(await t.db.local.count(), 0);
  assert.deepEqual((await t.rows('works')).map((r) => r['title']).sort(), ['A2', 'B']);
  const state = await t.db.state.get('sub:works');
  assert.deepEqual(state, { key: 'sub:works', offset: '1-03' }, 'offset stored with the frame');
  t.db.close();
});

test('a rejected op is removed, its local effect undone, the app told; the rest is resent, its seq filled by a no-op', async () => {
  let first = true;
  const t = setup((ops) => {
    if (first) {
      first = false;
      return { status: 422, body: { error: { code: 'constraint_violation', message: 'violates check constraint "works_read_status_check"', op_index: 1 } } };
    }
    return applyAll(ops);
  });
  await t.outbox.enqueue([
    { table: 'works', kind: 'insert', row: { id: 'good', title: 'Good' } },
    { table: 'works', kind: 'insert', row: { id: 'bad', title: 'Bad', read_status: 'nope' } },
  ]);
  assert.equal((await t.rows('works')).length, 2);
  await t.outbox.flush();
  assert.equal(t.rejections.length, 1);
  assert.equal(t.rejections[0]!.rowId, 'bad');
  assert.equal(t.rejections[0]!.code, 'constraint_violation');
  assert.equal(t.rejections[0]!.status, 422);
  assert.deepEqual((await t.rows('works')).map((r) => r['id']), ['good']);
  assert.deepEqual(t.requests.map((r) => r.length), [2, 2]);
  assert.equal(t.requests[1]![0]!.op_id, t.requests[0]![0]!.op_id, 'the good op keeps its id');
  assert.deepEqual(t.requests.map((r) => r.map((o) => o.seq)), [[1, 2], [1, 2]], 'and its seq; the refused seq is filled');
  const filler = t.requests[1]![1]!;
  assert.equal(filler.kind, 'delete');
  assert.equal(filler.table, 'works');
  assert.notEqual(filler.row['id'], 'bad', 'the filler deletes a fresh id, never the refused row');
  assert.notEqual(filler.op_id, t.requests[0]![1]!.op_id);
  assert.equal(await t.outbox.pendingCount(), 0);
  t.db.close();
});

test('an annotation naming an asset the server lacks is sent again with asset_id null, not dropped; the view follows', async () => {
  // Signed in: the asset was deleted on another device before this device's highlight on it was sent.
  const asset = 'aaaaaaaa-1111-4222-8333-444444444444';
  let first = true;
  const t = setup((ops) => {
    const i = ops.findIndex((o) => o.table === 'annotations' && typeof o.row['asset_id'] === 'string');
    if (i >= 0) {
      first = false;
      return {
        status: 422,
        body: { error: { code: 'foreign_key_violation', message: 'insert or update on table "annotations" violates foreign key constraint "annotations_owner_id_asset_id_fkey" (Key is not present in table "assets".)', op_index: i } },
      };
    }
    return applyAll(ops);
  });
  const repaired: Repair[] = [];
  t.outbox['events'].on('repaired', (r) => repaired.push(r));
  await t.outbox.enqueue([
    { table: 'annotations', kind: 'insert', row: { id: 'h1', asset_id: asset, sha256: 'a'.repeat(64), page: 3, geometry: { x: 1 } } },
    { table: 'works', kind: 'insert', row: { id: 'w', title: 'W' } },
    { table: 'annotations', kind: 'update', row: { id: 'h1', asset_id: asset, color: 'red' } },
  ]);
  await t.outbox.flush();
  assert.equal(first, false);
  assert.deepEqual(t.rejections, [], 'nothing dropped');
  assert.deepEqual(repaired.map((r) => [r.rowId, r.op.kind, r.row['asset_id']]), [['h1', 'insert', null], ['h1', 'update', null]]);
  assert.deepEqual(t.requests.map((r) => r.map((o) => [o.seq, 'asset_id' in o.row ? o.row['asset_id'] : '-'])), [
    [[1, asset], [2, '-'], [3, asset]],
    [[1, null], [2, '-'], [3, null]],
  ], 'the same seqs (and op ids), asset_id null');
  assert.equal(t.requests[1]![0]!.op_id, t.requests[0]![0]!.op_id);
  assert.deepEqual((await t.rows('annotations')).map((r) => [r['id'], r['asset_id'], r['sha256'], r['page'], r['color']]), [
    ['h1', null, 'a'.repeat(64), 3, 'red'],
  ], 'the local view shows what was sent');
  t.db.close();
});

test('a rejected update rolls back to the synced row', async () => {
  const t = setup((ops) =>
    ops[0]?.row['year'] === 'twenty' ? { status: 400, body: { error: { code: 'invalid_value', message: 'bad year', op_index: 0 } } } : applyAll(ops),
  );
  await t.applier.handle({ type: 'snapshot', id: 'works', rows: [{ id: 'w', title: 'Synced', year: 2000 }] });
  await t.applier.handle({ type: 'up_to_date', id: 'works', offset: '1-01' });
  await t.outbox.enqueue([{ table: 'works', kind: 'update', row: { id: 'w', year: 'twenty' } }]);
  assert.equal((await t.rows('works'))[0]!['year'], 'twenty');
  await t.outbox.flush();
  assert.deepEqual(await t.rows('works'), [{ id: 'w', title: 'Synced', year: 2000 }]);
  t.db.close();
});

test('network failures keep everything; the retry sends the same op ids', async () => {
  let fail = true;
  const t = setup(applyAll);
  const flaky = setup((ops) => {
    if (fail) return { status: 503, body: { error: { code: 'database_unavailable', message: 'later' } } };
    return applyAll(ops);
  });
  await flaky.outbox.enqueue([{ table: 'works', kind: 'insert', row: { title: 'X' } }]);
  await assert.rejects(flaky.outbox.flush(), (e: Error & { transient?: boolean; code?: string }) => e.transient === true && e.code === 'database_unavailable');
  assert.equal(await flaky.outbox.pendingCount(), 1);
  fail = false;
  await flaky.outbox.flush();
  assert.equal(flaky.requests.length, 2);
  assert.equal(flaky.requests[0]![0]!.op_id, flaky.requests[1]![0]!.op_id);
  t.db.close();
  flaky.db.close();
});

test('not_found settles at once; duplicate keeps its effect until the sweep, while live', async () => {
  const t = setup((ops) => ({
    status: 200,
    body: { txid: '5', results: ops.map((o, i) => ({ op_id: o.op_id, status: i === 0 ? 'duplicate' : 'not_found' })) },
  }));
  await t.outbox.enqueue([
    { table: 'works', kind: 'insert', row: { id: 'a', title: 'A' } },
    { table: 'works', kind: 'delete', row: { id: 'gone' } },
  ]);
  assert.deepEqual(await t.outbox.flush(), [], 'no txid to await');
  assert.deepEqual((await t.db.outbox.toArray()).map((o) => [o.rowId, o.status, o.txid]), [['a', 'acked', undefined]]);
  assert.deepEqual((await t.rows('works')).map((r) => r['id']), ['a'], 'the duplicate insert stays visible');
  await t.applier.sweep(15_000, 0);
  assert.equal(await t.db.outbox.count(), 1, 'no sweep before the stream is live');
  await t.applier.handle({ type: 'up_to_date', id: 'works', offset: '1-01' });
  await t.applier.handle({ type: 'up_to_date', id: 'annotations', offset: '1-01' });
  await t.applier.sweep(15_000, 60_000);
  assert.equal(await t.db.outbox.count(), 1, 'younger than the grace period');
  await new Promise((r) => setTimeout(r, 5));
  await t.applier.sweep(15_000, 1);
  assert.equal(await t.db.outbox.count(), 0);
  t.db.close();
});

test('an answer that arrives after its own echo settles at once', async () => {
  const t = setup(applyAll);
  await t.applier.handle({ type: 'up_to_date', id: 'works', offset: '1-01' });
  await t.outbox.enqueue([{ table: 'works', kind: 'insert', row: { id: 'a', title: 'A' } }]);
  await t.applier.handle({ type: 'txn', xid: '100', lsn: '', offset: '1-02', changes: [{ id: 'works', table: 'works', op: 'insert', row: { id: 'a', title: 'A' } }] });
  await t.outbox.flush();
  assert.equal(await t.db.outbox.count(), 0);
  t.db.close();
});

test('the outbox survives a reload (a new database object on the same IndexedDB)', async () => {
  const t = setup(applyAll, { name: 'reload-test' });
  await t.outbox.enqueue([{ table: 'works', kind: 'insert', row: { id: 'a', title: 'Offline' } }]);
  t.db.close();
  const again = setup(applyAll, { name: 'reload-test' });
  assert.deepEqual((await again.rows('works')).map((r) => r['title']), ['Offline']);
  await again.outbox.enqueue([{ table: 'works', kind: 'insert', row: { id: 'b', title: 'After reload' } }]);
  const seqs = (await again.db.outbox.toArray()).map((o) => o.seq);
  assert.deepEqual(seqs, [1, 2], 'seq continues');
  await again.outbox.flush();
  assert.deepEqual(again.requests[0]!.map((o) => o.row['id']), ['a', 'b']);
  again.db.close();
});

test('must_refetch: the new snapshot replaces the table; handoff inserts stay; offset forgotten then stored', async () => {
  const t = setup(applyAll);
  await t.applier.handle({ type: 'snapshot', id: 'works', rows: [{ id: 'keep', title: 'K' }, { id: 'gone', title: 'G' }] });
  await t.applier.handle({ type: 'up_to_date', id: 'works', offset: '1-05' });
  await t.applier.handle({ type: 'must_refetch', id: 'works', reason: 'truncated' });
  assert.deepEqual(await t.db.state.get('sub:works'), { key: 'sub:works', offset: null });
  await t.applier.handle({ type: 'snapshot', id: 'works', rows: [{ id: 'keep', title: 'K2' }] });
  await t.applier.handle({ type: 'txn', xid: '9', lsn: '', offset: '2-01', changes: [{ id: 'works', table: 'works', op: 'insert', row: { id: 'handoff', title: 'H' } }] });
  assert.equal((await t.db.synced('works').toArray()).length, 3, 'old rows stay visible until up_to_date');
  await t.applier.handle({ type: 'up_to_date', id: 'works', offset: '2-02' });
  assert.deepEqual((await t.db.synced('works').toArray()).map((r) => r.id).sort(), ['handoff', 'keep']);
  assert.deepEqual(await t.db.state.get('sub:works'), { key: 'sub:works', offset: '2-02' });
  t.db.close();
});

test('a frame is all or nothing: offsets of subscriptions not yet live are not stored', async () => {
  const t = setup(applyAll);
  t.applier.subscribing('works');
  await t.applier.handle({ type: 'snapshot', id: 'works', rows: [] });
  await t.applier.handle({ type: 'txn', xid: '1', lsn: '', offset: '1-09', changes: [{ id: 'works', table: 'works', op: 'insert', row: { id: 'x', title: 'X' } }] });
  assert.equal(await t.db.state.get('sub:works'), undefined, 'handoff frames do not move the offset');
  await t.applier.handle({ type: 'up_to_date', id: 'works', offset: '1-10' });
  assert.deepEqual((await t.db.synced('works').toArray()).map((r) => r.id), ['x']);
  t.db.close();
});

test('awaitTxId resolves when the transaction is applied, and at once when it already was', async () => {
  const t = setup(applyAll);
  const waiting = t.applier.awaitTxId('77');
  let done = false;
  void waiting.then(() => (done = true));
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(done, false);
  await t.applier.handle({ type: 'txn', xid: '77', lsn: '', offset: '1-01', changes: [] });
  await waiting;
  await t.applier.awaitTxId('77');
  const ac = new AbortController();
  const never = t.applier.awaitTxId('78', ac.signal);
  ac.abort(new Error('gave up'));
  await assert.rejects(never, /gave up/);
  t.db.close();
});

test('writes are validated before anything is stored', async () => {
  const t = setup(applyAll);
  await assert.rejects(t.outbox.enqueue([{ table: 'users', kind: 'insert', row: {} }]), /not one of this client's tables/);
  await assert.rejects(t.outbox.enqueue([{ table: 'works', kind: 'merge' as never, row: {} }]), /kind must be/);
  await assert.rejects(t.outbox.enqueue([{ table: 'works', kind: 'update', row: { title: 'no id' } }]), /row.id/);
  await assert.rejects(t.outbox.enqueue([{ table: 'works', kind: 'update', row: { id: 'a' } }]), /at least one column/);
  await assert.rejects(
    t.outbox.enqueue([
      { table: 'works', kind: 'insert', row: { title: 'ok' } },
      { table: 'works', kind: 'delete', row: {} },
    ]),
    /write op 1/,
  );
  assert.equal(await t.db.outbox.count(), 0, 'all or nothing');
  t.db.close();
});

test('must_refetch for the newer reasons (stream_discontinuity, transaction_too_large) refetches that table like any other', async () => {
  for (const reason of ['stream_discontinuity', 'transaction_too_large', 'some_future_reason']) {
    const t = setup(applyAll);
    const refetched: string[] = [];
    const events = new Emitter<ApplierEvents>();
    events.on('refetch', (e) => refetched.push(`${e.table}:${e.reason}`));
    const applier = new Applier(t.db, new SerialQueue(), events);
    for (const id of ['works', 'annotations']) {
      applier.subscribing(id);
      await applier.handle({ type: 'snapshot', id, rows: id === 'works' ? [{ id: 'old', title: 'O' }] : [{ id: 'n', body: 'N' }] });
      await applier.handle({ type: 'up_to_date', id, offset: '1-05' });
    }
    await applier.handle({ type: 'must_refetch', id: 'works', reason });
    assert.deepEqual(refetched, [`works:${reason}`]);
    assert.equal(applier.allLive(), false, reason);
    assert.deepEqual(await t.db.state.get('sub:works'), { key: 'sub:works', offset: null });
    assert.deepEqual(await t.db.state.get('sub:annotations'), { key: 'sub:annotations', offset: '1-05' }, 'the other table untouched');
    await applier.handle({ type: 'snapshot', id: 'works', rows: [{ id: 'new', title: 'N' }] });
    await applier.handle({ type: 'up_to_date', id: 'works', offset: '2-01' });
    assert.deepEqual((await t.db.synced('works').toArray()).map((r) => r.id), ['new'], reason);
    assert.equal(await t.db.synced('annotations').count(), 1);
    assert.equal(applier.allLive(), true);
    t.db.close();
  }
});

test('a sha256 in upper case is written and sent in lower case, as the server takes it', async () => {
  const t = setup(applyAll);
  const upper = 'AB'.repeat(32);
  const [w] = await t.outbox.enqueue([{ table: 'annotations', kind: 'insert', row: { sha256: upper, body: 'x' } }]);
  assert.equal((await t.rows('annotations')).find((r) => r['id'] === w!.rowId)?.['sha256'], upper.toLowerCase());
  await t.outbox.flush();
  assert.equal(t.requests[0]![0]!.row['sha256'], upper.toLowerCase());
  // Anything that is not a hash is sent as given (the server says what is wrong with it).
  await t.outbox.enqueue([{ table: 'annotations', kind: 'insert', row: { sha256: 'NOT-A-HASH', body: 'y' } }]);
  await t.outbox.flush();
  assert.equal(t.requests[1]![0]!.row['sha256'], 'NOT-A-HASH');
  t.db.close();
});
