#!/usr/bin/env bash
# Before and after in one run: the root's and pgstore's benchmarks, built
# from BASE and from the working tree, run in turns (before, after, before,
# ...) ROUNDS times, so that the machine's load moves both alike; prints
# each metric's median for both and their ratio.
#
#   bash scripts/before-after.sh                 BASE 58caa31 (the commit before issue 23), 5 rounds
#   bash scripts/before-after.sh -rounds 3 HEAD~4
#
# Memory rows always run; Redis rows with IDEMPOTENCY_TEST_REDIS_URL,
# PostgreSQL rows with IDEMPOTENCY_TEST_DATABASE_URL (skipped with a line
# saying so otherwise). Only benchmarks and metrics that both builds report
# are compared.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=5
base=58caa31
while [ $# -gt 0 ]; do
	case "$1" in
	-rounds)
		rounds=$2
		shift 2
		;;
	-*)
		echo "usage: $0 [-rounds N] [BASE]" >&2
		exit 2
		;;
	*)
		base=$1
		shift
		;;
	esac
done

work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/before" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$root" worktree add --detach "$work/before" "$base" >/dev/null 2>&1
ln -s "$root" "$work/after"

# Each side's test binaries, run from its own package directory.
for side in before after; do
	(cd "$work/$side" && go test -c -o "$work/root-$side.test" . && go test -c -o "$work/pgstore-$side.test" ./pgstore)
done

runs=("root;.;^Benchmark(Baseline|Memory|MemoryOverhead)\$;20000x")
if [ -n "${IDEMPOTENCY_TEST_REDIS_URL:-}" ]; then
	runs+=("root;.;^Benchmark(Redis|RedisOverhead)\$;3000x")
else
	echo "skipped: the Redis rows: IDEMPOTENCY_TEST_REDIS_URL is not set"
fi
if [ -n "${IDEMPOTENCY_TEST_DATABASE_URL:-}" ]; then
	runs+=("pgstore;pgstore;^BenchmarkPostgres(Overhead)?\$;1000x")
else
	echo "skipped: the PostgreSQL rows: IDEMPOTENCY_TEST_DATABASE_URL is not set"
fi

echo "# before ($(git -C "$root" rev-parse --short "$base")) and after ($(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD || echo ', with uncommitted changes')), $rounds rounds in turns"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), nproc $(nproc), $(go env GOVERSION)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
# A benchmark whose code changed may measure something else after.
changed=$(git -C "$root" diff --name-only "$base" -- 'bench*_test.go' 'pgstore/bench*_test.go' | tr '\n' ' ')
[ -z "$changed" ] || echo "benchmark files changed since $base (compare their rows with care): $changed"
for ((r = 1; r <= rounds; r++)); do
	for side in before after; do
		for run in "${runs[@]}"; do
			IFS=';' read -r bin dir bench times <<<"$run"
			(cd "$work/$side/$dir" && "$work/$bin-$side.test" -test.run '^$' -test.bench "$bench" \
				-test.benchtime "$times" -test.benchmem -test.cpu 2) |
				sed -n "s/^\(Benchmark[^ \t]*\)-2[ \t]/$side \1 /p" >>"$work/results"
		done
	done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| benchmark | metric | before (median) | after (median) | after / before |"
echo "|---|---|---|---|---|"
# Each line: side, name, iterations, then value-unit pairs.
awk '
{
	for (i = 4; i + 1 <= NF; i += 2) {
		key = $2 SUBSEP $(i + 1)
		n[$1, key]++
		v[$1, key, n[$1, key]] = $i
		if (!(key in seen)) { seen[key] = 1; order[++keys] = key }
	}
}
function num(x) { return x >= 100 || x == int(x) ? sprintf("%.0f", x) : sprintf("%.3g", x) }
function median(side, key,    m, i, j, t, a) {
	m = n[side, key]
	for (i = 1; i <= m; i++) a[i] = v[side, key, i] + 0
	for (i = 2; i <= m; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
	return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
}
END {
	for (k = 1; k <= keys; k++) {
		key = order[k]
		if (!n["before", key] || !n["after", key]) continue
		split(key, parts, SUBSEP)
		b = median("before", key); a = median("after", key)
		printf "| %s | %s | %s | %s | %s |\n", parts[1], parts[2], num(b), num(a), (b > 0 ? sprintf("%.2f", a / b) : "—")
	}
}' "$work/results"
