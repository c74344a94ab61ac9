#!/usr/bin/env bash
# What a program pays for importing only the root package: a fresh
# consumer module that wraps one handler with the middleware on the memory
# store, against a bare net/http program. Prints its go.mod requirements
# (direct and indirect), its go.sum lines and both binaries' sizes.
#
#   bash .ci/footprint.sh [repository directory, default: this checkout]
set -euo pipefail
repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
export GOWORK=off GOFLAGS=-mod=mod

mkdir -p "$dir/consumer" "$dir/bare"
cat > "$dir/consumer/main.go" <<'GO'
package main

import (
	"log"
	"net/http"

	"github.com/seed70ea8305/idempotency"
)

func main() {
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		log.Fatal(err)
	}
	http.Handle("POST /venues", mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
	})))
	log.Fatal(http.ListenAndServe("127.0.0.1:0", nil))
}
GO
cat > "$dir/bare/main.go" <<'GO'
package main

import (
	"log"
	"net/http"
)

func main() {
	http.Handle("POST /venues", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
	}))
	log.Fatal(http.ListenAndServe("127.0.0.1:0", nil))
}
GO
(cd "$dir/bare" && go mod init bare >/dev/null 2>&1 && go build -o bare . )
(cd "$dir/consumer" && go mod init consumer >/dev/null 2>&1 &&
	go mod edit -require=github.com/seed70ea8305/idempotency@v0.0.0-00010101000000-000000000000 \
		-replace=github.com/seed70ea8305/idempotency="$repo" &&
	go mod tidy >/dev/null 2>&1 && go build -o consumer .)

# Requirements: the lines of go.mod's require blocks and require lines.
requires=$(awk '/^require \(/{b=1;next} b&&/^\)/{b=0;next} b&&NF{n++} /^require [^(]/{n++} END{print n+0}' "$dir/consumer/go.mod")
graph=$(cd "$dir/consumer" && go list -m all | tail -n +2 | wc -l)
sums=$(wc -l < "$dir/consumer/go.sum")
size() { stat -c %s "$1"; }
echo "go.mod requirements: $requires (the library and what it needs); module graph: $graph modules"
echo "go.sum lines: $sums"
echo "binary: $(size "$dir/consumer/consumer") bytes, bare net/http: $(size "$dir/bare/bare") bytes"
echo "go.mod:"
sed 's/^/  /' "$dir/consumer/go.mod"
