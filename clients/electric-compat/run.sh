#!/usr/bin/env bash
# Runs the unmodified @electric-sql/client 1.5.28 against a real deeprecall-sync (started by each test file with its
# own throwaway Postgres, via clients/test-server.mjs). Assumes `cargo build` has produced target/{release,debug}/
# deeprecall-sync (or DEEPRECALL_BIN points at a binary). Exits non-zero when a test fails.
set -euo pipefail
cd "$(dirname "$0")"
../npm-ci.sh .
# --test-force-exit: the client keeps a 60 s timer (its up-to-date tracker throttles saves) that would hold
# each test process open after its last test.
exec node --test --test-force-exit --test-concurrency=1 test/*.test.mjs
