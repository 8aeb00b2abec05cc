#!/usr/bin/env bash
# Browser test of the admin page (GET /admin), the one entry point for CI:
#   clients/admin-e2e/run.sh              build the server, install what is missing, run the test
#   SCREENSHOT=1 clients/admin-e2e/run.sh also write docs/img/admin.png from the same run
# The test starts its own server and Postgres (../test-server.mjs) and stops them, also when it fails.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

# The binary under test is the one built from this tree, never a stale release build (unless the caller names
# one: `cargo test` builds it and passes DEEPRECALL_BIN).
if [ -z "${DEEPRECALL_BIN:-}" ]; then
  (cd "$root" && nice cargo build -p deeprecall-sync)
  export DEEPRECALL_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/deeprecall-sync"
fi

# Debian's Chromium; playwright-core never downloads a browser of its own.
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: $CHROMIUM is missing; install Debian's chromium (apt-get install chromium)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

cd "$here"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
../npm-ci.sh .
node --test --test-concurrency=1 --test-timeout=300000 admin.test.mjs
