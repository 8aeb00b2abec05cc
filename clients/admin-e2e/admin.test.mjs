// The admin page (GET /admin) in headless Debian Chromium against a real server (`deeprecall-sync dev` with its own
// Postgres, started by ../test-server.mjs): an admin token sees the inventory of two owners with the right totals,
// a user token is refused, and the token lives in sessionStorage only. With SCREENSHOT=1 it writes
// docs/img/admin.png from the same run.
//
// Entry point: ./run.sh (builds the server, installs what is missing, runs this file).

import assert from 'node:assert/strict';
import { randomUUID, createHash } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS, CHROMIUM_PATH, startServer } from '../test-server.mjs';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

const sha = (name) => createHash('sha256').update(name).digest('hex');

// Two owners, three devices. `on`: devices that hold the file; `lost`: devices that report it missing.
const ALICE = randomUUID();
const BOB = randomUUID();
const LAPTOP = randomUUID();
const PHONE = randomUUID();
const DESKTOP = randomUUID();
const BLOBS = [
  { owner: ALICE, name: 'attention-is-all-you-need.pdf', mime: 'application/pdf', size: 2_215_244, on: [LAPTOP, PHONE], pages: 15 },
  { owner: ALICE, name: 'bert-pretraining.pdf', mime: 'application/pdf', size: 775_166, on: [LAPTOP], pages: 16 },
  { owner: ALICE, name: 'deep-residual-learning.pdf', mime: 'application/pdf', size: 846_003, on: [LAPTOP, PHONE], pages: 12 },
  { owner: ALICE, name: 'figure-1-transformer.png', mime: 'image/png', size: 48_213, on: [LAPTOP], w: 1200, h: 800 },
  { owner: ALICE, name: 'whiteboard-2026-11-20.jpg', mime: 'image/jpeg', size: 1_532_200, on: [PHONE], w: 4032, h: 3024 },
  { owner: ALICE, name: 'scan-0042.jpg', mime: 'image/jpeg', size: 2_100_500, on: [PHONE, LAPTOP], w: 2480, h: 3508 },
  { owner: ALICE, name: 'deep-learning-book.epub', mime: 'application/epub+zip', size: 12_043_998, on: [LAPTOP] },
  { owner: ALICE, name: 'lecture-03-attention.mp4', mime: 'video/mp4', size: 58_112_930, on: [LAPTOP] },
  { owner: ALICE, name: 'reading-notes.md', mime: 'text/markdown', size: 4_210, on: [LAPTOP, PHONE] },
  { owner: ALICE, name: 'old-draft.pdf', mime: 'application/pdf', size: 330_017, on: [], lost: [LAPTOP], pages: 4 },
  { owner: BOB, name: 'language-models-are-few-shot-learners.pdf', mime: 'application/pdf', size: 6_530_112, on: [DESKTOP], pages: 75 },
  { owner: BOB, name: 'alphafold-nature-2021.pdf', mime: 'application/pdf', size: 9_100_450, on: [], lost: [DESKTOP], pages: 11 },
  { owner: BOB, name: 'architecture-diagram.svg', mime: 'image/svg+xml', size: 21_004, on: [DESKTOP] },
  { owner: BOB, name: 'benchmark-results.csv', mime: 'text/csv', size: 3_400_871, on: [DESKTOP] },
  { owner: BOB, name: null, mime: null, size: 1_024, on: [DESKTOP] },
].map((b, i) => ({ ...b, sha256: sha(b.name ?? `unnamed-${i}`) }));

/** What the page must show per owner, computed from the seed itself. */
function expectedTotals(owner) {
  const mine = BLOBS.filter((b) => owner === undefined || b.owner === owner);
  return {
    blobs: mine.length,
    bytes: mine.reduce((s, b) => s + b.size, 0),
    stored: mine.reduce((s, b) => s + b.size * b.on.length, 0),
    missing: mine.filter((b) => b.on.length === 0).length,
    devices: new Set(mine.flatMap((b) => b.on.map((d) => `${b.owner}/${d}`))).size,
  };
}

