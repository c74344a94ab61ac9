#!/usr/bin/env bash
# Prints the performance tables of README.md, docs/performance.md and
# docs/capacity.md, each against a floor measured in the same run, with the
# machine's load beside them (examples/figures does the work).
#
#   bash scripts/figures.sh          the published figures (several minutes)
#   bash scripts/figures.sh -short   every row once and briefly: CI runs it so it cannot rot
#
# Servers, as for the tests: IDEMPOTENCY_TEST_REDIS_URL (Redis benchmarks),
# IDEMPOTENCY_TEST_REDIS_SERVER or redis-server on the PATH (a server and
# clusters of this run's own), IDEMPOTENCY_TEST_DATABASE_URL (PostgreSQL).
# Rows whose server is missing are skipped with a line saying so.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
exec go run ./examples/figures -root "$root" "$@"
