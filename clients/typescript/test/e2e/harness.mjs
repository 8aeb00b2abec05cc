// End-to-end harness: a real deeprecall-sync server with its own Postgres (clients/test-server.mjs), the example
// page served from another origin (examples/serve.mjs), headless Chromium (Debian's, via playwright-core) where
// each browser context is one device with its own IndexedDB, and a superuser Postgres client for the truth.
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import pg from 'pg';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, CHROMIUM_PATH, startServer } from '../../../test-server.mjs';
import { serveExample } from '../../examples/serve.mjs';


/** Polls `fn` until it returns a truthy value; throws with `what` after `timeoutMs`. */
export async function waitFor(what, fn, { timeoutMs = 15_000, intervalMs = 100 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last instanceof Error ? last.stack : JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Starts everything; `stop()` tears it all down (call it in `after`, it tolerates partial starts). `serverArgs`:
 * extra flags for the server (e.g. `['--transaction-part-bytes', '4096']`).
 */
export async function startHarness({ serverArgs = [] } = {}) {
  if (!existsSync(CHROMIUM_PATH)) throw new Error(`no Chromium at ${CHROMIUM_PATH}: apt-get install -y chromium (run-tests.sh does)`);
  const h = { server: null, page: null, browser: null, db: null };
  h.stop = async () => {
    await h.browser?.close().catch(() => {});
    await h.db?.end().catch(() => {});
    await h.page?.close().catch(() => {});
    await h.server?.stop().catch(() => {});
  };
  try {
    h.server = await startServer({ args: serverArgs });
    h.page = await serveExample({ mintToken: (sub, ttl) => h.server.token(sub, { ttl }) });
    h.pageOrigin = `http://127.0.0.1:${h.page.port}`;
    h.browser = await chromium.launch({ executablePath: CHROMIUM_PATH, args: CHROMIUM_ARGS, headless: true });
    h.db = new pg.Client({ connectionString: h.server.databaseUrl });
    await h.db.connect();
  } catch (e) {
    await h.stop();
    throw e;
  }

  /** The page URL for a user (signed in or not is decided by the page's localStorage). */
  h.url = ({ user, ttl, batch } = {}) => {
    const p = new URLSearchParams({ api: h.server.url });
    if (user) p.set('user', user);
    if (ttl) p.set('ttl', String(ttl));
    if (batch) p.set('batch', String(batch));
    return `${h.pageOrigin}/?${p}`;
  };

  /**
   * A new device (browser context). `signedIn`: the page starts signed in as `user` (else as a guest who can sign
   * in as `user`). Resolves with { context, page, open(), … }.
   */
  h.device = async ({ user = randomUUID(), signedIn = true, ttl, batch } = {}) => {
    const context = await h.browser.newContext();
    // txnFrames: a summary of every `txn` frame the device's pages received ({xid, part, more, offset, changes}).
    const dev = { context, user, url: h.url({ user, ttl, batch }), requests: [], txnFrames: [] };
    if (signedIn) {
      await context.addInitScript((u) => {
        if (!localStorage.getItem('example:signed-in-user')) localStorage.setItem('example:signed-in-user', u);
      }, user);
    }
    context.on('request', (r) => {
      if (r.url().startsWith(h.server.url)) dev.requests.push(`${r.method()} ${new URL(r.url()).pathname}`);
    });
    dev.open = async () => {
      const page = await context.newPage();
      page.on('websocket', (ws) =>
        ws.on('framereceived', ({ payload }) => {
          if (typeof payload !== 'string' || !payload.includes('"txn"')) return;
          try {
            const m = JSON.parse(payload);
            if (m.type === 'txn') dev.txnFrames.push({ xid: m.xid, part: m.part, more: m.more, offset: m.offset, changes: m.changes.length });
          } catch {
            // not ours to judge here
          }
        }),
      );
      page.on('pageerror', (e) => console.error(`[page ${user.slice(0, 8)}] ${e.stack ?? e}`));
      page.on('console', (m) => {
        if (m.type() === 'error' || m.type() === 'warning') console.error(`[console ${user.slice(0, 8)}] ${m.text()}`);
      });
      await page.goto(dev.url);
      await page.waitForSelector('body[data-ready="true"]', { timeout: 30_000 });
      dev.page = page;
      return page;
    };
    /** Titles of the works the page shows. */
    dev.titles = async () => dev.page.$$eval('#works li .title', (els) => els.map((e) => e.textContent));
    dev.state = async () => dev.page.evaluate(() => window.app.sync.state);
    dev.eval = (fn, arg) => dev.page.evaluate(fn, arg);
    dev.waitLive = () => waitFor(`${user.slice(0, 8)} live`, async () => (await dev.state()) === 'live', { timeoutMs: 30_000 });
    dev.close = () => context.close();
    await dev.open();
    return dev;
  };

  /** Rows of a table owned by a user, from Postgres itself. */
  h.pgRows = async (table, owner) => (await h.db.query(`select * from ${table} where owner_id = $1 order by id`, [owner])).rows;
  h.ledgerCount = async (owner) =>
    Number((await h.db.query('select count(*) from sync_applied_ops where owner_id = $1', [owner])).rows[0].count);
  /** Ops the server applied for a user on the sequence path: the sum of its clients' last seqs (`sync_clients`). */
  h.seqCount = async (owner) =>
    Number((await h.db.query('select coalesce(sum(last_seq), 0) as n from sync_clients where owner_id = $1', [owner])).rows[0].n);
  h.clientCount = async (owner) =>
    Number((await h.db.query('select count(*) from sync_clients where owner_id = $1', [owner])).rows[0].count);
  return h;
}
