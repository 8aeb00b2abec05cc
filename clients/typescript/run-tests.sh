#!/usr/bin/env bash
# CI entry point of @deeprecall/sync-client: install, build, unit tests (Node), end-to-end tests (headless
# Chromium against a real deeprecall-sync and Postgres). Exits non-zero on any failure.
#
# Assumes the server binary is built (clients/test-server.mjs looks for $DEEPRECALL_BIN, then
# target/release/deeprecall-sync, then target/debug/deeprecall-sync) and PostgreSQL 15's server binaries are
# installed (the server's `dev` command starts its own cluster). Installs Debian's chromium if it is missing;
# no tool downloads a browser of its own.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ]; then
  echo "run-tests.sh: installing chromium (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q chromium
fi

# Never let playwright fetch a browser (playwright-core does not, but be explicit).
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

../npm-ci.sh .
npm run build
test -f dist/index.js -a -f dist/index.d.ts -a -f dist/browser.js
npm run test:unit
npm run test:e2e