const nf = new Intl.NumberFormat('en');
const bytesTitle = (n) => `${nf.format(n)} bytes`;

let server;
let browser;
const problems = []; // console errors, page errors, CSP violations

async function coordinate(owner, device) {
  const blobs = [];
  for (const b of BLOBS.filter((x) => x.owner === owner)) {
    const present = b.on.includes(device);
    const lost = (b.lost ?? []).includes(device);
    if (!present && !lost) continue;
    blobs.push({
      sha256: b.sha256,
      size: b.size,
      mime: b.mime ?? undefined,
      filename: b.name ?? undefined,
      path: b.name ? `/home/me/library/${b.name}` : undefined,
      page_count: b.pages,
      image_width: b.w,
      image_height: b.h,
      health: lost ? 'missing' : 'healthy',
    });
  }
  const res = await fetch(`${server.url}/v1/blobs/coordinate`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${server.token(owner)}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ device_id: device, blobs }),
  });
  assert.equal(res.status, 200, await res.text());
}

async function batch(owner, n) {
  const ops = Array.from({ length: n }, (_, i) => ({
    op_id: randomUUID(),
    table: 'works',
    kind: 'insert',
    row: { id: randomUUID(), title: `Paper ${i}` },
  }));
  const res = await fetch(`${server.url}/v1/batch`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${server.token(owner)}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ ops }),
  });
  assert.equal(res.status, 200, await res.text());
}

/** A page in a fresh context; `watch`: record its console errors and uncaught exceptions in `problems`. */
async function newPage({ watch = true } = {}) {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  if (watch) {
    page.on('console', (msg) => {
      if (msg.type() === 'error') problems.push(`console: ${msg.text()} (${msg.location().url})`);
    });
    page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  }
  return page;
}

async function signIn(page, token) {
  await page.goto(`${server.url}/admin`);
  await page.fill('#token-input', token);
  await page.click('#token-form button[type=submit]');
}

