// Large transactions in parts (docs/protocol.md, "Large transactions in parts"), in headless Chromium against a
// real server started with a tiny `--transaction-part-bytes`, so that one batch of ~50 works with long abstracts
// reaches the devices as several `txn` frames. Both devices must converge with Postgres, the writer's own ops must
// settle by xid at the last part, and no stored offset may be missing.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { startHarness, waitFor } from './harness.mjs';

const PART_BYTES = 4096;
const N = 50;

let h;
before(async () => {
  h = await startHarness({ serverArgs: ['--transaction-part-bytes', String(PART_BYTES)] });
});
after(async () => {
  await h?.stop();
});

/** The device's synced works (what the applier stored), by id. */
const deviceWorks = (dev) =>
  dev.eval(async () => (await window.app.sync.db.table('works').toArray()).map((r) => ({ id: r.id, title: r.title, abstract: r.abstract })));

/** Whether the device holds exactly Postgres's works of the user. */
async function converged(dev, user) {
  const truth = (await h.pgRows('works', user)).map((r) => ({ id: r.id, title: r.title, abstract: r.abstract }));
  const mine = (await deviceWorks(dev)).sort((a, b) => a.id.localeCompare(b.id));
  return JSON.stringify(mine) === JSON.stringify(truth);
}

/** Every stored subscription offset is a string (none undefined or missing after parts). */
const storedOffsets = (dev) =>
  dev.eval(async () =>
    (await window.app.sync.db.table('deeprecall_state').toArray()).filter((s) => s.key.startsWith('sub:')).map((s) => [s.key, typeof s.offset, s.offset]),
  );

/** Writes on the device in one write() (one batch, one transaction), waits for its echo; returns the txids. */
const writeAndAwait = (dev, ops) =>
  dev.eval(async (list) => {
    const { sync } = window.app;
    await sync.write(list);
    const txids = await sync.flush();
    for (const t of txids) await sync.awaitTxId(t, { timeoutMs: 20_000 });
    return txids;
  }, ops);

/** The parts a device received for one xid. */
const partsOf = (dev, xid) => dev.txnFrames.filter((f) => f.xid === xid);

describe('transactions in parts', { concurrency: false }, () => {
  test('a batch of 50 large works arrives in parts; both devices converge with Postgres through insert, update, delete', async () => {
    const user = randomUUID();
    const d1 = await h.device({ user });
    const d2 = await h.device({ user });
    try {
      await Promise.all([d1.waitLive(), d2.waitLive()]);
      const ids = Array.from({ length: N }, () => randomUUID());
      const abstract = (i, v) => `${v} ${i}: ${'representation learning '.repeat(45)}`; // ~1.1 kB per row

      // Insert: one batch from device 1.
      const [insertTxid, ...more] = await writeAndAwait(
        d1,
        ids.map((id, i) => ({ table: 'works', kind: 'insert', row: { id, title: `Large ${String(i).padStart(2, '0')}`, abstract: abstract(i, 'v1') } })),
      );
      assert.deepEqual(more, [], 'one request, one transaction');
      await waitFor('device 2 has the 50 works', () => converged(d2, user), { timeoutMs: 20_000 });
      assert.ok(await converged(d1, user), 'device 1 equals Postgres');
      assert.equal((await h.pgRows('works', user)).length, N);
      for (const dev of [d1, d2]) {
        const parts = partsOf(dev, insertTxid);
        assert.ok(parts.length >= 3, `the transaction came in parts (${parts.length} frames)`);
        assert.ok(parts.slice(0, -1).every((p) => p.more === true && p.offset === undefined), 'every part but the last: more, no offset');
        const last = parts.at(-1);
        assert.ok(last.more === undefined && typeof last.offset === 'string', 'the last part carries the offset');
        assert.deepEqual(parts.map((p) => p.part), parts.map((_, i) => i), 'parts in order');
        assert.equal(parts.reduce((n, p) => n + p.changes, 0), N, 'every change once');
      }
      // Device 1's own ops were settled by the echo (the last part), not left for the sweep.
      assert.equal(await d1.eval(() => window.app.sync.db.table('deeprecall_outbox').count()), 0);
      for (const dev of [d1, d2]) {
        const offsets = await storedOffsets(dev);
        assert.ok(offsets.length > 0 && offsets.every(([, type]) => type === 'string'), JSON.stringify(offsets));
        const works = offsets.find(([key]) => key === 'sub:works');
        assert.equal(works[2], partsOf(dev, insertTxid).at(-1).offset, 'the works offset is the last part\'s');
      }

      // Update all of them from device 2, in one batch.
      const [updateTxid] = await writeAndAwait(
        d2,
        ids.map((id, i) => ({ table: 'works', kind: 'update', row: { id, abstract: abstract(i, 'v2') } })),
      );
      await waitFor('device 1 has the updates', () => converged(d1, user), { timeoutMs: 20_000 });
      assert.ok(await converged(d2, user));
      assert.ok((await h.pgRows('works', user)).every((r) => r.abstract.startsWith('v2 ')));
      assert.ok(partsOf(d1, updateTxid).length >= 3, 'the update came in parts too');

      // A reload of device 2 resumes from its stored offset (the last part's) without a refetch.
      await d2.page.reload();
      await d2.page.waitForSelector('body[data-ready="true"]', { timeout: 30_000 });
      await d2.waitLive();
      assert.ok(await converged(d2, user));

      // Delete them all from device 1.
      await writeAndAwait(d1, ids.map((id) => ({ table: 'works', kind: 'delete', row: { id } })));
      await waitFor('device 2 has no works', () => converged(d2, user), { timeoutMs: 20_000 });
      assert.equal((await h.pgRows('works', user)).length, 0);
      assert.deepEqual(await deviceWorks(d1), []);
      assert.deepEqual(await deviceWorks(d2), []);
      assert.equal(await h.seqCount(user), 3 * N, 'each op applied once');
      for (const dev of [d1, d2]) assert.deepEqual(await dev.eval(() => window.app.events.rejected), []);
    } finally {
      await Promise.all([d1.close(), d2.close()]);
    }
  });
});
