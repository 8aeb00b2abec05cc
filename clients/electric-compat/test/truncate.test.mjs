// TRUNCATE of a synced table: every shape on it gets 409 must-refetch (a held long-poll promptly), the unmodified
// client clears its rows and refetches, and then follows live writes to Postgres's state again. Own server: a
// TRUNCATE affects every user of the table.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Shape, batch, converges, eventually, insert, randomUUID, record, setup, truth } from './helpers.mjs';

let env;
before(async () => {
  env = await setup();
});
after(async () => {
  await env?.teardown();
});

test('TRUNCATE makes shapes refetch and converge', async () => {
  const [alice, bob] = [randomUUID(), randomUUID()];
  await batch(env, alice, [insert('works', { id: randomUUID(), title: 'a1' }), insert('works', { id: randomUUID(), title: 'a2' })]);
  await batch(env, bob, [insert('works', { id: randomUUID(), title: 'b1' })]);
  const streams = [env.stream(alice, { table: 'works' }), env.stream(bob, { table: 'works', where: "title LIKE 'b%' OR true" })];
  // The second one is refused (LIKE is outside the grammar): shows a 400 reaches the app as an error.
  const refused = record(streams[1]);
  const stream = streams[0];
  const seen = record(stream);
  const shape = new Shape(stream);
  assert.equal((await shape.rows).length, 2);
  await eventually(() => refused.errors.length > 0, 20_000, 'the 400');
  assert.equal(refused.errors[0].status, 400);

  const handleBefore = stream.shapeHandle;
  // Let the stream settle into a held live request, then truncate under it.
  await new Promise((r) => setTimeout(r, 500));
  await env.db.query('truncate works cascade');
  await eventually(() => seen.messages.some((m) => m.headers?.control === 'must-refetch'), 20_000, 'must-refetch');
  await converges(shape, () => truth(env, 'works', alice), 'empty after truncate');
  assert.notEqual(stream.shapeHandle, handleBefore, 'a new handle after the refetch');

  await batch(env, alice, [insert('works', { id: randomUUID(), title: 'after' })]);
  await converges(shape, () => truth(env, 'works', alice), 'live again after the refetch');
  assert.equal(shape.currentRows.length, 1);
  assert.equal(shape.currentRows[0].title, 'after');
  env.abortAll();
});
