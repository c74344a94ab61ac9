#!/usr/bin/env bash
# Prints the performance tables of README.md, docs/performance.md and
# docs/capacity.md, each against a floor measured in the same run, with the
# machine's load beside them (examples/figures does the work), then
# examples/loadtest against every server (bare handler, memory, Redis, a
# Redis Cluster of 3 primaries started by scripts/cluster.sh, PostgreSQL):
# the scenarios at a constant rate, and each server's highest rate with p99
# under 10 ms against the bare handler's (-saturate).
#
#   bash scripts/figures.sh          the published figures (10.5 minutes on a 2-core machine)
#   bash scripts/figures.sh -short   every row once and briefly: CI runs it so it cannot rot
#
# Servers, as for the tests: IDEMPOTENCY_TEST_REDIS_URL (Redis),
# IDEMPOTENCY_TEST_REDIS_SERVER or redis-server on the PATH (servers and
# clusters of this run's own), IDEMPOTENCY_TEST_DATABASE_URL (PostgreSQL).
# Rows whose server is missing are skipped with a line saying so.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
short=
for arg in "$@"; do
	case "$arg" in
	-short) short=1 ;;
	*)
		echo "usage: $0 [-short]" >&2
		exit 2
		;;
	esac
done

status=0
go run ./examples/figures -root "$root" "$@" || status=$?

server=${IDEMPOTENCY_TEST_REDIS_SERVER:-$(command -v redis-server || true)}
servers=(-redis "${IDEMPOTENCY_TEST_REDIS_URL:-}")
[ -n "${IDEMPOTENCY_TEST_REDIS_URL:-}" ] || echo "skipped: loadtest's Redis rows: IDEMPOTENCY_TEST_REDIS_URL is not set"
if [ -n "${IDEMPOTENCY_TEST_DATABASE_URL:-}" ]; then
	servers+=(-database "$IDEMPOTENCY_TEST_DATABASE_URL")
else
	echo "skipped: loadtest's PostgreSQL rows: IDEMPOTENCY_TEST_DATABASE_URL is not set"
fi
if [ -n "$server" ]; then
	cluster_dir=$(mktemp -d)
	trap 'bash scripts/cluster.sh stop "$cluster_dir"; rm -rf "$cluster_dir"' EXIT
	addrs=$(REDIS_SERVER=$server bash scripts/cluster.sh start 3 "$cluster_dir")
	servers+=(-cluster "$addrs")
else
	echo "skipped: loadtest's Redis Cluster rows: IDEMPOTENCY_TEST_REDIS_SERVER is not set and no redis-server is on the PATH"
fi

echo
echo "## Under load: a constant rate, every scenario"
echo
if [ -n "$short" ]; then
	go run ./examples/loadtest -rate 200 -duration 300ms "${servers[@]}" || status=$?
else
	go run ./examples/loadtest -rate 2000 -duration 5s "${servers[@]}" || status=$?
fi

echo
echo "## Load to saturation: the highest rate of first requests with p99 under 10 ms"
echo
if [ -n "$short" ]; then
	go run ./examples/loadtest -saturate -rate 200 -duration 300ms -max-rate 800 "${servers[@]}" || status=$?
else
	go run ./examples/loadtest -saturate -rate 500 -duration 3s "${servers[@]}" || status=$?
fi
exit "$status"
