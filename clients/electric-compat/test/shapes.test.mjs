// The unmodified @electric-sql/client 1.5.28 (ShapeStream, Shape) syncing works, annotations and blobs_meta shapes
// with `where` filters from a real deeprecall-sync: snapshots are exactly the user's rows, live writes converge with
// Postgres, other users' rows never arrive, params, resume from a saved handle and offset, token errors reach
// onError, and a /v1/batch txid is recognisable in the stream.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import {
  Shape,
  batch,
  converges,
  eventually,
  insert,
  randomUUID,
  record,
  remove,
  setup,
  truth,
  update,
  xid32,
} from './helpers.mjs';

let env;
before(async () => {
  env = await setup();
});
after(async () => {
  await env?.teardown();
});

const sha = (n) => n.toString(16).padStart(2, '0').repeat(32);

/** A user with works, annotations and blobs, and another user with similar rows. */
async function seed() {
  const [alice, bob] = [randomUUID(), randomUUID()];
  const works = [randomUUID(), randomUUID(), randomUUID()];
  for (const [user, tag] of [[alice, 'a'], [bob, 'b']]) {
    await batch(env, user, [
      insert('works', { id: works[0], title: `${tag} one`, year: 2017, tags: ['nlp', 'x y', 'a,b'], authors: [{ name: 'V' }], favorite: true }),
      insert('works', { id: works[1], title: `${tag} two`, year: 1999, read_status: 'read' }),
      insert('works', { id: works[2], title: `${tag} three`, read_status: 'reading' }),
      insert('annotations', { id: randomUUID(), work_id: works[0], kind: 'note', page: 1, body: 'hello', tags: ['q'] }),
      insert('annotations', { id: randomUUID(), work_id: works[0], kind: 'highlight', page: 2, geometry: { x: 1 } }),
      insert('annotations', { id: randomUUID(), work_id: works[1], kind: 'note', page: 3 }),
      insert('blobs_meta', { id: randomUUID(), sha256: sha(1), size: 5_000_000_000, mime: 'application/pdf', filename: 'a.pdf' }),
      insert('blobs_meta', { id: randomUUID(), sha256: sha(2), size: 10, mime: null }),
    ]);
  }
  return { alice, bob, works };
}

test('snapshots are exactly the user\'s rows, for three tables with where filters and params', async () => {
  const { alice, bob, works } = await seed();
  const cases = [
    { params: { table: 'works', where: 'year >= 2000 OR read_status = \'reading\'' }, truth: ['works', "year >= 2000 or read_status = 'reading'"] },
    { params: { table: 'public.works' }, truth: ['works', 'true'] },
    { params: { table: 'annotations', where: 'work_id = $1 AND page > $2', params: [works[0], '0'] }, truth: ['annotations', 'work_id = $2 and page > 0', [works[0]]] },
    { params: { table: 'blobs_meta', where: 'size > 1000 AND mime IS NOT NULL' }, truth: ['blobs_meta', 'size > 1000 and mime is not null'] },
    // Naming the owner is allowed and can only narrow: another owner's id yields nothing.
    { params: { table: 'works', where: `owner_id = '${alice}'` }, truth: ['works', 'true'] },
    { params: { table: 'works', where: `owner_id = '${bob}'` }, truth: ['works', 'false'] },
  ];
  for (const c of cases) {
    const stream = env.stream(alice, c.params);
    const shape = new Shape(stream);
    const rows = await shape.rows;
    const [table, cond, params] = c.truth;
    const want = await truth(env, table, alice, cond, params ?? []);
    assert.deepEqual(Object.fromEntries(rows.map((r) => [r.id, r])), want, JSON.stringify(c.params));
    for (const r of rows) assert.equal(r.owner_id, alice);
    if (c.params.table === 'works' && !c.params.where) {
      // Typed by the schema header: int4, bool, jsonb, text[] come out as JS values.
      const one = rows.find((r) => r.id === works[0]);
      assert.equal(one.year, 2017);
      assert.equal(one.favorite, true);
      assert.deepEqual(one.authors, [{ name: 'V' }]);
      assert.deepEqual(one.tags, ['nlp', 'x y', 'a,b']);
    }
  }
  env.abortAll();
});

