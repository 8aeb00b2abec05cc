import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TokenSource, readClaims, refreshAtMs } from '../../src/token.js';

function jwt(claims: Record<string, unknown>): string {
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}.sig`;
}

test('readClaims reads sub, exp, iat and refuses what is not a JWT', () => {
  assert.deepEqual(readClaims(jwt({ sub: 'u', exp: 100, iat: 40 })), { sub: 'u', exp: 100, iat: 40 });
  assert.deepEqual(readClaims(jwt({ sub: 'ü-ser', exp: 100 })), { sub: 'ü-ser', exp: 100 });
  assert.equal(readClaims('a.b'), null);
  assert.equal(readClaims('one.two.three.four.five'), null, 'a NextAuth JWE is not a token');
  assert.equal(readClaims(jwt({ exp: 100 })), null);
  assert.equal(readClaims(jwt({ sub: 'u', exp: '100' })), null);
});

test('refresh a minute early, or after three quarters of a short lifetime', () => {
  assert.equal(refreshAtMs({ sub: 'u', iat: 0, exp: 3600 }, 0), 3_540_000);
  assert.equal(refreshAtMs({ sub: 'u', iat: 100, exp: 105 }, 100_000), 103_750);
  // Without iat, the time we obtained it stands in.
  assert.equal(refreshAtMs({ sub: 'u', exp: 20 }, 0), 15_000);
});

test('TokenSource caches while fresh, shares concurrent calls, refetches after invalidate', async () => {
  let now = 0;
  let calls = 0;
  const src = new TokenSource(async () => {
    calls++;
    await new Promise((r) => setTimeout(r, 5));
    return jwt({ sub: 'u', iat: now / 1000, exp: now / 1000 + 100 });
  }, () => now);
  const [a, b] = await Promise.all([src.get(), src.get()]);
  assert.equal(calls, 1);
  assert.ok(a.ok && b.ok && a.token === b.token);
  now = 50_000;
  await src.get();
  assert.equal(calls, 1, 'still fresh');
  now = 80_000;
  await src.get();
  assert.equal(calls, 2, 'due for refresh after 3/4 of the lifetime');
  src.invalidate();
  await src.get();
  assert.equal(calls, 3);
});

test('TokenSource: null = signed out, throw = unavailable, garbage = malformed', async () => {
  assert.deepEqual((await new TokenSource(async () => null).get()).ok, false);
  const out = await new TokenSource(async () => null).get();
  assert.ok(!out.ok && out.problem === 'signed_out');
  const down = await new TokenSource(async () => {
    throw new Error('offline');
  }).get();
  assert.ok(!down.ok && down.problem === 'unavailable' && /offline/.test(down.message));
  const bad = await new TokenSource(async () => 'cookie-value').get();
  assert.ok(!bad.ok && bad.problem === 'malformed');
});
