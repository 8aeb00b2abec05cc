// Serves the example page (this folder at /, the built bundle at /dist/) and a token route standing in for the
// app's own `/api/sync-token` (docs/client.md). Used by the end-to-end tests; also runnable by hand:
//
//   cargo build && npm run build && node examples/serve.mjs
//
// which starts a throwaway sync server (clients/test-server.mjs) and prints a URL to open in two browsers.
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const pkg = path.resolve(here, '..');
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.map': 'application/json', '.mjs': 'text/javascript' };

/**
 * Starts the static server on 127.0.0.1:`port` (0 = any). `mintToken(sub, ttl)` returns a token for the route.
 * Resolves with { port, close }.
 */
export function serveExample({ port = 0, mintToken }) {
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    try {
      if (url.pathname === '/api/sync-token') {
        const sub = url.searchParams.get('sub');
        const ttl = Number(url.searchParams.get('ttl') ?? '600');
        if (!sub) {
          res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":"not signed in"}');
          return;
        }
        res
          .writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' })
          .end(JSON.stringify({ token: mintToken(sub, ttl) }));
        return;
      }
      let file;
      if (url.pathname.startsWith('/dist/')) file = path.join(pkg, 'dist', path.normalize(url.pathname.slice(6)));
      else file = path.join(here, path.normalize(url.pathname === '/' ? 'index.html' : url.pathname.slice(1)));
      if (!file.startsWith(pkg)) throw Object.assign(new Error('outside'), { code: 'ENOENT' });
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream', 'cache-control': 'no-cache' });
      res.end(body);
    } catch (e) {
      res.writeHead(e?.code === 'ENOENT' || e?.code === 'EISDIR' ? 404 : 500).end();
    }
  });
  return new Promise((resolve) => {
    server.listen(port, '127.0.0.1', () => {
      resolve({
        port: server.address().port,
        close: () =>
          new Promise((r) => {
            server.closeAllConnections();
            server.close(() => r());
          }),
      });
    });
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const { startServer } = await import('../../test-server.mjs');
  const sync = await startServer();
  const page = await serveExample({ port: Number(process.env.PORT ?? 5173), mintToken: (sub, ttl) => sync.token(sub, { ttl }) });
  const user = randomUUID();
  console.log(`sync server: ${sync.url}`);
  console.log(`open: http://localhost:${page.port}/?api=${encodeURIComponent(sync.url)}&user=${user}`);
  console.log('(another browser profile on the same URL is a second device of the same user; Ctrl-C stops)');
  const stop = async () => {
    await page.close();
    await sync.stop();
    process.exit(0);
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}
