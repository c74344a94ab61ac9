// Package lincheck checks the idempotency store protocol for
// linearizability. Clients record every call they make to a store, with
// the times they made it and got its answer ([Recorder]); the checker
// (github.com/anishathalye/porcupine) then searches for one order of all
// those calls, each placed somewhere between its call and its answer, in
// which a single copy of the protocol's state machine ([Model]) gives
// every answer the clients got. When no such order exists the store broke
// the protocol (or the model is wrong: its rules are on [Model]), and
// [Visualize] writes the history as an HTML page to study, [Explain] and
// [Timeline] as text.
//
//	rec := lincheck.NewRecorder()
//	w := lincheck.Workload{Lease: time.Second}
//	w.Run(ctx, store, rec) // 8 clients contending for a few keys
//	res := lincheck.Check(rec.History(), time.Minute)
//	if res.Verdict != porcupine.Ok {
//		lincheck.Visualize(rec.History(), res.Failing, "history.html")
//	}
//
// [CheckReplies] checks what the middleware promises its clients on top of
// the store: a success a client got is what every later replay answers,
// and work a client was told succeeded is not done again.
//
// It is a module of its own so that porcupine is a dependency of this
// checker only, never of the library's users. Its tests record histories
// against every store (MemoryStore always; Redis, Redis Cluster and
// PostgreSQL when the environment names them, as .ci/run does), with and
// without faults:
//
//	cd internal/lincheck
//	IDEMPOTENCY_TEST_REDIS_URL=redis://127.0.0.1:6379/0 \
//	IDEMPOTENCY_TEST_REDIS_SERVER=$(command -v redis-server) \
//	IDEMPOTENCY_TEST_DATABASE_URL='postgres://postgres@127.0.0.1:5432/test?sslmode=disable' \
//	IDEMPOTENCY_TEST_REDIS_CLUSTER=127.0.0.1:30001,... \
//	IDEMPOTENCY_TEST_ARTIFACTS=/tmp/lincheck \
//	go test -race ./...
//
// A failing history is written to $IDEMPOTENCY_TEST_ARTIFACTS (else to the
// test's temporary directory, removed when the test ends), and the test
// prints the path.
package lincheck
