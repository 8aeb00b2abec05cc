#!/usr/bin/env bash
# Installs the npm dependencies of each client directory given (`npm ci`, exactly package-lock.json), unless its
# node_modules already holds that lock: npm records the installed tree in node_modules/.package-lock.json, so a lock
# newer than that record means it changed since. Used by .ci/run up front (a missing registry fails there, before
# the long build) and by each suite's own script (so a suite run alone installs what it needs).
set -euo pipefail
# No suite may download a browser (they use Debian's chromium); playwright-core does not, but be explicit.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
for dir in "$@"; do
  record="$dir/node_modules/.package-lock.json"
  if [ -f "$record" ] && [ "$record" -nt "$dir/package-lock.json" ]; then
    continue
  fi
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
done
