#!/usr/bin/env bash
# The tests' Redis Cluster: 3 primaries and 3 replicas on loopback,
# keeping nothing on disk, started by scripts/cluster.sh.
#
#   .ci/cluster.sh start DIR   start it; print the node addresses, comma-separated
#   .ci/cluster.sh stop DIR    stop the nodes started in DIR
#
# Ports: six free ports from REDIS_CLUSTER_BASE_PORT (default 20001) up,
# each with its cluster bus port (port + 10000) free too.
set -euo pipefail
cluster=$(dirname "$0")/../scripts/cluster.sh
case "${1:-}" in
start) REDIS_CLUSTER_REPLICAS=1 REDIS_CLUSTER_BASE_PORT=${REDIS_CLUSTER_BASE_PORT:-20001} exec bash "$cluster" start 6 "${2:?usage: $0 start|stop DIR}" ;;
stop) exec bash "$cluster" stop "${2:?usage: $0 start|stop DIR}" ;;
*)
	echo "usage: $0 start|stop DIR" >&2
	exit 2
	;;
esac