before(async () => {
  // Port 0: several suites may run a dev server at once; the banner prints the port it got.
  server = await startServer({ args: ['--metrics-listen', '127.0.0.1:0'] });
  await coordinate(ALICE, LAPTOP);
  await coordinate(ALICE, PHONE);
  await coordinate(BOB, DESKTOP);
  browser = await chromium.launch({ executablePath: CHROMIUM_PATH, args: CHROMIUM_ARGS });
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

test('an admin token sees both owners with the right totals', async () => {
  const page = await newPage();
  await signIn(page, server.token(randomUUID(), { admin: true }));

  // Per-owner totals.
  await page.waitForFunction(() => document.querySelectorAll('#owner-rows tr').length === 2);
  for (const owner of [ALICE, BOB]) {
    const want = expectedTotals(owner);
    const cells = page.locator(`#owner-rows tr[data-owner="${owner}"] td`);
    assert.equal(await cells.nth(1).textContent(), nf.format(want.blobs), `blobs of ${owner}`);
    assert.equal(await cells.nth(2).getAttribute('title'), bytesTitle(want.bytes), `content of ${owner}`);
    assert.equal(await cells.nth(3).getAttribute('title'), bytesTitle(want.stored), `stored of ${owner}`);
    assert.equal(await cells.nth(4).textContent(), nf.format(want.devices), `devices of ${owner}`);
    assert.equal(await cells.nth(5).textContent(), nf.format(want.missing), `missing of ${owner}`);
  }
  // Alice stores more, so she comes first.
  assert.equal(await page.locator('#owner-rows tr').first().getAttribute('data-owner'), ALICE);

  // Overall totals.
  const all = expectedTotals();
  assert.equal(await page.textContent('#t-blobs'), nf.format(all.blobs));
  assert.equal(await page.textContent('#t-owners'), '2');
  assert.equal(await page.textContent('#t-devices'), '3');
  assert.equal(await page.getAttribute('#t-stored', 'title'), bytesTitle(all.stored));
  assert.equal(await page.getAttribute('#t-bytes', 'title'), bytesTitle(all.bytes));
  assert.equal(await page.textContent('#t-missing'), nf.format(all.missing));

  // Per device and per MIME type.
  assert.equal(await page.locator('#device-rows tr').count(), 3);
  const laptop = page.locator(`#device-rows tr[data-device="${LAPTOP}"] td`);
  const onLaptop = BLOBS.filter((b) => b.on.includes(LAPTOP));
  assert.equal(await laptop.nth(2).textContent(), nf.format(onLaptop.length));
  assert.equal(await laptop.nth(3).getAttribute('title'), bytesTitle(onLaptop.reduce((s, b) => s + b.size, 0)));
  const mimes = new Set(BLOBS.map((b) => b.mime));
  assert.equal(await page.locator('#mime-rows tr').count(), mimes.size);
  assert.equal(await page.locator('#mime-chart rect').count(), Math.min(8, mimes.size));

  // Blobs missing on every device, largest first.
  const missing = BLOBS.filter((b) => b.on.length === 0).sort((a, b) => b.size - a.size);
  assert.equal(await page.locator('#missing-rows tr').count(), missing.length);
  assert.equal(await page.getAttribute('#missing-rows tr:first-child td:nth-child(2)', 'title'), missing[0].sha256);

  // The inventory: every blob, one page.
  assert.equal(await page.locator('#inv-rows tr').count(), BLOBS.length);
  assert.equal(await page.textContent('#inv-range'), `1–${BLOBS.length} of ${BLOBS.length}`);

  // Replication health is live.
  await page.waitForFunction(() => document.querySelector('#h-wal-status').textContent === 'reserved');
  assert.match(await page.textContent('#h-lag'), /\d+(\.\d+)? (B|KiB|MiB)$/);
  assert.match(await page.textContent('#health-updated'), /^updated /);

  // The token is in sessionStorage, nowhere else.
  const storage = await page.evaluate(() => ({
    session: Object.keys(sessionStorage),
    local: localStorage.length,
    cookies: document.cookie,
    url: location.href,
  }));
  assert.deepEqual(storage.session, ['deeprecall.adminToken']);
  assert.equal(storage.local, 0);
  assert.equal(storage.cookies, '');
  assert.equal(storage.url, `${server.url}/admin`);

  if (process.env.SCREENSHOT === '1') await screenshot(page);

  // Search narrows every panel.
  // (The inventory page and the aggregates arrive separately: wait for both.)
  await page.fill('#f-q', 'attention');
  await page.waitForFunction(
    () =>
      document.querySelector('#inv-range').textContent.endsWith(' of 2') &&
      document.querySelector('#t-blobs').textContent === '2',
  );
  assert.equal(await page.locator('#owner-rows tr').count(), 1);

  // Sort by size, largest first, and page by 2.
  await page.fill('#f-q', '');
  await page.waitForFunction(
    (n) =>
      document.querySelector('#inv-range').textContent.endsWith(` of ${n}`) &&
      document.querySelector('#t-blobs').textContent === String(n),
    BLOBS.length,
  );
  await page.selectOption('#inv-limit', '25');
  await page.click('#inv-table th[data-sort=size]');
  await page.waitForFunction(() => document.querySelector('th[data-sort=size]').getAttribute('aria-sort') === 'descending');
  const bySize = [...BLOBS].sort((a, b) => b.size - a.size);
  assert.equal(await page.getAttribute('#inv-rows tr:first-child', 'data-sha256'), bySize[0].sha256);

  // Clicking an owner filters to that owner.
  await page.click(`#owner-rows tr[data-owner="${BOB}"] button`);
  await page.waitForFunction(
    (n) =>
      document.querySelector('#inv-range').textContent.endsWith(` of ${n}`) &&
      document.querySelectorAll('#owner-rows tr').length === 1,
    expectedTotals(BOB).blobs,
  );
  assert.equal(await page.textContent('#t-blobs'), nf.format(expectedTotals(BOB).blobs));

  await page.click('#sign-out');
  assert.deepEqual(await page.evaluate(() => Object.keys(sessionStorage)), []);
  assert.equal(await page.isVisible('#app'), false);
  await page.context().close();
  assert.deepEqual(problems, []);
});

test('a user token is refused and not kept', async () => {
  const page = await newPage();
  await signIn(page, server.token(ALICE));
  await page.waitForSelector('#auth-error:not([hidden])');
  assert.match(await page.textContent('#auth-error'), /not an admin token \(403 forbidden\)/);
  assert.equal(await page.isVisible('#app'), false);
  assert.deepEqual(await page.evaluate(() => Object.keys(sessionStorage)), []);

  // A token this server did not sign: 401 with the reason. The signature's last character changes between 'A' and
  // 'E': an HS256 signature is 32 bytes, so its last base64url character carries 2 padding bits that must be zero,
  // and 'B' (for an 'A') would make the token malformed (401 malformed_token) instead of wrongly signed.
  await signIn(page, server.token(ALICE, { admin: true }).replace(/.$/, (c) => (c === 'A' ? 'E' : 'A')));
  await page.waitForSelector('#auth-error:not([hidden])');
  assert.match(await page.textContent('#auth-error'), /refused this token \(401 invalid_signature\)/);
  assert.equal(await page.isVisible('#app'), false);
  await page.context().close();
  // The page's own requests for the refused tokens log a console error each (HTTP 401/403); nothing else may.
  const unexpected = problems.filter((p) => !/status of 40[13]/.test(p));
  assert.deepEqual(unexpected, []);
});

test('dev serves /metrics on its own listener only', async () => {
  await batch(ALICE, 3);
  const m = /metrics: (http:\/\/127\.0\.0\.1:\d+\/metrics)/.exec(server.log());
  assert.ok(m, `no metrics line in the dev banner:\n${server.log()}`);
  const res = await fetch(m[1]);
  assert.equal(res.status, 200);
  const text = await res.text();
  assert.match(text, /^# TYPE deeprecall_replication_slot_lag_bytes gauge$/m);
  assert.match(text, /^deeprecall_batch_requests_total\{status="200"\} \d+$/m);
  assert.equal((await fetch(`${server.url}/metrics`)).status, 404);
});

/** docs/img/admin.png: the page with the seeded data, two live stream clients and some write traffic. */
async function screenshot(page) {
  // Stream clients in a page of the server's own origin (Chromium blocks about:blank from reaching loopback).
  const streams = await newPage({ watch: false });
  await streams.goto(`${server.url}/healthz`);
  await streams.evaluate(
    ({ url, tokens }) =>
      Promise.all(
        tokens.map(
          (t) =>
            new Promise((resolve, reject) => {
              const ws = new WebSocket(`${url.replace('http', 'ws')}/v1/stream?access_token=${t}`);
              ws.onopen = () => {
                ws.send(JSON.stringify({ type: 'subscribe', id: 'works', table: 'works' }));
                ws.send(JSON.stringify({ type: 'subscribe', id: 'blobs', table: 'blobs_meta' }));
                resolve();
              };
              ws.onerror = () => reject(new Error('stream connection failed'));
              window.sockets = [...(window.sockets ?? []), ws];
            }),
        ),
      ),
    { url: server.url, tokens: [server.token(ALICE), server.token(BOB), server.token(ALICE)] },
  );
  for (let i = 0; i < 6; i += 1) {
    await batch(i % 2 ? ALICE : BOB, 50);
    await new Promise((r) => setTimeout(r, 400));
  }
  await page.waitForFunction(() => document.querySelector('#h-clients').textContent === '3', null, { timeout: 10_000 });
  await page.waitForTimeout(2500); // two more health samples, so the rates and the sparkline have points
  const file = path.join(repoRoot, 'docs', 'img', 'admin.png');
  mkdirSync(path.dirname(file), { recursive: true });
  await page.screenshot({ path: file, fullPage: true });
  console.log(`wrote ${file}`);
  await streams.context().close();
}
