#!/usr/bin/env bash
# A Redis Cluster of N nodes on loopback, keeping nothing on disk: N
# primaries (the shards of the capacity check, docs/capacity.md), or with
# REDIS_CLUSTER_REPLICAS=R, N/(R+1) primaries with R replicas each (the
# tests' cluster, .ci/cluster.sh).
#
#   scripts/cluster.sh start N DIR   start it; print the node addresses, comma-separated
#   scripts/cluster.sh stop DIR      stop the nodes started in DIR
#
# Ports: N free ports from REDIS_CLUSTER_BASE_PORT (default 21001) up,
# each with its cluster bus port (port + 10000) free too, all below the
# kernel's ephemeral range (32768 up), where the tests' client sockets
# can hold a port that nothing answers on. The binaries:
# REDIS_SERVER (else IDEMPOTENCY_TEST_REDIS_SERVER, else redis-server on
# the PATH) and REDIS_CLI (else redis-cli).
set -euo pipefail

usage() {
	echo "usage: $0 start N DIR | stop DIR" >&2
	exit 2
}
cmd=${1:-}
case "$cmd" in
start)
	n=${2:-}
	dir=${3:-}
	[ -n "$dir" ] && [[ "$n" =~ ^[1-9][0-9]*$ ]] || usage
	;;
stop)
	dir=${2:-}
	[ -n "$dir" ] || usage
	;;
*) usage ;;
esac
server=${REDIS_SERVER:-${IDEMPOTENCY_TEST_REDIS_SERVER:-$(command -v redis-server || true)}}
cli=${REDIS_CLI:-$(command -v redis-cli || true)}
replicas=${REDIS_CLUSTER_REPLICAS:-0}
if [ "$cmd" = start ] && { ! [[ "$replicas" =~ ^[0-9]+$ ]] || [ $((n % (replicas + 1))) -ne 0 ]; }; then
	echo "N ($n) must be a multiple of REDIS_CLUSTER_REPLICAS+1 ($((replicas + 1)))" >&2
	exit 2
fi

in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

healthy() {
	local info nodes
	info=$("$cli" -p "$1" cluster info 2>/dev/null | tr -d '\r') || return 1
	nodes=$("$cli" -p "$1" cluster nodes 2>/dev/null) || return 1
	grep -q '^cluster_state:ok$' <<<"$info" &&
		[ "$(awk '$3 ~ /master/' <<<"$nodes" | wc -l)" = $((n / (replicas + 1))) ] &&
		[ "$(awk '$3 ~ /slave/' <<<"$nodes" | wc -l)" = $((n - n / (replicas + 1))) ] || return 1
	if "$cli" -p "$1" role 2>/dev/null | head -1 | grep -q slave; then
		"$cli" -p "$1" info replication | tr -d '\r' | grep -q '^master_link_status:up$' || return 1
	fi
}

stop() {
	[ -f "$dir/ports" ] || return 0
	for port in $(cat "$dir/ports"); do
		if [ -f "$dir/redis-$port.pid" ]; then
			kill "$(cat "$dir/redis-$port.pid")" 2>/dev/null || true
		fi
	done
	# Wait until every node is gone, so the ports are free again.
	for port in $(cat "$dir/ports"); do
		for _ in $(seq 50); do in_use "$port" || break; sleep 0.1; done
	done
	rm -f "$dir/ports"
}

start() {
	if [ -z "$server" ] || [ -z "$cli" ]; then
		echo "redis-server or redis-cli not found (set REDIS_SERVER, REDIS_CLI)" >&2
		exit 1
	fi
	mkdir -p "$dir"
	stop
	rm -f "$dir"/nodes-*.conf "$dir"/redis-*.log "$dir"/redis-*.pid
	local port=${REDIS_CLUSTER_BASE_PORT:-21001} ports=()
	while [ ${#ports[@]} -lt "$n" ]; do
		if [ "$port" -gt 22767 ]; then
			echo "no free ports for the cluster" >&2
			exit 1
		fi
		if ! in_use "$port" && ! in_use $((port + 10000)); then ports+=("$port"); fi
		port=$((port + 1))
	done
	echo "${ports[*]}" >"$dir/ports"
	local addrs=()
	for p in "${ports[@]}"; do
		"$server" --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
			--cluster-config-file "nodes-$p.conf" --cluster-node-timeout 5000 \
			--save '' --appendonly no --dir "$dir" --daemonize yes \
			--pidfile "$dir/redis-$p.pid" --logfile "$dir/redis-$p.log" >/dev/null
		addrs+=("127.0.0.1:$p")
	done
	for p in "${ports[@]}"; do
		for _ in $(seq 100); do
			[ "$("$cli" -p "$p" ping 2>/dev/null)" = PONG ] && break
			sleep 0.1
		done
	done
	if [ "$n" -eq 1 ]; then
		# redis-cli --cluster create wants three masters; one node gets
		# every slot by hand.
		"$cli" -p "${ports[0]}" cluster addslotsrange 0 16383 >/dev/null
	else
		"$cli" --cluster create "${addrs[@]}" --cluster-replicas "$replicas" --cluster-yes >"$dir/create.log" 2>&1 || {
			cat "$dir/create.log" >&2
			exit 1
		}
	fi
	# Every node must see the whole cluster healthy (every slot served,
	# every replica known) and every replica must be in sync before the
	# caller starts.
	for p in "${ports[@]}"; do
		local ok=
		for _ in $(seq 300); do
			if healthy "$p"; then
				ok=1
				break
			fi
			sleep 0.1
		done
		if [ -z "$ok" ]; then
			echo "node $p: cluster not ready after 30 s" >&2
			"$cli" -p "$p" cluster info >&2 || true
			"$cli" -p "$p" cluster nodes >&2 || true
			exit 1
		fi
	done
	(
		IFS=,
		echo "${addrs[*]}"
	)
}

case "$cmd" in
start) start ;;
stop) stop ;;
esac