test('live inserts, updates and deletes converge with Postgres; another user\'s rows never arrive', async () => {
  const { alice, bob, works } = await seed();
  const shapes = {
    works: new Shape(env.stream(alice, { table: 'works', where: 'read_status IN (\'unread\', \'reading\')', replica: 'full' })),
    annotations: new Shape(env.stream(alice, { table: 'annotations', where: 'work_id = $1', params: [works[0]] })),
    blobs: new Shape(env.stream(alice, { table: 'blobs_meta', where: 'size > 1000' })),
  };
  const seen = record(env.stream(alice, { table: 'works' }));
  await Promise.all(Object.values(shapes).map((s) => s.rows));

  const note = randomUUID();
  const newWork = randomUUID();
  await batch(env, alice, [
    // Moves into the filter (read -> unread), moves out (reading -> read), a new row, a delete.
    update('works', { id: works[1], read_status: 'unread', title: 'moved in' }),
    update('works', { id: works[2], read_status: 'read' }),
    insert('works', { id: newWork, title: 'new', year: 2024 }),
    insert('annotations', { id: note, work_id: works[0], kind: 'note', body: 'live' }),
    insert('blobs_meta', { id: randomUUID(), sha256: sha(3), size: 4096 }),
  ]);
  await batch(env, alice, [
    update('works', { id: works[0], title: 'renamed', tags: ['new', 'NULL', 'with "quote"'] }),
    update('annotations', { id: note, body: 'edited', geometry: { y: [1, 2] } }),
  ]);
  await batch(env, alice, [remove('annotations', { id: note }), remove('works', { id: newWork })]);
  // Bob writes into the same ids space and tables meanwhile.
  await batch(env, bob, [
    update('works', { id: works[1], read_status: 'unread', title: 'bob moved in' }),
    insert('works', { id: randomUUID(), title: 'bob new' }),
    insert('annotations', { id: randomUUID(), work_id: works[0], kind: 'note' }),
  ]);

  await converges(shapes.works, () => truth(env, 'works', alice, "read_status in ('unread', 'reading')"), 'works');
  await converges(shapes.annotations, () => truth(env, 'annotations', alice, 'work_id = $2', [works[0]]), 'annotations');
  await converges(shapes.blobs, () => truth(env, 'blobs_meta', alice, 'size > 1000'), 'blobs_meta');
  assert.equal(byTitle(shapes.works.currentRows, 'moved in').title, 'moved in');
  assert.deepEqual(shapes.works.currentRows.find((r) => r.id === works[0]).tags, ['new', 'NULL', 'with "quote"']);

  await eventually(() => seen.messages.some((m) => m.value?.title === 'bob moved in') === false && seen.messages.some((m) => m.value?.title === 'renamed'));
  for (const m of seen.messages) {
    if (m.value) assert.equal(m.value.owner_id ?? alice, alice, JSON.stringify(m));
    assert.ok(!JSON.stringify(m, (_, v) => (typeof v === 'bigint' ? String(v) : v)).includes(bob), 'bob leaked');
  }
  env.abortAll();
});

function byTitle(rows, title) {
  return rows.find((r) => r.title === title) ?? {};
}

test('a /v1/batch txid is recognisable in the stream (awaitTxId)', async () => {
  const alice = randomUUID();
  const stream = env.stream(alice, { table: 'works' });
  const seen = record(stream);
  await new Shape(stream).rows;
  const { txid } = await batch(env, alice, [insert('works', { id: randomUUID(), title: 'mine' })]);
  // What an app's awaitTxId does: wait for a change whose txids include the write's xid.
  const change = await eventually(
    () => seen.messages.find((m) => m.headers?.txids?.includes(xid32(txid))) ?? false,
    20_000,
    `txid ${txid}`,
  );
  assert.equal(change.value.title, 'mine');
  assert.equal(change.headers.operation, 'insert');
  env.abortAll();
});

