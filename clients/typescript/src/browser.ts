// Entry point of dist/browser.js: the client with Dexie bundled, for pages without a bundler
// (`<script type="module">import { createSyncClient, liveQuery } from './browser.js'</script>`). Dexie and
// liveQuery are re-exported so that the page observes the very Dexie instance the client writes with.

export * from './index.js';
export { Dexie, liveQuery } from 'dexie';
