import assert from 'node:assert/strict';
import { test } from 'node:test';
import { backoffDelay } from '../../src/backoff.js';
import { TokenSource } from '../../src/token.js';
import { Transport, classify } from '../../src/transport.js';

const err = (code: string) => ({ code, message: code });

test('classify: what each answer means for a retry', () => {
  assert.equal(classify(422, err('constraint_violation')).kind, 'rejected');
  assert.equal(classify(409, err('conflict')).kind, 'rejected');
  assert.equal(classify(409, err('retry')).kind, 'transient');
  assert.equal(classify(503, err('database_unavailable')).kind, 'transient');
  assert.equal(classify(500, err('internal')).kind, 'transient');
  assert.equal(classify(429, err('slow_down')).kind, 'transient');
  assert.equal(classify(413, err('too_many_ops')).kind, 'too_large');
  assert.equal(classify(401, err('invalid_subject')).kind, 'auth');
  const gap = classify(409, { code: 'seq_gap', message: 'resend from seq 5', last_seq: 4 });
  assert.ok(gap.kind === 'seq_gap' && gap.lastSeq === 4);
  assert.equal(classify(409, err('seq_gap')).kind, 'rejected', 'a seq_gap without last_seq cannot be repaired');
});

test('a batch with client_id sends it and each op\'s seq; seq_gap carries the server\'s last_seq', async () => {
  const src = new TokenSource(async () => jwt('u', Math.floor(Date.now() / 1000) + 600));
  const bodies: unknown[] = [];
  const t = new Transport('http://sync.test', src, (async (_u: string, init: RequestInit) => {
    bodies.push(JSON.parse(String(init.body)));
    return new Response(JSON.stringify({ error: { code: 'seq_gap', message: 'gap', last_seq: 4 } }), { status: 409 });
  }) as typeof fetch);
  const out = await t.batch('dev', [{ op_id: 'o1', seq: 7, table: 'works', kind: 'insert', row: { id: 'w' } }], 'client-1');
  assert.deepEqual(bodies[0], { client_id: 'client-1', device_id: 'dev', ops: [{ op_id: 'o1', seq: 7, table: 'works', kind: 'insert', row: { id: 'w' } }] });
  assert.ok(out.kind === 'seq_gap' && out.lastSeq === 4 && out.status === 409);
});

function jwt(sub: string, exp: number): string {
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub, exp, iat: exp - 600 })}.sig`;
}

test('a 401 token_expired gets a fresh token from getToken() and the same request once more', async () => {
  const tokens: string[] = [];
  let n = 0;
  const src = new TokenSource(async () => jwt('u', Math.floor(Date.now() / 1000) + 600 + n++));
  const seen: Array<{ auth: string; body: string }> = [];
  const fakeFetch = (async (_url: string, init: RequestInit) => {
    const auth = (init.headers as Record<string, string>)['authorization'] ?? '';
    seen.push({ auth, body: String(init.body) });
    tokens.push(auth);
    if (seen.length === 1) {
      return new Response(JSON.stringify({ error: { code: 'token_expired', message: 'token expired' } }), { status: 401 });
    }
    return new Response(JSON.stringify({ txid: '7', results: [] }), { status: 200 });
  }) as typeof fetch;
  const t = new Transport('http://sync.test', src, fakeFetch);
  const out = await t.batch('dev', [{ op_id: 'o1', table: 'works', kind: 'insert', row: { id: 'w' } }]);
  assert.equal(out.kind, 'ok');
  assert.equal(seen.length, 2);
  assert.notEqual(seen[0]?.auth, seen[1]?.auth, 'a new token the second time');
  assert.equal(seen[0]?.body, seen[1]?.body, 'the same ops, the same op ids');
});

test('network failures are transient; error bodies carry op_index', async () => {
  const src = new TokenSource(async () => jwt('u', Math.floor(Date.now() / 1000) + 600));
  const down = new Transport('http://sync.test', src, (async () => {
    throw new TypeError('Failed to fetch');
  }) as typeof fetch);
  const a = await down.batch('dev', []);
  assert.equal(a.kind, 'transient');
  const refusing = new Transport('http://sync.test', src, (async () =>
    new Response(JSON.stringify({ error: { code: 'foreign_key_violation', message: 'fk', op_index: 3 } }), { status: 422 })) as typeof fetch);
  const b = await refusing.batch('dev', []);
  assert.ok(b.kind === 'rejected' && b.error.op_index === 3 && b.status === 422);
  const busy = new Transport('http://sync.test', src, (async () =>
    new Response('{"error":{"code":"database_unavailable","message":"later"}}', { status: 503, headers: { 'retry-after': '7' } })) as typeof fetch);
  const c = await busy.batch('dev', []);
  assert.ok(c.kind === 'transient' && c.retryAfterMs === 7000);
});

test('no token: auth outcome without a request', async () => {
  let requests = 0;
  const t = new Transport('http://sync.test', new TokenSource(async () => null), (async () => {
    requests++;
    return new Response('{}');
  }) as typeof fetch);
  const out = await t.batch('dev', []);
  assert.ok(out.kind === 'auth' && out.problem === 'signed_out');
  assert.equal(requests, 0);
});

test('backoff grows exponentially with jitter and is capped', () => {
  assert.equal(backoffDelay(0, { baseMs: 500, maxMs: 30_000 }, () => 0), 250);
  assert.equal(backoffDelay(0, { baseMs: 500, maxMs: 30_000 }, () => 0.999999), 500);
  assert.equal(backoffDelay(3, { baseMs: 500, maxMs: 30_000 }, () => 0), 2000);
  assert.equal(backoffDelay(50, { baseMs: 500, maxMs: 30_000 }, () => 1), 30_000);
  for (let i = 0; i < 10; i++) {
    const d = backoffDelay(i);
    assert.ok(d > 0 && d <= 30_000);
  }
});
