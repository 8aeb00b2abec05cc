// Test helper shared by the JavaScript test suites under clients/: starts a real deeprecall-sync server with its
// own throwaway PostgreSQL cluster (`deeprecall-sync dev --data-dir <temp dir>`), and mints tokens for it.
//
// No dependencies: Node 20's standard library only. The server binary is $DEEPRECALL_BIN, else
// target/release/deeprecall-sync, else target/debug/deeprecall-sync (build it first with `cargo build`).
//
//   const server = await startServer({ corsOrigins: ['http://127.0.0.1:5173'] });
//   const token = server.token(userId, { ttl: 3600, admin: false });
//   ... fetch(`${server.url}/v1/batch`, ...) ...
//   await server.stop();              // stops the server and its Postgres, removes the temp dir
//
// Postgres and the server stop when stop() is called, and (best effort) when this Node process exits.

import { spawn } from 'node:child_process';
import { createHmac, randomBytes, randomUUID } from 'node:crypto';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** Debian's Chromium for the browser suites ($CHROMIUM_PATH, else $CHROMIUM); playwright-core never downloads one. */
export const CHROMIUM_PATH = process.env.CHROMIUM_PATH ?? process.env.CHROMIUM ?? '/usr/bin/chromium';

/** Launch flags of the browser suites: headless, no sandbox (CI runs as root), nothing that phones home. */
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** The server binary to run. */
export function serverBinary() {
  if (process.env.DEEPRECALL_BIN) return process.env.DEEPRECALL_BIN;
  for (const profile of ['release', 'debug']) {
    const candidate = path.join(repoRoot, 'target', profile, 'deeprecall-sync');
    if (existsSync(candidate)) return candidate;
  }
  throw new Error('no deeprecall-sync binary: run `cargo build` (or set DEEPRECALL_BIN)');
}

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const b64url = (data) => Buffer.from(data).toString('base64url');

/** Mints an HS256 JWT the way DeepRecall's app does (claims: sub, iat, exp; `role: "admin"` for admins). */
export function mintToken(secret, sub, { ttl = 3600, admin = false, extra = {} } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const claims = { sub, iat: now, exp: now + ttl, ...(admin ? { role: 'admin' } : {}), ...extra };
  const body = b64url(JSON.stringify(claims));
  const signature = createHmac('sha256', secret).update(`${header}.${body}`).digest('base64url');
  return `${header}.${body}.${signature}`;
}

/** The environment for the server: ours without DATABASE_URL (dev would use it instead of its own cluster). */
function childEnv(extra) {
  const env = { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn', ...extra };
  delete env.DATABASE_URL;
  return env;
}

const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGINT');
});

/**
 * Starts a server. Options: `corsOrigins` (array; default any origin, as `dev`), `args` (extra command-line
 * flags), `env` (extra environment), `timeoutMs` (start-up limit, default 120 s: the first run creates a cluster).
 */
export async function startServer({ corsOrigins = ['*'], args = [], env = {}, timeoutMs = 120_000 } = {}) {
  const bin = serverBinary();
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'deeprecall-js-'));
  // As root, Postgres runs as the `postgres` user, which must be able to enter the directory.
  chmodSync(dataDir, 0o755);
  const port = await freePort();
  const secret = randomBytes(32).toString('hex');
  const url = `http://127.0.0.1:${port}`;
  const child = spawn(
    bin,
    [
      'dev',
      '--data-dir', dataDir,
      '--listen', `127.0.0.1:${port}`,
      '--jwt-secret', secret,
      '--cors-origin', corsOrigins.join(','),
      ...args,
    ],
    {
      env: childEnv(env),
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  running.add(child);
  let log = '';
  const keep = (chunk) => {
    log += chunk.toString();
    if (log.length > 200_000) log = log.slice(-100_000);
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));

  const stop = async () => {
    if (running.has(child)) {
      running.delete(child);
      child.kill('SIGINT');
      const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
      await exited;
      clearTimeout(timer);
    }
    rmSync(dataDir, { recursive: true, force: true });
  };

  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const gone = await Promise.race([exited, new Promise((r) => setTimeout(() => r(null), 200))]);
    if (gone) {
      rmSync(dataDir, { recursive: true, force: true });
      running.delete(child);
      throw new Error(`deeprecall-sync exited during start-up (${JSON.stringify(gone)}):\n${log}`);
    }
    try {
      const res = await fetch(`${url}/readyz`);
      if (res.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`deeprecall-sync did not become ready in ${timeoutMs} ms:\n${log}`);
    }
  }

  return {
    url,
    port,
    secret,
    dataDir,
    /** A token for `sub` (a fresh user when omitted). */
    token: (sub = randomUUID(), opts = {}) => mintToken(secret, sub, opts),
    /** Postgres URL of the server's database (superuser, bypasses RLS: for checking the truth). */
    databaseUrl: databaseUrl(dataDir, log),
    /** The server's output so far. */
    log: () => log,
    stop,
  };
}

/** The dev cluster's superuser URL: password from its data dir, port from the start-up line `dev` prints. */
function databaseUrl(dataDir, log) {
  const port = /local Postgres .* on 127\.0\.0\.1:(\d+)/.exec(log)?.[1];
  if (!port) throw new Error(`could not find the Postgres port in the server output:\n${log}`);
  const password = readFileSync(path.join(dataDir, 'postgres', 'superuser-password'), 'utf8').trim();
  return `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/deeprecall`;
}