test('resume from a saved handle and offset delivers the missed changes once', async () => {
  const alice = randomUUID();
  const ids = [randomUUID(), randomUUID(), randomUUID()];
  await batch(env, alice, [insert('works', { id: ids[0], title: 'first' }), insert('works', { id: ids[1], title: 'second' })]);
  const first = env.stream(alice, { table: 'works' });
  const firstShape = new Shape(first);
  const saved = Object.fromEntries((await firstShape.rows).map((r) => [r.id, r]));
  const handle = first.shapeHandle;
  const offset = first.lastOffset;
  assert.ok(handle && offset && offset !== '-1', `${handle} ${offset}`);
  env.abortAll();

  // While the client is away.
  await batch(env, alice, [insert('works', { id: ids[2], title: 'third' }), update('works', { id: ids[0], title: 'first!' })]);
  await batch(env, alice, [remove('works', { id: ids[1] })]);

  const resumed = env.stream(alice, { table: 'works' }, { handle, offset });
  const seen = record(resumed);
  await eventually(() => resumed.isUpToDate && seen.messages.some((m) => m.headers?.control === 'up-to-date'));
  const changes = seen.messages.filter((m) => m.headers?.operation);
  // Exactly the three missed changes, none of the rows the client already had re-sent as inserts.
  assert.deepEqual(
    changes.map((m) => [m.headers.operation, m.value.id]).sort(),
    [['delete', ids[1]], ['insert', ids[2]], ['update', ids[0]]].sort(),
  );
  assert.equal(resumed.shapeHandle, handle, 'the same shape continues');
  // Applying them to the saved rows gives Postgres's state.
  const rows = { ...saved };
  for (const m of changes) {
    if (m.headers.operation === 'delete') delete rows[m.value.id];
    else rows[m.value.id] = { ...(rows[m.value.id] ?? {}), ...m.value };
  }
  assert.deepEqual(rows, await truth(env, 'works', alice));
  env.abortAll();
});

test('a bad token reaches onError, and onError can retry with a fresh token', async () => {
  const alice = randomUUID();
  await batch(env, alice, [insert('works', { id: randomUUID(), title: 'x' })]);
  // No retry: onError sees the 401 and the stream stops.
  const errors = [];
  const stopped = env.stream(alice, { table: 'works' }, {
    headers: { Authorization: 'Bearer not-a-token' },
    onError: (e) => {
      errors.push(e);
    },
  });
  const seen = record(stopped);
  await eventually(() => errors.length > 0, 20_000, 'onError');
  assert.equal(errors[0].status, 401);
  assert.equal(seen.messages.length, 0);

  // Retry: the header is a function, onError swaps the token, the stream recovers.
  let token = env.server.token(alice, { ttl: -120 });
  let calls = 0;
  const recovering = env.stream(alice, { table: 'works' }, {
    headers: { Authorization: () => `Bearer ${token}` },
    onError: (e) => {
      calls += 1;
      assert.equal(e.status, 401);
      token = env.server.token(alice);
      return {};
    },
  });
  const shape = new Shape(recovering);
  const rows = await shape.rows;
  assert.equal(rows.length, 1);
  assert.equal(calls, 1);
  env.abortAll();
});

test('server-sent events (liveSse) converge as well', async () => {
  const alice = randomUUID();
  const stream = env.stream(alice, { table: 'works' }, { liveSse: true });
  const shape = new Shape(stream);
  await shape.rows;
  const id = randomUUID();
  await batch(env, alice, [insert('works', { id, title: 'over sse' })]);
  await batch(env, alice, [update('works', { id, title: 'over sse 2' })]);
  await converges(shape, () => truth(env, 'works', alice));
  env.abortAll();
});
