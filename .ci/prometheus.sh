#!/usr/bin/env bash
# End to end against a real Prometheus: the example's metrics, the alert
# rules and the dashboard's queries (examples/venue-service).
#
#  1. promtool check rules examples/venue-service/alerts.yml
#  2. build and start the example on 127.0.0.1, a free port, memory store,
#     fake Stripe;
#  3. start a Prometheus server (the binary, not a system service) on
#     127.0.0.1 that scrapes the example's /metrics every second and loads
#     the alert rules;
#  4. send a small fixed load with curl: 20 creates, 10 replays,
#     3 mismatches (422), a webhook event delivered twice;
#  5. query Prometheus' HTTP API until the counters equal what the load
#     made, check that every alert rule is loaded with health ok, and run
#     every dashboard query;
#  6. stop both and remove everything (on any exit).
#
# Loopback only; fails after PROMETHEUS_E2E_TIMEOUT seconds (60), counted
# after the packages are installed. Needs prometheus, promtool, jq and curl;
# installs Debian's prometheus and jq packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

step() { echo "== $* (at ${SECONDS}s)"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v jq >/dev/null || missing+=(jq)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
	step "install ${missing[*]}"
	apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi

timeout=${PROMETHEUS_E2E_TIMEOUT:-60}
start=$SECONDS
deadline=$((SECONDS + timeout))
in_time() { ((SECONDS < deadline)); }

tmp=$(mktemp -d)
venue_pid= prom_pid= watchdog_pid=
cleanup() {
	status=$?
	set +e
	for pid in $venue_pid $prom_pid; do
		kill -TERM "$pid" 2>/dev/null
	done
	for pid in $venue_pid $prom_pid; do
		wait "$pid" 2>/dev/null
	done
	[ -n "$watchdog_pid" ] && kill "$watchdog_pid" 2>/dev/null && wait "$watchdog_pid" 2>/dev/null
	if [ "$status" -ne 0 ]; then
		echo "--- venue-service log (tail)"; tail -n 30 "$tmp/venue.log" 2>/dev/null
		echo "--- prometheus log (tail)"; tail -n 30 "$tmp/prometheus.log" 2>/dev/null
	fi
	rm -rf "$tmp"
	exit "$status"
}
trap cleanup EXIT
# The watchdog: a step that hangs past the deadline ends the run.
trap 'fail "timed out after ${timeout}s"' USR1
(
	trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
	sleep "$((timeout + 5))" &
	sleep_pid=$!
	wait "$sleep_pid" && kill -USR1 $$
) >/dev/null 2>&1 &
watchdog_pid=$!

curl_() { curl -sS --max-time 5 "$@"; }

step "promtool check rules"
promtool check rules examples/venue-service/alerts.yml

step "build the example"
go build -o "$tmp/venue" ./examples/venue-service

step "start the example"
api_key=e2e-api-key
env -u REDIS_URL -u STRIPE_SECRET_KEY -u STRIPE_WEBHOOK_SECRET -u FAKE_STRIPE_LATENCY -u CHAOS_FAIL_AFTER_STRIPE \
	ADDR=127.0.0.1:0 API_KEYS="$api_key:e2e-tenant" "$tmp/venue" >"$tmp/venue.log" 2>&1 &
venue_pid=$!
venue=
while in_time && [ -z "$venue" ]; do
	kill -0 "$venue_pid" 2>/dev/null || fail "the example exited"
	venue=$(sed -n 's/.*msg="venue-service listening" addr=\(http:\/\/[^ ]*\).*/\1/p' "$tmp/venue.log" | head -1)
	[ -n "$venue" ] || sleep 0.1
done
[ -n "$venue" ] || fail "the example did not start"
echo "example at $venue"

step "start Prometheus"
# A free port on the loopback, below the kernel's ephemeral range, where
# the tests' client sockets and their servers' ":0" ports land (a port
# that nothing answers on may still be bound by one of those): nothing
# answers on it. Prometheus starts again on another port if its bind
# fails all the same.
low=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
free_port() {
	local port
	for _ in $(seq 50); do
		port=$((10000 + RANDOM % (low - 10000)))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
			echo "$port"
			return
		fi
	done
	fail "no free port"
}
cat >"$tmp/prom.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $root/examples/venue-service/alerts.yml
scrape_configs:
  - job_name: venue-service
    static_configs:
      - targets: ["${venue#http://}"]
YML
prom=
for attempt in 1 2 3; do
	prom_port=$(free_port)
	prometheus --config.file="$tmp/prom.yml" --storage.tsdb.path="$tmp/data" \
		--web.listen-address="127.0.0.1:$prom_port" >"$tmp/prometheus.log" 2>&1 &
	prom_pid=$!
	until curl -fsS --max-time 1 "http://127.0.0.1:$prom_port/-/ready" >/dev/null 2>&1; do
		if ! kill -0 "$prom_pid" 2>/dev/null; then
			wait "$prom_pid" 2>/dev/null || true
			if [ "$attempt" -lt 3 ] && grep -q 'address already in use' "$tmp/prometheus.log"; then
				continue 2
			fi
			fail "prometheus exited"
		fi
		in_time || fail "prometheus not ready"
		sleep 0.2
	done
	prom=http://127.0.0.1:$prom_port
	break
done
[ -n "$prom" ] || fail "prometheus did not start"
echo "prometheus at $prom ($(prometheus --version 2>&1 | head -1))"

step "load: 20 creates, 10 replays, 3 mismatches, a webhook delivered twice"
# expect STATUS [REPLAYED] KEY BODY: POST /venues, check the status and the
# replay header.
create() {
	local want=$1 replayed=$2 key=$3 body=$4 out
	out=$(curl_ -o /dev/null -D - -X POST "$venue/venues" -H "Authorization: Bearer $api_key" \
		-H "Idempotency-Key: $key" -H 'Content-Type: application/json' -d "$body" | tr -d '\r')
	status=$(awk 'NR == 1 { print $2 }' <<<"$out")
	[ "$status" = "$want" ] || fail "POST /venues key $key: status $status, want $want"
	if [ "$replayed" = yes ]; then
		grep -qi '^X-Idempotent-Replayed: true' <<<"$out" || fail "key $key: not a replay"
	fi
}
for i in $(seq 20); do create 201 no "e2e-$i" "{\"name\":\"Venue $i\",\"slug\":\"venue-$i\"}"; done
for i in $(seq 10); do create 201 yes "e2e-$i" "{\"slug\":\"venue-$i\",\"name\":\"Venue $i\"}"; done
for i in $(seq 3); do create 422 no "e2e-$i" "{\"name\":\"Other $i\",\"slug\":\"other-$i\"}"; done
event='{"id":"evt_e2e_1","object":"event","type":"customer.created","api_version":"2023-10-16","data":{"object":{}}}'
signature=$(printf '%s' "$event" | "$tmp/venue" sign)
for _ in 1 2; do
	status=$(curl_ -o /dev/null -w '%{http_code}' -X POST "$venue/webhooks/stripe" -H "Stripe-Signature: $signature" -d "$event")
	[ "$status" = 200 ] || fail "webhook delivery: status $status"
done

# value QUERY: the first sample's value, or "none".
value() {
	curl_ -G "$prom/api/v1/query" --data-urlencode "query=$1" | jq -r '.data.result[0].value[1] // "none"'
}

step "query Prometheus until the scrapes show the load"
checks=(
	'sum(idempotency_requests_total{job="venue-service",outcome="executed"})=20'
	'sum(idempotency_requests_total{job="venue-service",outcome="replayed"})=10'
	'sum(idempotency_requests_total{job="venue-service",outcome="mismatch",http_response_status_code="422"})=3'
	'sum(idempotency_requests_total{job="venue-service"})=33'
	'sum(idempotency_handler_duration_seconds_count{job="venue-service"})=20'
	# The store serves the middleware and the webhook helper: 33 requests
	# and 2 deliveries acquire; 20 creates and 1 event complete.
	'sum(idempotency_store_duration_seconds_count{job="venue-service",operation="acquire"})=35'
	'sum(idempotency_store_duration_seconds_count{job="venue-service",operation="complete"})=21'
	'sum(idempotency_webhook_deliveries_total{job="venue-service",outcome="executed"})=1'
	'sum(idempotency_webhook_deliveries_total{job="venue-service",outcome="replayed"})=1'
)
for check in "${checks[@]}"; do
	query=${check%=*} want=${check##*=}
	got=$(value "$query")
	while [ "$got" != "$want" ]; do
		in_time || fail "$query = $got, want $want"
		sleep 0.5
		got=$(value "$query")
	done
	echo "ok  $query = $got"
done

step "wait for a few more scrapes, so rates have data"
# (Prometheus' discovery adds the target up to 5 s after start; rate()
# needs two samples.)
until [ "$(value 'count_over_time(up{job="venue-service"}[1m])')" -ge 3 ] 2>/dev/null; do
	in_time || fail "fewer than 3 scrapes of the example"
	sleep 0.5
done

step "alert rules loaded and evaluated"
mapfile -t alerts < <(sed -n 's/^ *- alert: *\([A-Za-z0-9_]*\).*/\1/p' examples/venue-service/alerts.yml | sort)
[ ${#alerts[@]} -gt 0 ] || fail "no alerts in alerts.yml"
while :; do
	rules=$(curl_ "$prom/api/v1/rules?type=alert")
	ok=$(jq -r '[.data.groups[].rules[] | select(.health == "ok") | .name] | sort | .[]' <<<"$rules")
	[ "$ok" = "$(printf '%s\n' "${alerts[@]}")" ] && break
	in_time || { jq -c '.data.groups[].rules[] | {name, health, lastError}' <<<"$rules"; fail "not every alert rule is loaded with health ok"; }
	sleep 0.5
done
jq -r '.data.groups[].rules[] | "ok  \(.name): health \(.health), state \(.state)"' <<<"$rules"
firing=$(jq -r '[.data.groups[].rules[] | select(.state != "inactive") | .name] | join(" ")' <<<"$rules")
[ -z "$firing" ] || fail "alerts pending or firing on a healthy load: $firing"

step "dashboard queries"
# Grafana's variables as Grafana fills them: every job, its rate interval.
n=0
while IFS= read -r expr; do
	query=${expr//\$__rate_interval/1m}
	query=${query//\$job/.*}
	answer=$(curl_ -G "$prom/api/v1/query" --data-urlencode "query=$query")
	[ "$(jq -r .status <<<"$answer")" = success ] || fail "dashboard query $query: $answer"
	series=$(jq -r '.data.result | length' <<<"$answer")
	# The load made no store error, lost lease, fail-open or 409; every
	# other panel shows data.
	if [ "$series" -eq 0 ] && ! grep -qE 'store_errors|lease_lost|store_unavailable' <<<"$query"; then
		fail "dashboard query has no data: $query"
	fi
	echo "ok  $series series: $query"
	n=$((n + 1))
done < <(jq -r '.panels[] | (., .panels[]?) | .targets[]?.expr' examples/venue-service/grafana-dashboard.json)
[ "$n" -gt 0 ] || fail "no dashboard queries"
jobs=$(curl_ -G "$prom/api/v1/label/job/values" --data-urlencode 'match[]=idempotency_requests_total' | jq -r '.data | join(",")')
[ "$jobs" = venue-service ] || fail "the dashboard's job variable finds $jobs"

step "done in $((SECONDS - start))s"
