#!/usr/bin/env bash
# Checks deploy/deeprecall-sync.service with systemd-analyze: `verify` (syntax, directives, executables) and the
# offline `security` exposure score (fails above THRESHOLD). Needs no running systemd and changes nothing.
#
# `verify` insists that ExecStart's binary exists, and /usr/local/bin/deeprecall-sync is not installed on a build
# machine: the check runs on a temporary copy of the unit whose binary path points at the built server if there
# is one (target/{release,debug}/deeprecall-sync), else at a stub. Everything else in the unit is checked as
# shipped.
set -euo pipefail
cd "$(dirname "$0")/.."

UNIT=deploy/deeprecall-sync.service
INSTALLED_BIN=/usr/local/bin/deeprecall-sync
# systemd's exposure level, times 10 (the flag takes an integer): 0 locked down .. 100 unprotected.
THRESHOLD=${THRESHOLD:-25}

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "deploy/verify.sh: systemd-analyze not found (apt-get install systemd)" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

bin=""
for candidate in target/release/deeprecall-sync target/debug/deeprecall-sync; do
  if [ -x "$candidate" ]; then bin="$(pwd)/$candidate"; break; fi
done
if [ -z "$bin" ]; then
  bin="$tmp/deeprecall-sync"
  printf '#!/bin/sh\nexit 0\n' >"$bin"
  chmod +x "$bin"
fi

grep -q "$INSTALLED_BIN" "$UNIT" || { echo "deploy/verify.sh: $UNIT no longer runs $INSTALLED_BIN" >&2; exit 1; }
sed "s#$INSTALLED_BIN#$bin#g" "$UNIT" >"$tmp/deeprecall-sync.service"

echo "systemd-analyze verify $UNIT (binary: $bin)"
# verify prints problems and exits non-zero on errors; warnings about other units on this machine are not ours,
# so only lines naming our unit count.
out=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no "$tmp/deeprecall-sync.service" 2>&1) || {
  echo "$out" >&2
  exit 1
}
ours=$(printf '%s\n' "$out" | grep -F "deeprecall-sync.service" || true)
if [ -n "$ours" ]; then
  echo "$ours" >&2
  exit 1
fi
echo "ok: no problems"

echo "systemd-analyze security --offline (threshold $THRESHOLD)"
if ! systemd-analyze security --offline=yes --threshold="$THRESHOLD" --no-pager \
  "$tmp/deeprecall-sync.service" >"$tmp/security.txt" 2>&1; then
  cat "$tmp/security.txt" >&2
  echo "deploy/verify.sh: exposure above $THRESHOLD" >&2
  exit 1
fi
tail -n 1 "$tmp/security.txt"

# The environment template names only settings the binary reads (checked against its --help when it is built).
template=deploy/deeprecall-sync.env.example
names=$(grep -oE '^#?[A-Z][A-Z0-9_]*=' "$template" | tr -d '#=' | sort -u)
if [ "$bin" != "$tmp/deeprecall-sync" ]; then
  known=$({ "$bin" serve --help; "$bin" check --help; } 2>/dev/null | grep -oE 'env: [A-Z0-9_]+' | sed 's/env: //' | sort -u)
  for name in $names; do
    [ "$name" = RUST_LOG ] && continue
    if ! grep -qx "$name" <<<"$known"; then
      echo "deploy/verify.sh: $template sets $name, which deeprecall-sync does not read" >&2
      exit 1
    fi
  done
  echo "ok: every variable in $template is one deeprecall-sync reads"
fi
echo "ok: deploy/ verified"
