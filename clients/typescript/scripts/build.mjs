// npm run build: dist/index.js + .d.ts (tsc, one module per file, Dexie external: it is a peer dependency) and
// dist/browser.js (esbuild, one self-contained ES module with Dexie inside).
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
rmSync(path.join(root, 'dist'), { recursive: true, force: true });
execFileSync(process.execPath, [path.join(root, 'node_modules/typescript/bin/tsc'), '-p', path.join(root, 'tsconfig.json')], {
  stdio: 'inherit',
});
await build({
  entryPoints: [path.join(root, 'src/browser.ts')],
  outfile: path.join(root, 'dist/browser.js'),
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: 'es2022',
  sourcemap: true,
  legalComments: 'eof',
  logLevel: 'warning',
});
console.log('built dist/index.js (+ .d.ts) and dist/browser.js');
