// The outbox against a simulated /v1/batch with per-client sequences (fake-server.ts): client_id and seqs on the
// wire, lost answers answered `duplicate`, refused ops whose seq is kept by a filler, 409 seq_gap (resend or a new
// client id), outboxes queued by a version that sent no seqs, and the guest upgrade run again.
import 'fake-indexeddb/auto';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Applier, type ApplierEvents } from '../../src/applier.js';
import { SyncDatabase, type OutboxRecord } from '../../src/database.js';
import { Emitter, SerialQueue } from '../../src/events.js';
import { flushGuestWork } from '../../src/guest.js';
import { Outbox, type OutboxEvents } from '../../src/outbox.js';
import { mergeRows } from '../../src/overlay.js';
import { TokenSource } from '../../src/token.js';
import { Transport } from '../../src/transport.js';
import type { Rejection, SyncErrorEvent } from '../../src/types.js';
import { FakeBatchServer } from './fake-server.js';

function jwt(sub = 'u'): string {
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + 3600 })}.sig`;
}

let dbCount = 0;
function setup(server: FakeBatchServer, opts: { name?: string; maxOps?: number; sub?: () => string } = {}) {
  const name = opts.name ?? `seq-${++dbCount}`;
  const db = new SyncDatabase(name, ['works', 'annotations']);
  const transport = new Transport('http://sync.test', new TokenSource(async () => jwt(opts.sub?.() ?? 'u')), server.fetch);
  const writer = new SerialQueue();
  const applier = new Applier(db, writer, new Emitter<ApplierEvents>());
  const events = new Emitter<OutboxEvents>();
  const rejections: Rejection[] = [];
  const errors: SyncErrorEvent[] = [];
  events.on('rejected', (r) => rejections.push(r));
  events.on('error', (e) => errors.push(e));
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
  return { db, outbox, applier, transport, rejections, errors, rows };
}

const insert = (id: string, title: string) => ({ table: 'works', kind: 'insert' as const, row: { id, title } });
const serverTitles = (s: FakeBatchServer) => [...s.table('works').values()].map((r) => r['title']).sort();
const onlyOnce = (s: FakeBatchServer) => new Set(s.applied).size === s.applied.length;

/** Flushes until the outbox has nothing pending (a failed request throws once; the retry goes through). */
async function drain(t: ReturnType<typeof setup>): Promise<void> {
  for (let i = 0; i < 20; i++) {
    try {
      await t.outbox.flush();
      if ((await t.outbox.pendingCount()) === 0 && (await pendingFillers(t.db)) === 0) return;
    } catch (e) {
      if (!(e as { transient?: boolean }).transient) throw e;
    }
  }
  throw new Error('outbox did not drain');
}

async function pendingFillers(db: SyncDatabase): Promise<number> {
  return (await db.outbox.toArray()).filter((o) => o.filler && o.status === 'pending').length;
}

test('batches carry the outbox client_id and seqs 1, 2, 3, …; a lost answer is resent with the same seqs and answered duplicate', async () => {
  const server = new FakeBatchServer();
  const t = setup(server, { maxOps: 2 });
  await t.outbox.enqueue([insert('a', 'A'), insert('b', 'B'), insert('c', 'C')]);
  server.faults = ['lose']; // the first request commits, its answer never arrives
  await assert.rejects(t.outbox.flush(), (e: Error & { transient?: boolean }) => e.transient === true);
  await drain(t);
  const clientIds = new Set(server.requests.map((r) => r.client_id));
  assert.equal(clientIds.size, 1);
  const [clientId] = clientIds;
  assert.match(String(clientId), /^[0-9a-f-]{36}$/);
  assert.deepEqual(
    server.requests.map((r) => r.ops.map((o) => o.seq)),
    [[1, 2], [1, 2], [3]],
    'the lost request is sent again as it was',
  );
  assert.ok(server.requests.every((r) => r.ops.every((o) => typeof o.op_id === 'string')), 'op ids are still sent');
  assert.deepEqual((await t.db.outbox.toArray()).map((o) => [o.rowId, o.status, o.txid === undefined]), [
    ['a', 'acked', true], // duplicate: committed by the lost request, xid unknown
    ['b', 'acked', true],
    ['c', 'acked', false],
  ]);
  assert.equal(server.clients.get(String(clientId)), 3);
  assert.deepEqual(serverTitles(server), ['A', 'B', 'C']);
  assert.ok(onlyOnce(server), 'every op applied exactly once');
  t.db.close();
});

test('a refused op keeps its seq through a filler: the ops behind it keep theirs, and the app is told', async () => {
  const server = new FakeBatchServer((op) =>
    op.row['title'] === 'Bad' ? { status: 422, code: 'constraint_violation', message: 'violates check constraint' } : undefined,
  );
  const t = setup(server);
  await t.outbox.enqueue([insert('a', 'A'), insert('bad', 'Bad'), insert('c', 'C')]);
  await t.outbox.flush();
  assert.equal(t.rejections.length, 1);
  assert.equal(t.rejections[0]!.rowId, 'bad');
  assert.deepEqual((await t.rows('works')).map((r) => r['id']).sort(), ['a', 'c'], 'the refused row is gone locally');
  const [refused, resent] = server.requests;
  assert.equal(refused!.status, 422);
  assert.deepEqual(resent!.ops.map((o) => [o.seq, o.kind, o.row['id'] === 'bad']), [
    [1, 'insert', false],
    [2, 'delete', false], // the filler: a delete of a fresh id
    [3, 'insert', false],
  ]);
  assert.equal(resent!.ops[0]!.op_id, refused!.ops[0]!.op_id);
  assert.equal(resent!.ops[2]!.op_id, refused!.ops[2]!.op_id);
  assert.equal(server.clients.get(resent!.client_id!), 3);
  // The next write continues the sequence.
  await t.outbox.enqueue([insert('d', 'D')]);
  await t.outbox.flush();
  assert.deepEqual(server.requests.at(-1)!.ops.map((o) => o.seq), [4]);
  assert.deepEqual(serverTitles(server), ['A', 'C', 'D']);
  assert.equal(await t.outbox.pendingCount(), 0);
  t.db.close();
});

function raceSetup() {
  let refuseB = false;
  const server = new FakeBatchServer((op) =>
    refuseB && op.row['title'] === 'B' ? { status: 422, code: 'foreign_key_violation', message: 'key is not present' } : undefined,
  );
  return { server, t: setup(server), refuseB: (v: boolean) => (refuseB = v) };
}

test('a request delivered late, after its retry was refused and the rest resent, changes nothing', async () => {
  const { server, t, refuseB } = raceSetup();
  await t.outbox.enqueue([insert('a', 'A'), insert('b', 'B'), insert('c', 'C')]);
  server.faults = ['hold']; // attempt 1 is held back by the network; the client sees a failure
  await assert.rejects(t.outbox.flush());
  refuseB(true); // B becomes invalid (say its work was deleted on another device)
  await t.outbox.flush(); // attempt 2 refused for B; attempt 3 = A, filler, C committed as seqs 1-3
  assert.equal(t.rejections.length, 1);
  const late = server.deliverLate(); // attempt 1 finally arrives
  assert.equal(late.status, 200);
  assert.deepEqual((late.body as { results: Array<{ status: string }> }).results.map((r) => r.status), ['duplicate', 'duplicate', 'duplicate']);
  await t.outbox.enqueue([insert('d', 'D')]);
  await drain(t);
  assert.deepEqual(serverTitles(server), ['A', 'C', 'D']);
  assert.ok(onlyOnce(server));
  t.db.close();
});

test('a request delivered late that commits before the resend cannot make the server skip a later op', async () => {
  // Attempt 1 of [A, B, C] is held back by the network. Attempt 2 is refused for B (the work it references was just
  // deleted on another device); the resend (A, filler, C) is lost on the way. The work is restored, then attempt 1
  // arrives and commits seqs 1-3, B included. Had the client renumbered C to seq 2
  // and the next op D to seq 3, the server would answer D `duplicate` and never apply it. With B's seq kept by a
  // filler, D is seq 4 and is applied.
  const { server, t, refuseB } = raceSetup();
  await t.outbox.enqueue([insert('a', 'A'), insert('b', 'B'), insert('c', 'C')]);
  server.faults = ['hold'];
  await assert.rejects(t.outbox.flush());
  refuseB(true);
  server.faults = ['pass', 'drop']; // attempt 2 answered (refused), attempt 3 lost
  await assert.rejects(t.outbox.flush());
  assert.equal(t.rejections.length, 1);
  refuseB(false);
  assert.equal(server.deliverLate().status, 200); // commits A, B, C as seqs 1-3
  await t.outbox.enqueue([insert('d', 'D')]);
  await drain(t);
  const last = server.requests.at(-1)!;
  assert.deepEqual(last.ops.map((o) => [o.seq, o.kind]), [[1, 'insert'], [2, 'delete'], [3, 'insert'], [4, 'insert']]);
  assert.equal(last.ops[3]!.row['id'], 'd');
  assert.equal(server.clients.get(last.client_id!), 4);
  assert.deepEqual(serverTitles(server), ['A', 'B', 'C', 'D'], 'D applied (and B: its late request committed it)');
  assert.ok(onlyOnce(server));
  t.db.close();
});

test('409 seq_gap with the acknowledged ops still queued: they are sent again from last_seq + 1', async () => {
  const server = new FakeBatchServer();
  const t = setup(server);
  await t.outbox.enqueue([insert('a', 'A'), insert('b', 'B'), insert('c', 'C')]);
  await t.outbox.flush();
  const clientId = server.requests[0]!.client_id!;
  // The server's database is restored from a backup taken after seq 1: B and C are gone, and so is its memory of them.
  server.clients.set(clientId, 1);
  server.table('works').delete('b');
  server.table('works').delete('c');
  await t.outbox.enqueue([insert('d', 'D')]);
  await t.outbox.flush();
  const [gap, resend] = server.requests.slice(1);
  assert.equal(gap!.status, 409);
  assert.deepEqual(resend!.ops.map((o) => [o.seq, o.row['id']]), [[2, 'b'], [3, 'c'], [4, 'd']]);
  assert.equal(resend!.client_id, clientId);
  assert.deepEqual(serverTitles(server), ['A', 'B', 'C', 'D']);
  assert.deepEqual(t.errors.map((e) => e.code), ['seq_gap']);
  t.db.close();
});

test('409 seq_gap with the missing ops no longer queued: the pending ops continue under a new client id', async () => {
  const server = new FakeBatchServer();
  const t = setup(server);
  await t.applier.handle({ type: 'up_to_date', id: 'works', offset: '1-01' });
  await t.outbox.enqueue([insert('a', 'A'), insert('b', 'B')]);
  const [txid] = await t.outbox.flush();
  // Their echo arrives: the ops leave the outbox.
  await t.applier.handle({
    type: 'txn', xid: txid!, lsn: '', offset: '1-02',
    changes: [
      { id: 'works', table: 'works', op: 'insert', row: { id: 'a', title: 'A' } },
      { id: 'works', table: 'works', op: 'insert', row: { id: 'b', title: 'B' } },
    ],
  });
  assert.equal(await t.db.outbox.count(), 0);
  const first = server.requests[0]!.client_id!;
  server.clients.set(first, 0); // the server forgot the client (and A and B)
  await t.outbox.enqueue([insert('c', 'C'), insert('d', 'D')]);
  await t.outbox.flush();
  const last = server.requests.at(-1)!;
  assert.notEqual(last.client_id, first, 'a new client id');
  assert.deepEqual(last.ops.map((o) => [o.seq, o.row['id']]), [[1, 'c'], [2, 'd']]);
  assert.equal(server.clients.get(last.client_id!), 2);
  // And it sticks: the next write is seq 3 of the new client id.
  await t.outbox.enqueue([insert('e', 'E')]);
  await t.outbox.flush();
  assert.deepEqual(server.requests.at(-1)!.ops.map((o) => o.seq), [3]);
  assert.equal(server.requests.at(-1)!.client_id, last.client_id);
  assert.deepEqual(t.errors.map((e) => e.code), ['seq_gap']);
  t.db.close();
});

test('an outbox queued by a version that sent no seqs: its ops go by op_id alone (a retry is a ledger duplicate), new ops by seq from 1', async () => {
  const server = new FakeBatchServer();
  const name = `legacy-${++dbCount}`;
  const old = new SyncDatabase(name, ['works', 'annotations']);
  const now = Date.now();
  const legacy = (seq: number, id: string): OutboxRecord => ({
    seq, opId: crypto.randomUUID(), table: 'works', rowId: id, kind: 'insert', row: { id, title: id.toUpperCase() }, status: 'pending', createdAt: now,
  });
  await old.outbox.bulkAdd([legacy(1, 'a'), legacy(2, 'b')]);
  await old.state.put({ key: 'outbox', clientId: 'c1c1c1c1-2222-4333-8444-555566667777', nextSeq: 3 });
  old.close();
  // Say the old version sent them once and lost the answer: the ledger holds their op ids.
  const t = setup(server, { name });
  await t.outbox.enqueue([insert('c', 'C')]);
  server.faults = ['lose'];
  await assert.rejects(t.outbox.flush());
  await drain(t);
  const [lost, again, seqBatch] = server.requests;
  assert.equal(lost!.client_id, undefined);
  assert.deepEqual(lost!.ops.map((o) => [o.row['id'], o.seq]), [['a', undefined], ['b', undefined]]);
  assert.equal(again!.client_id, undefined, 'still by op_id: never switched to seqs for ops already sent');
  assert.equal(seqBatch!.client_id, 'c1c1c1c1-2222-4333-8444-555566667777');
  assert.deepEqual(seqBatch!.ops.map((o) => [o.row['id'], o.seq]), [['c', 1]]);
  assert.deepEqual(serverTitles(server), ['A', 'B', 'C']);
  assert.ok(onlyOnce(server));
  assert.deepEqual(await t.db.state.get('outbox'), {
    key: 'outbox', clientId: 'c1c1c1c1-2222-4333-8444-555566667777', nextSeq: 4, seqFrom: 3, seqBase: 2,
  });
  t.db.close();
});

test('a refused op in a table the server does not know gets its filler in another table', async () => {
  const server = new FakeBatchServer(
    () => undefined,
    (op) => (op.table === 'annotations' ? { status: 422, code: 'unknown_table', message: '`annotations` is not a synced table' } : undefined),
  );
  const t = setup(server);
  await t.outbox.enqueue([{ table: 'annotations', kind: 'insert', row: { id: 'n', body: 'x' } }, insert('a', 'A')]);
  await t.outbox.flush();
  assert.equal(t.rejections[0]?.code, 'unknown_table');
  assert.deepEqual(server.requests.at(-1)!.ops.map((o) => [o.seq, o.table, o.kind]), [[1, 'works', 'delete'], [2, 'works', 'insert']]);
  assert.equal(server.requests.at(-1)!.status, 200);
  t.db.close();
});

test('a refused filler blocks (retried slowly) instead of looping', async () => {
  const server = new FakeBatchServer(
    () => undefined,
    () => ({ status: 422, code: 'unknown_table', message: 'no synced table here' }),
  );
  const t = setup(server);
  await t.outbox.enqueue([insert('a', 'A')]);
  await assert.rejects(t.outbox.flush(), (e: Error & { transient?: boolean; code?: string }) => e.transient === false && e.code === 'unknown_table');
  assert.equal(server.requests.length, 2, 'the op, then its filler; nothing more');
  assert.equal(t.rejections.length, 1);
  t.db.close();
});

test('an op larger than a request may be is refused by the client, and its seq filled', async () => {
  const server = new FakeBatchServer();
  const t = setup(server);
  t.outbox['limits'] = { maxOps: 1000, maxBytes: 400 };
  await t.outbox.enqueue([insert('big', 'x'.repeat(1000)), insert('a', 'A')]);
  await t.outbox.flush();
  assert.equal(t.rejections[0]?.code, 'payload_too_large');
  assert.deepEqual(server.requests.at(-1)!.ops.map((o) => [o.seq, o.kind]), [[1, 'delete'], [2, 'insert']]);
  t.db.close();
});

test('guest upgrade on the seq path: interrupted (answer lost, page gone) and run again creates nothing twice', async () => {
  const server = new FakeBatchServer();
  const name = `guest-${++dbCount}`;
  const g = setup(server, { name, maxOps: 4, sub: () => 'user-1' });
  const ops = Array.from({ length: 10 }, (_, i) => insert(`w${i}`, `Work ${i}`));
  await g.outbox.enqueue(ops);
  // First run: request 1 answered, request 2 commits but its answer is lost; the run fails there.
  server.faults = ['pass', 'lose'];
  await assert.rejects(flushGuestWork({ outbox: g.outbox, transport: g.transport, deviceId: 'd', userId: 'user-1' }));
  assert.equal(server.table('works').size, 8, 'two requests committed');
  g.outbox.stop();
  g.db.close();
  // The page is gone; the next start finds the guest database and runs the upgrade again.
  const again = setup(server, { name, maxOps: 4, sub: () => 'user-1' });
  await flushGuestWork({ outbox: again.outbox, transport: again.transport, deviceId: 'd', userId: 'user-1' });
  assert.equal(server.table('works').size, 10);
  assert.ok(onlyOnce(server), 'no op applied twice');
  assert.deepEqual(again.rejections, [], 'no insert ran twice (it would be a conflict)');
  assert.equal(new Set(server.requests.map((r) => r.client_id)).size, 1, 'one client id throughout');
  assert.deepEqual(server.requests.map((r) => r.ops.map((o) => o.seq)), [[1, 2, 3, 4], [5, 6, 7, 8], [5, 6, 7, 8], [9, 10]]);
  again.db.close();
});

test('guest upgrade run again for another user: what the first user got is not resent; the rest starts a new sequence', async () => {
  const server = new FakeBatchServer();
  let user = 'user-a';
  const g = setup(server, { maxOps: 2, sub: () => user });
  await g.outbox.enqueue([insert('a', 'A'), insert('b', 'B'), insert('c', 'C')]);
  server.faults = ['pass', 'drop'];
  await assert.rejects(flushGuestWork({ outbox: g.outbox, transport: g.transport, deviceId: 'd', userId: 'user-a' }));
  user = 'user-b';
  g.transport['tokens'].invalidate();
  await flushGuestWork({ outbox: g.outbox, transport: g.transport, deviceId: 'd', userId: 'user-b' });
  const [first, second] = server.requests;
  assert.deepEqual(first!.ops.map((o) => [o.row['id'], o.seq]), [['a', 1], ['b', 2]]);
  assert.deepEqual(second!.ops.map((o) => [o.row['id'], o.seq]), [['c', 1]], 'seq 1 of a new client id');
  assert.notEqual(second!.client_id, first!.client_id);
  assert.equal(server.requests.length, 2);
  g.db.close();
});

test('queued writes are never sent with a token of another user; a guest outbox is sent only by the upgrade', async () => {
  const server = new FakeBatchServer();
  const t = setup(server);
  let sub = 'someone-else';
  const transport = new Transport('http://sync.test', new TokenSource(async () => jwt(sub)), server.fetch);
  const outbox = new Outbox({
    db: t.db,
    transport,
    deviceId: 'd',
    writer: new SerialQueue(),
    events: new Emitter<OutboxEvents>(),
    seenXid: () => false,
    userId: 'u',
  });
  await outbox.enqueue([insert('a', 'A')]);
  await assert.rejects(outbox.flush(), (e: Error & { code?: string; transient?: boolean }) => e.code === 'other_user' && e.transient === false);
  assert.equal(server.requests.length, 0, 'nothing sent');
  assert.equal(await outbox.pendingCount(), 1, 'nothing lost');
  sub = 'u';
  transport['tokens'].invalidate();
  await outbox.flush();
  assert.deepEqual(serverTitles(server), ['A']);
  // A guest outbox (no user) refuses to send on its own.
  const guest = new Outbox({
    db: t.db, transport, deviceId: 'd', writer: new SerialQueue(), events: new Emitter<OutboxEvents>(), seenXid: () => false,
  });
  await guest.enqueue([insert('b', 'B')]);
  await assert.rejects(guest.flush(), (e: Error & { code?: string }) => e.code === 'guest');
  t.db.close();
});
