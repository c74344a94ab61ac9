#!/usr/bin/env bash
# A local Redis Cluster for the tests: 3 primaries and 3 replicas on
# loopback, keeping nothing on disk.
#
#   .ci/cluster.sh start DIR   start it; print the node addresses, comma-separated
#   .ci/cluster.sh stop DIR    stop the nodes started in DIR
#
# Ports: six free ports from REDIS_CLUSTER_BASE_PORT (default 30001) up,
# each with its cluster bus port (port + 10000) free too.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
	echo "usage: $0 start|stop DIR" >&2
	exit 2
fi
server=${REDIS_SERVER:-$(command -v redis-server)}
cli=${REDIS_CLI:-$(command -v redis-cli)}

in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

healthy() {
	local info nodes
	info=$("$cli" -p "$1" cluster info 2>/dev/null | tr -d '\r') || return 1
	nodes=$("$cli" -p "$1" cluster nodes 2>/dev/null) || return 1
	grep -q '^cluster_state:ok$' <<<"$info" &&
		[ "$(awk '$3 ~ /slave/' <<<"$nodes" | wc -l)" = 3 ] || return 1
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
	mkdir -p "$dir"
	stop
	rm -f "$dir"/nodes-*.conf "$dir"/redis-*.log "$dir"/redis-*.pid
	local port=${REDIS_CLUSTER_BASE_PORT:-30001} ports=()
	while [ ${#ports[@]} -lt 6 ]; do
		if [ "$port" -gt 39999 ]; then
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
	"$cli" --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 || {
		cat "$dir/create.log" >&2
		exit 1
	}
	# Every node must see the whole cluster healthy (all slots served, three
	# replicas) and every replica must be in sync before tests start.
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
*)
	echo "usage: $0 start|stop DIR" >&2
	exit 2
	;;
esac
