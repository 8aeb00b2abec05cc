// Shared helpers: a real deeprecall-sync server (clients/test-server.mjs) with its own Postgres, the unmodified
// @electric-sql/client pointed at it, writes through POST /v1/batch, and the truth read from Postgres with `pg`.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';

import { Shape, ShapeStream } from '@electric-sql/client';
import pg from 'pg';

import { startServer } from '../../test-server.mjs';

// The truth in the form the client produces after parsing Electric's text values: timestamps and dates stay
// strings, int8 becomes a BigInt, jsonb an object, arrays arrays.
pg.types.setTypeParser(1184, (v) => v); // timestamptz
pg.types.setTypeParser(1114, (v) => v); // timestamp
pg.types.setTypeParser(1082, (v) => v); // date
pg.types.setTypeParser(20, (v) => BigInt(v)); // int8

/** Starts a server (fast live hold, so idle long-polls cycle quickly) and a superuser connection for the truth. */
export async function setup({ args = [] } = {}) {
  const server = await startServer({ args: ['--shape-live-hold-ms', '3000', ...args] });
  // The same session settings as the server's connections, so timestamps print the same way.
  const db = new pg.Client({
    connectionString: server.databaseUrl,
    options: '-c TimeZone=UTC -c DateStyle=ISO,MDY -c extra_float_digits=3',
  });
  await db.connect();
  const aborts = [];
  return {
    server,
    db,
    shapeUrl: `${server.url}/v1/shape`,
    /** A ShapeStream for `userId`; aborted by `teardown`. */
    stream(userId, params, extra = {}) {
      const abort = new AbortController();
      aborts.push(abort);
      return new ShapeStream({
        url: `${server.url}/v1/shape`,
        params,
        headers: { Authorization: `Bearer ${server.token(userId)}` },
        signal: abort.signal,
        ...extra,
      });
    },
    abortAll() {
      for (const a of aborts.splice(0)) a.abort();
    },
    async teardown() {
      for (const a of aborts.splice(0)) a.abort();
      await db.end().catch(() => {});
      await server.stop();
    },
  };
}

/** POST /v1/batch as `userId`; returns the response body (asserts 200). */
export async function batch(env, userId, ops) {
  const res = await fetch(`${env.server.url}/v1/batch`, {
    method: 'POST',
    headers: {
      Authorization: `Bearer ${env.server.token(userId)}`,
      'Content-Type': 'application/json',
    },
    body: JSON.stringify({ ops: ops.map((o) => ({ op_id: randomUUID(), ...o })) }),
  });
  const body = await res.json();
  assert.equal(res.status, 200, JSON.stringify(body));
  return body;
}

export const insert = (table, row) => ({ table, kind: 'insert', row });
export const update = (table, row) => ({ table, kind: 'update', row });
export const remove = (table, row) => ({ table, kind: 'delete', row });

/** `userId`'s rows of `table` matching `cond` (SQL with $2… for `params`), by id. */
export async function truth(env, table, userId, cond = 'true', params = []) {
  const { rows } = await env.db.query(
    `select * from ${table} where owner_id = $1 and (${cond})`,
    [userId, ...params],
  );
  return byId(rows);
}

/** Rows (objects with an `id`) as a plain object keyed by id. */
export function byId(rows) {
  const out = {};
  for (const r of rows) out[r.id] = { ...r };
  return out;
}

/** Polls `check` (which throws or returns false while not yet true) until it passes or `timeoutMs` elapses. */
export async function eventually(check, timeoutMs = 20_000, what = 'condition') {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const ok = await check();
      if (ok !== false) return ok;
      last = new Error(`${what} not met yet`);
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}: ${last?.message ?? last}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Waits until the Shape holds exactly `want()` (re-read each time). */
export async function converges(shape, want, what = 'shape = Postgres') {
  await eventually(async () => {
    const expected = await want();
    assert.deepEqual(byId(shape.currentRows), expected);
    return true;
  }, 20_000, what);
}

/** Records every message a stream delivers (subscribed before it starts). */
export function record(stream) {
  const messages = [];
  const errors = [];
  stream.subscribe(
    (batch) => {
      messages.push(...batch);
    },
    (err) => errors.push(err),
  );
  return { messages, errors };
}

/** The 32-bit xid Electric puts in `txids`, from the 64-bit `txid` that /v1/batch returns. */
export const xid32 = (txid) => Number(BigInt(txid) & 0xffffffffn);

export { Shape, ShapeStream, randomUUID };
