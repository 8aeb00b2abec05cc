// Issue 8's end-to-end scenarios, in headless Chromium against a real server and Postgres. The page (examples/)
// is served from another origin than the sync server; every browser context is a separate device.
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { sleep, startHarness, waitFor } from './harness.mjs';

let h;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.stop();
});

const hasTitle = (dev, title) => async () => (await dev.titles()).includes(title);

describe('sync client in a real browser', { concurrency: false }, () => {
  test('1: two devices of one user and one of another: insert, update, delete', async () => {
    const alice = randomUUID();
    const bob = randomUUID();
    const d1 = await h.device({ user: alice });
    const d2 = await h.device({ user: alice });
    const d3 = await h.device({ user: bob });
    try {
      await Promise.all([d1.waitLive(), d2.waitLive(), d3.waitLive()]);
      // The page's origin is not the API's: every call below is cross-origin.
      assert.notEqual(new URL(d1.page.url()).origin, new URL(h.server.url).origin);

      // Insert through the UI: on device 1 at once (before any server round trip completes).
      await d1.page.fill('#title', 'Attention Is All You Need');
      const clicked = Date.now();
      await d1.page.click('#add button');
      await waitFor('the row on device 1', hasTitle(d1, 'Attention Is All You Need'), { timeoutMs: 2_000 });
      const localMs = Date.now() - clicked;
      assert.ok(localMs < 2_000, `visible locally after ${localMs} ms`);
      await waitFor('the row on device 2', hasTitle(d2, 'Attention Is All You Need'), { timeoutMs: 10_000 });
      const [row] = await h.pgRows('works', alice);
      assert.equal(row.title, 'Attention Is All You Need');
      assert.equal(row.owner_id, alice);

      // Update on device 2, through the edit form.
      await d2.page.click(`#works li[data-id="${row.id}"] .edit`);
      await d2.page.fill(`#works li[data-id="${row.id}"] .edit-title`, 'Attention Is All You Need (v5)');
      await d2.page.click(`#works li[data-id="${row.id}"] .save`);
      await waitFor('the update on device 2', hasTitle(d2, 'Attention Is All You Need (v5)'), { timeoutMs: 2_000 });
      await waitFor('the update on device 1', hasTitle(d1, 'Attention Is All You Need (v5)'), { timeoutMs: 10_000 });
      assert.deepEqual((await h.pgRows('works', alice)).map((r) => r.title), ['Attention Is All You Need (v5)']);

      // Bob's device stays live and sees his own write, never Alice's.
      await d3.page.fill('#title', 'Bob reads Hinton');
      await d3.page.click('#add button');
      await waitFor('bob’s own row', async () => {
        const rows = await h.pgRows('works', bob);
        return rows.length === 1 && (await d3.eval(() => window.app.sync.pendingCount())) === 0;
      });

      // Delete on device 1.
      await d1.page.click(`#works li[data-id="${row.id}"] .delete`);
      await waitFor('the delete on device 1', async () => (await d1.titles()).length === 0, { timeoutMs: 2_000 });
      await waitFor('the delete on device 2', async () => (await d2.titles()).length === 0, { timeoutMs: 10_000 });
      assert.equal((await h.pgRows('works', alice)).length, 0);

      // Bob's device never held any of Alice's rows, in the page or in its database.
      assert.deepEqual(await d3.titles(), ['Bob reads Hinton']);
      const bobDb = await d3.eval(async () => (await window.app.sync.db.table('works').toArray()).map((r) => r.owner_id));
      assert.deepEqual(bobDb, [bob]);
    } finally {
      await Promise.all([d1.close(), d2.close(), d3.close()]);
    }
  });

  test('2: offline writes survive a reload and reach Postgres exactly once', async () => {
    const user = randomUUID();
    const d1 = await h.device({ user });
    const d2 = await h.device({ user });
    try {
      await Promise.all([d1.waitLive(), d2.waitLive()]);
      // The service worker must hold the app shell before the network goes away.
      await d1.eval(() => navigator.serviceWorker.ready.then(() => true));
      await waitFor('sw controls the page', () => d1.eval(async () => {
        const cache = await caches.open('deeprecall-example-v1');
        return (await cache.keys()).length >= 3;
      }));

      await d1.context.setOffline(true);
      await waitFor('offline state', async () => (await d1.state()) === 'offline', { timeoutMs: 5_000 });
      for (const t of ['Offline one', 'Offline two', 'Offline three']) {
        await d1.page.fill('#title', t);
        await d1.page.click('#add button');
        await waitFor(`${t} shown`, hasTitle(d1, t), { timeoutMs: 2_000 });
      }
      assert.equal(await d1.eval(() => window.app.sync.pendingCount()), 3);

      // Reload while offline: the page comes from the service worker, the writes from IndexedDB.
      await d1.page.reload();
      await d1.page.waitForSelector('body[data-ready="true"]', { timeout: 30_000 });
      await waitFor('rows after the offline reload', async () => {
        const titles = await d1.titles();
        return ['Offline one', 'Offline two', 'Offline three'].every((t) => titles.includes(t));
      });
      assert.equal(await d1.state(), 'offline');
      assert.equal(await d1.eval(() => window.app.sync.userId), user, 'the offline start kept the signed-in user');
      assert.equal((await h.pgRows('works', user)).length, 0, 'nothing reached the server while offline');

      await d1.context.setOffline(false);
      await waitFor('three rows in Postgres', async () => (await h.pgRows('works', user)).length === 3, { timeoutMs: 20_000 });
      await waitFor('device 2 sees them', async () => (await d2.titles()).length === 3, { timeoutMs: 10_000 });
      await waitFor('device 1 live and drained', async () =>
        (await d1.state()) === 'live' && (await d1.eval(() => window.app.sync.pendingCount())) === 0, { timeoutMs: 20_000 });
      await sleep(500);
      const rows = await h.pgRows('works', user);
      assert.deepEqual(rows.map((r) => r.title).sort(), ['Offline one', 'Offline three', 'Offline two']);
      assert.equal(await h.seqCount(user), 3, 'each op applied exactly once (one seq each)');
      assert.equal(await h.ledgerCount(user), 0, 'sent with client_id + seq, not by op_id');
      assert.deepEqual((await d2.titles()).sort(), ['Offline one', 'Offline three', 'Offline two']);
    } finally {
      await Promise.all([d1.close(), d2.close()]);
    }
  });

  test('3: a guest works locally, signs in, and the work becomes the user’s', async () => {
    const user = randomUUID();
    const g = await h.device({ user, signedIn: false });
    try {
      assert.equal(await g.state(), 'guest');
      const ids = await g.eval(async () => {
        const { sync } = window.app;
        const [work] = await sync.write([{ table: 'works', kind: 'insert', row: { title: 'Guest paper', year: 2015 } }]);
        await sync.write([
          { table: 'annotations', kind: 'insert', row: { work_id: work.rowId, page: 2, kind: 'highlight', quote: 'representation learning' } },
          { table: 'annotations', kind: 'insert', row: { work_id: work.rowId, page: 3, kind: 'note', body: 'read again' } },
        ]);
        await sync.write([{ table: 'works', kind: 'update', row: { id: work.rowId, read_status: 'reading' } }]);
        return { work: work.rowId, dbName: sync.db.name };
      });
      assert.equal(ids.dbName, `deeprecall_guest_${await g.eval(() => window.app.deviceId)}`);
      await waitFor('guest row shown', hasTitle(g, 'Guest paper'));
      const guestRows = await g.eval(() => window.app.sync.rows('annotations'));
      assert.equal(guestRows.length, 2);
      assert.ok(guestRows.every((r) => !('owner_id' in r)), 'a guest holds no owner ids');
      await sleep(300);
      assert.deepEqual(g.requests, [], 'a guest sends nothing to the server');
      assert.equal((await h.db.query('select count(*) from works where id = $1', [ids.work])).rows[0].count, '0');

      // Sign in (the page sets its "session", then calls sync.signIn()).
      await g.page.click('#sign-in');
      await waitFor('signed in', async () => (await g.eval(() => window.app.sync.userId)) === user, { timeoutMs: 30_000 });
      const works = await h.pgRows('works', user);
      assert.equal(works.length, 1);
      assert.equal(works[0].id, ids.work);
      assert.equal(works[0].read_status, 'reading');
      const annotations = await h.pgRows('annotations', user);
      assert.equal(annotations.length, 2);
      assert.ok(annotations.every((a) => a.owner_id === user && a.work_id === ids.work));
      assert.equal(await h.seqCount(user), 4, 'the guest outbox\'s four ops, once each');
      assert.equal(await h.ledgerCount(user), 0);
      const dbs = await g.eval(async () => (await indexedDB.databases()).map((d) => d.name));
      assert.ok(!dbs.some((n) => n.startsWith('deeprecall_guest_')), `guest database deleted (have ${dbs})`);
      assert.equal(await g.eval(() => window.app.sync.db.name), `deeprecall_${user}_${await g.eval(() => window.app.deviceId)}`);
      assert.deepEqual(await g.titles(), ['Guest paper']);

      // A second device of the user receives the work.
      const d2 = await h.device({ user });
      try {
        await d2.waitLive();
        await waitFor('second device has the work', hasTitle(d2, 'Guest paper'));
        assert.equal((await d2.eval(() => window.app.sync.rows('annotations'))).length, 2);
        // Running signIn() again creates nothing.
        await g.eval(() => window.app.sync.signIn());
        await sleep(300);
        assert.equal((await h.pgRows('works', user)).length, 1);
        assert.equal(await h.seqCount(user), 4);
      } finally {
        await d2.close();
      }
      assert.deepEqual(await g.eval(() => window.app.events.rejected), []);
    } finally {
      await g.close();
    }
  });

  test('3b: a sign-in interrupted half-way (page closed during the flush) and run again duplicates nothing', async () => {
    const user = randomUUID();
    const N = 120;
    const g = await h.device({ user, signedIn: false, batch: 10 });
    try {
      await g.eval(async (n) => {
        const ops = [];
        for (let i = 0; i < n; i++) ops.push({ table: 'works', kind: 'insert', row: { title: `Guest work ${String(i).padStart(3, '0')}` } });
        await window.app.sync.write(ops);
      }, N);
      assert.equal(await g.eval(() => window.app.sync.pendingCount()), N);
      // Slow every batch down so that the page can be closed between two of them.
      await g.context.route(`${h.server.url}/v1/batch`, async (route) => {
        await sleep(250);
        await route.continue().catch(() => {});
      });
      await g.page.evaluate(() => {
        localStorage.setItem('example:signed-in-user', new URLSearchParams(location.search).get('user'));
        void window.app.sync.signIn().catch(() => {});
      });
      const partial = await waitFor('a part of the guest work committed', async () => {
        const n = (await h.pgRows('works', user)).length;
        return n >= 20 && n < N ? n : 0;
      }, { timeoutMs: 30_000, intervalMs: 20 });
      await g.page.close();
      const atClose = (await h.pgRows('works', user)).length;
      assert.ok(atClose >= partial && atClose < N, `interrupted half-way (${atClose} of ${N} committed)`);
      await g.context.unroute(`${h.server.url}/v1/batch`);

      // The next start with a token finds the guest database and finishes the upgrade.
      await g.open();
      await waitFor('upgrade finished', async () => {
        const dbs = await g.eval(async () => (await indexedDB.databases()).map((d) => d.name));
        return !dbs.some((n) => n.startsWith('deeprecall_guest_'));
      }, { timeoutMs: 60_000 });
      await waitFor('all rows in Postgres', async () => (await h.pgRows('works', user)).length === N, { timeoutMs: 30_000 });
      await waitFor('all rows on the page', async () => (await g.titles()).length === N, { timeoutMs: 30_000 });
      const rows = await h.pgRows('works', user);
      assert.equal(new Set(rows.map((r) => r.title)).size, N, 'every work exactly once');
      assert.equal(await h.seqCount(user), N, 'every op applied exactly once');
      assert.equal(await h.clientCount(user), 1, 'one sequence: the guest outbox\'s, resumed after the interruption');
      assert.deepEqual(await g.eval(() => window.app.events.rejected), [], 'no op was refused (no insert ran twice)');
      // And once more, for good measure.
      await g.eval(() => window.app.sync.signIn());
      assert.equal((await h.pgRows('works', user)).length, N);
    } finally {
      await g.close();
    }
  });

  test('3c: a guest\'s bad blob reports and a 413 do not block the sign-in; an asset without its blob shell keeps its highlights', async () => {
    const user = randomUUID();
    const hex = () => randomBytes(32).toString('hex');
    const good = Array.from({ length: 1001 }, () => hex()); // one more than the server takes per request
    const [pageCount, upper, nul, missing] = [hex(), hex().toUpperCase(), hex(), hex()];
    // The client is configured for 2000 per request (the page's maxOpsPerBatch): the server answers 413 too_many_blobs.
    const g = await h.device({ user, signedIn: false, batch: 2000 });
    try {
      const ids = await g.eval(async ({ good, pageCount, upper, nul, missing }) => {
        window.app.localBlobs = async () => [
          ...good.map((sha256, i) => ({ sha256, size: 1000 + i, mime: 'application/pdf', filename: `paper-${i}.pdf` })),
          { sha256: pageCount, size: 1, page_count: -1 }, // server: 400 invalid_value, page_count must be >= 0
          { sha256: good[0], size: 1000 }, // server: 422 duplicate_sha256
          { sha256: upper, size: 2 }, // server: 422 invalid_sha256
          { sha256: nul, size: 3, path: '/cas/a\u0000b' }, // server: 400 invalid_value (U+0000)
          { sha256: 'not-a-sha256', size: 4 },
        ];
        const { sync } = window.app;
        const [work] = await sync.write([{ table: 'works', kind: 'insert', row: { title: 'Guest with files' } }]);
        const [shelled, shell_less] = await sync.write([
          { table: 'assets', kind: 'insert', row: { sha256: good[0], work_id: work.rowId, filename: 'paper-0.pdf' } },
          { table: 'assets', kind: 'insert', row: { sha256: missing, work_id: work.rowId, filename: 'gone.pdf' } },
        ]);
        const [a1, a2, a3] = await sync.write([
          { table: 'annotations', kind: 'insert', row: { work_id: work.rowId, asset_id: shelled.rowId, sha256: good[0], page: 1, quote: 'kept' } },
          { table: 'annotations', kind: 'insert', row: { work_id: work.rowId, asset_id: shell_less.rowId, sha256: missing, page: 2, geometry: { x: 10, y: 20 }, quote: 'survives' } },
          { table: 'annotations', kind: 'insert', row: { work_id: work.rowId, asset_id: shell_less.rowId, sha256: missing, page: 3 } },
        ]);
        return { work: work.rowId, shelled: shelled.rowId, shellLess: shell_less.rowId, a1: a1.rowId, a2: a2.rowId, a3: a3.rowId };
      }, { good, pageCount, upper, nul, missing });

      await g.page.click('#sign-in');
      await waitFor('signed in', async () => (await g.eval(() => window.app.sync.userId)) === user, { timeoutMs: 60_000 });
      assert.deepEqual(await g.eval(() => window.app.events.errors.filter((e) => e.source === 'page' || e.source === 'upgrade')), []);

      // The blobs: 1001 + the repaired page_count + the lowered sha256 + the one without its path; 413 then halves.
      const meta = (await h.db.query('select sha256, page_count from blobs_meta where owner_id = $1', [user])).rows;
      assert.equal(meta.length, 1004);
      assert.equal(meta.find((m) => m.sha256 === pageCount).page_count, null);
      assert.ok(meta.some((m) => m.sha256 === upper.toLowerCase()));
      assert.ok(meta.some((m) => m.sha256 === nul));
      assert.deepEqual(g.requests.filter((r) => r === 'POST /v1/blobs/coordinate').length, 3, 'refused with 413, then two halves');
      const told = await g.eval(() => window.app.events.blobRejected.map((r) => [r.code, r.sent === null]));
      assert.deepEqual(told.sort(), [['duplicate_sha256', false], ['invalid_sha256', true], ['invalid_value', false], ['invalid_value', false]]);

      // The asset without a shell is refused; its highlights are not lost with it.
      assert.deepEqual((await h.pgRows('assets', user)).map((a) => a.id), [ids.shelled]);
      const rejected = await g.eval(() => window.app.events.rejected.map((r) => [r.table, r.rowId, r.code]));
      assert.deepEqual(rejected, [['assets', ids.shellLess, 'foreign_key_violation']]);
      const anns = new Map((await h.pgRows('annotations', user)).map((a) => [a.id, a]));
      assert.equal(anns.size, 3, 'every highlight reached Postgres');
      assert.equal(anns.get(ids.a1).asset_id, ids.shelled);
      for (const id of [ids.a2, ids.a3]) {
        assert.equal(anns.get(id).asset_id, null);
        assert.equal(anns.get(id).sha256, missing, 'the highlight keeps its blob\'s sha256');
        assert.equal(anns.get(id).work_id, ids.work);
      }
      assert.deepEqual(anns.get(ids.a2).geometry, { x: 10, y: 20 });
      const repaired = await g.eval(() => window.app.events.repaired.map((r) => [r.rowId, r.row.asset_id, r.code]));
      assert.deepEqual(repaired, [[ids.a2, null, 'foreign_key_violation'], [ids.a3, null, 'foreign_key_violation']]);
      assert.equal(await h.seqCount(user), 6, 'the guest outbox\'s six ops, once each (the refused asset\'s seq by its no-op)');
    } finally {
      await g.close();
    }
  });

  test('4: tokens that expire every few seconds are refreshed through getToken() without losing a change', async () => {
    const user = randomUUID();
    const d1 = await h.device({ user, ttl: 5 });
    const d2 = await h.device({ user, ttl: 5 });
    try {
      await Promise.all([d1.waitLive(), d2.waitLive()]);
      const titles = [];
      const started = Date.now();
      for (let i = 0; Date.now() - started < 16_000; i++) {
        const dev = i % 2 === 0 ? d1 : d2;
        const title = `Token test ${String(i).padStart(2, '0')}`;
        titles.push(title);
        await dev.eval((t) => window.app.sync.write([{ table: 'works', kind: 'insert', row: { title: t } }]), title);
        await sleep(800);
      }
      for (const dev of [d1, d2]) {
        await waitFor('every change on the device', async () => (await dev.titles()).length === titles.length, { timeoutMs: 15_000 });
        assert.deepEqual((await dev.titles()).sort(), [...titles].sort());
        const stats = await dev.eval(() => ({ ...window.app.sync.stats }));
        assert.ok(stats.tokenRefreshes >= 2, `socket token refreshed in place (${JSON.stringify(stats)})`);
        assert.equal(stats.connections, 1, `the socket was never closed for an expired token (${JSON.stringify(stats)})`);
      }
      assert.equal((await h.pgRows('works', user)).length, titles.length);
      assert.equal(await h.seqCount(user), titles.length);
    } finally {
      await Promise.all([d1.close(), d2.close()]);
    }
  });

  test('5: a rejected write is reported to the app and its optimistic row disappears', async () => {
    const user = randomUUID();
    const d1 = await h.device({ user });
    try {
      await d1.waitLive();
      // One write() with a good and a bad op: one batch, refused as a whole for the bad one (op_index 1).
      await d1.page.route(`${h.server.url}/v1/batch`, async (route) => {
        await sleep(2_000); // the answer comes later than the optimistic rows
        await route.continue();
      });
      await d1.eval(() =>
        window.app.sync.write([
          { table: 'works', kind: 'insert', row: { title: 'Good work' } },
          { table: 'works', kind: 'insert', row: { title: 'Bad work', read_status: 'finished-ish' } },
        ]),
      );
      await waitFor('both optimistic rows', async () => (await d1.titles()).length === 2, { timeoutMs: 5_000, intervalMs: 50 });
      await waitFor('rejection shown', async () => (await d1.page.$$('#rejections li')).length === 1);
      await waitFor('bad row gone, good row kept', async () => {
        const t = await d1.titles();
        return t.length === 1 && t[0] === 'Good work';
      });
      const [rejection] = await d1.eval(() => window.app.events.rejected);
      assert.equal(rejection.code, 'constraint_violation');
      assert.equal(rejection.table, 'works');
      assert.equal(rejection.status, 422);
      assert.equal(rejection.op.row.title, 'Bad work');
      assert.match(rejection.message, /works_read_status_check/);
      assert.equal(await d1.page.getAttribute('#rejections li', 'data-code'), 'constraint_violation');
      await waitFor('good row committed and echoed', async () =>
        (await h.pgRows('works', user)).length === 1 && (await d1.eval(() => window.app.sync.pendingCount())) === 0);
      assert.deepEqual((await h.pgRows('works', user)).map((r) => r.title), ['Good work']);
      assert.deepEqual(await d1.titles(), ['Good work']);
      // The refused op's seq went to a no-op, so the device's sequence stays contiguous: the next write is seq 3.
      assert.equal(await h.seqCount(user), 2);
      await d1.page.unroute(`${h.server.url}/v1/batch`);
      await d1.eval(() => window.app.sync.write([{ table: 'works', kind: 'insert', row: { title: 'After the refusal' } }]));
      await waitFor('the next write committed', async () => (await h.pgRows('works', user)).length === 2);
      assert.equal(await h.seqCount(user), 3);
    } finally {
      await d1.close();
    }
  });

  test('6: two tabs of one device share one stream; the second takes over when the first closes', async () => {
    const user = randomUUID();
    const dev = await h.device({ user });
    const other = await h.device({ user });
    try {
      const tabA = dev.page;
      await dev.waitLive();
      const sockets = [];
      dev.context.on('page', (p) => p.on('websocket', (ws) => sockets.push(ws.url())));
      const tabB = await dev.open(); // dev.page is now tab B
      await waitFor('tab B mirrors the live state', async () => (await tabB.evaluate(() => window.app.sync.state)) === 'live');
      await sleep(500);
      assert.equal(sockets.length, 0, 'the second tab opened no socket of its own');

      // A write in the follower tab is sent (outbox shared), echoed through the leader, awaited in the follower.
      await tabB.evaluate(async () => {
        await window.app.sync.write([{ table: 'works', kind: 'insert', row: { title: 'From tab B' } }]);
        for (const txid of await window.app.sync.flush()) await window.app.sync.awaitTxId(txid, { timeoutMs: 10_000 });
      });
      await waitFor('tab A shows it', async () => (await tabA.$$eval('#works li .title', (e) => e.map((x) => x.textContent))).includes('From tab B'));
      await waitFor('the other device shows it', hasTitle(other, 'From tab B'));
      assert.equal(await tabB.evaluate(() => window.app.sync.pendingCount()), 0);

      // The leader's tab closes: tab B takes over the stream.
      await tabA.close();
      await waitFor('tab B opened its own socket', async () => sockets.length === 1, { timeoutMs: 10_000 });
      await waitFor('tab B live', async () => (await tabB.evaluate(() => window.app.sync.state)) === 'live');
      await other.eval(() => window.app.sync.write([{ table: 'works', kind: 'insert', row: { title: 'After takeover' } }]));
      await waitFor('tab B receives changes', async () => (await dev.titles()).includes('After takeover'));
      assert.equal((await h.pgRows('works', user)).length, 2);
    } finally {
      await Promise.all([dev.close(), other.close()]);
    }
  });

  test('6b: two guest tabs; the first signs in; the second, whose app never calls signIn(), continues as the user', async () => {
    const user = randomUUID();
    const dev = await h.device({ user, signedIn: false });
    try {
      const tabA = dev.page;
      const tabB = await dev.open(); // dev.page is now tab B
      await tabA.evaluate(() => window.app.sync.write([{ table: 'works', kind: 'insert', row: { title: 'Guest A' } }]));
      await tabB.evaluate(() => window.app.sync.write([{ table: 'works', kind: 'insert', row: { title: 'Guest B' } }]));
      await tabA.evaluate(() => window.app.signIn());
      assert.equal(await tabA.evaluate(() => window.app.sync.userId), user);
      // Tab B is told by the deletion of the guest database, not by its app.
      await waitFor('tab B became the user', async () => (await tabB.evaluate(() => window.app.sync.userId)) === user);
      await tabB.evaluate(() => window.app.sync.write([{ table: 'works', kind: 'insert', row: { title: 'B after the sign-in' } }]));
      const titles = async () => (await h.pgRows('works', user)).map((w) => w.title).sort();
      await waitFor('all three in Postgres', async () => (await titles()).length === 3);
      assert.deepEqual(await titles(), ['B after the sign-in', 'Guest A', 'Guest B']);
      await waitFor('tab B shows all three', async () => (await dev.titles()).length === 3);
      await waitFor('tab A shows all three', async () =>
        (await tabA.$$eval('#works li .title', (e) => e.map((x) => x.textContent))).length === 3,
      );
      const dbs = await tabB.evaluate(async () => (await indexedDB.databases()).map((d) => d.name));
      assert.ok(!dbs.some((n) => n.startsWith('deeprecall_guest_')), `no guest database was created again (have ${dbs})`);
      assert.equal(await tabB.evaluate(() => window.app.sync.pendingCount()), 0);
      assert.equal(await h.seqCount(user), 3, 'each write once');
    } finally {
      await dev.close();
    }
  });

  test('6c: getToken() returns null: every tab goes offline and hears signedOut; signIn() in the follower brings both back', async () => {
    const user = randomUUID();
    const dev = await h.device({ user, ttl: 6 });
    try {
      const tabA = dev.page;
      await dev.waitLive();
      const tabB = await dev.open();
      await waitFor('tab B live', async () => (await tabB.evaluate(() => window.app.sync.state)) === 'live');
      for (const tab of [tabA, tabB]) {
        await tab.evaluate(() => {
          window.signedOut = 0;
          window.app.sync.on('signedOut', () => window.signedOut++);
        });
      }
      // The session ends (shared localStorage): getToken() returns null in both tabs.
      await tabB.evaluate(() => localStorage.removeItem('example:signed-in-user'));
      for (const tab of [tabA, tabB]) {
        await waitFor('offline + signedOut', async () => tab.evaluate(() => window.app.sync.state === 'offline' && window.signedOut === 1), {
          timeoutMs: 30_000,
        });
      }
      // The user signs in again; the follower's app calls signIn().
      await tabB.evaluate((u) => localStorage.setItem('example:signed-in-user', u), user);
      await tabB.evaluate(() => window.app.sync.signIn());
      for (const tab of [tabA, tabB]) {
        await waitFor('live again', async () => (await tab.evaluate(() => window.app.sync.state)) === 'live', { timeoutMs: 30_000 });
      }
    } finally {
      await dev.close();
    }
  });

  test('7: must_refetch (a TRUNCATE) clears and refetches that table only', async () => {
    const user = randomUUID();
    const d1 = await h.device({ user });
    try {
      await d1.waitLive();
      await d1.eval(async () => {
        const { sync } = window.app;
        await sync.write([
          { table: 'works', kind: 'insert', row: { title: 'Survives the truncate' } },
          { table: 'activities', kind: 'insert', row: { title: 'Reading group' } },
        ]);
        for (const t of await sync.flush()) await sync.awaitTxId(t, { timeoutMs: 10_000 });
      });
      const counts = () => d1.eval(async () => {
        const db = window.app.sync.db;
        return { works: await db.table('works').count(), activities: await db.table('activities').count() };
      });
      await waitFor('both rows synced', async () => JSON.stringify(await counts()) === '{"works":1,"activities":1}');
      await h.db.query('truncate activities');
      await waitFor('activities cleared on the device', async () => (await counts()).activities === 0, { timeoutMs: 15_000 });
      assert.equal((await counts()).works, 1, 'the other tables are untouched');
      await waitFor('live again', async () => (await d1.state()) === 'live');
      // The refetched subscription is live: a new activity arrives.
      await d1.eval(() => window.app.sync.write([{ table: 'activities', kind: 'insert', row: { title: 'After truncate' } }]));
      await waitFor('new activity synced', async () => {
        const rows = await d1.eval(async () => (await window.app.sync.db.table('activities').toArray()).map((r) => r.title));
        return rows.length === 1 && rows[0] === 'After truncate';
      });
      assert.deepEqual(await d1.titles(), ['Survives the truncate']);
    } finally {
      await d1.close();
    }
  });
});
