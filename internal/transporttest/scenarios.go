package transporttest

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/seed70ea8305/idempotency"
)

// Scenarios is the table: every transport plays every row.
var Scenarios = []Scenario{
	{Name: "first", Play: playFirst},
	{Name: "replay", Play: playReplay},
	{Name: "concurrent duplicate", Play: playConcurrent},
	{Name: "wait", Options: idempotency.Options{Wait: EventBound}, Play: playWait},
	{Name: "other input", Play: playOtherInput},
	{Name: "failure frees the key", Play: playFailure},
	{Name: "panic frees the key", Play: playPanic},
	{Name: "client gone", Play: playClientGone},
	{Name: "store down", Play: playStoreDown},
	{Name: "tenant scope", Play: playTenantScope},
	{Name: "missing key", Play: playMissingKey},
	{Name: "invalid key", Play: playInvalidKey},
}

// The key of most scenarios: a UUID, as AIP-155 recommends.
const key = "0b6f4a5e-9a53-4e0f-8d7a-0d4c3f1b2a10"

func call(input string) Call { return Call{Tenant: "tenant-a", Key: key, Input: input} }

func playFirst(t *testing.T, e *Env) []Reply {
	r := e.Call(t, call("hall"))
	expectOK(t, r, "hall#1", false)
	expectRuns(t, e, 1)
	expectOutcomes(t, e, idempotency.OutcomeExecuted)
	return []Reply{r}
}

func playReplay(t *testing.T, e *Env) []Reply {
	first := e.Call(t, call("hall"))
	expectOK(t, first, "hall#1", false)
	again := e.Call(t, call("hall"))
	expectOK(t, again, "hall#1", true)
	expectRuns(t, e, 1)
	expectOutcomes(t, e, idempotency.OutcomeExecuted, idempotency.OutcomeReplayed)
	return []Reply{first, again}
}

func playConcurrent(t *testing.T, e *Env) []Reply {
	e.Block()
	firstc := e.Go(context.Background(), call("hall"))
	e.Entered(t)
	dup := e.Call(t, call("hall"))
	expectClass(t, dup, Conflict)
	if dup.RetryAfter <= 0 {
		t.Errorf("the duplicate's answer %v tells no wait before a retry", dup)
	}
	e.Release()
	first := <-firstc
	expectOK(t, first, "hall#1", false)
	expectRuns(t, e, 1)
	expectOutcomes(t, e, idempotency.OutcomeInFlight, idempotency.OutcomeExecuted)
	return []Reply{dup, first}
}

func playWait(t *testing.T, e *Env) []Reply {
	e.Block()
	firstc := e.Go(context.Background(), call("hall"))
	e.Entered(t)
	dupc := e.Go(context.Background(), call("hall"))
	e.Store.AwaitWaiting(t, 1)
	e.Release()
	first, dup := <-firstc, <-dupc
	expectOK(t, first, "hall#1", false)
	expectOK(t, dup, "hall#1", true)
	expectRuns(t, e, 1)
	// The waiter is woken once the outcome is stored, and may report
	// before the first call does.
	got := e.AwaitOutcomes(t, 2)
	slices.Sort(got)
	if want := []idempotency.Outcome{idempotency.OutcomeExecuted, idempotency.OutcomeReplayed}; !slices.Equal(got, want) {
		t.Errorf("outcomes %v, want %v in any order", got, want)
	}
	return []Reply{dup}
}

func playOtherInput(t *testing.T, e *Env) []Reply {
	first := e.Call(t, call("hall"))
	expectOK(t, first, "hall#1", false)
	other := e.Call(t, call("arena"))
	expectClass(t, other, Mismatch)
	expectRuns(t, e, 1)
	expectOutcomes(t, e, idempotency.OutcomeExecuted, idempotency.OutcomeMismatch)
	return []Reply{other}
}

func playFailure(t *testing.T, e *Env) []Reply {
	e.FailRun(1)
	failed := e.Call(t, call("hall"))
	expectClass(t, failed, Failed)
	retry := e.Call(t, call("hall"))
	expectOK(t, retry, "hall#2", false)
	expectRuns(t, e, 2)
	expectOutcomes(t, e, idempotency.OutcomeReleased, idempotency.OutcomeExecuted)
	return []Reply{failed, retry}
}

func playPanic(t *testing.T, e *Env) []Reply {
	e.PanicRun(1)
	panicked := e.Call(t, call("hall"))
	if panicked.Class != Failed && panicked.Class != Broken {
		t.Errorf("a panicking call got %v, want an internal error or a broken call", panicked)
	}
	retry := e.Call(t, call("hall"))
	expectOK(t, retry, "hall#2", false)
	expectRuns(t, e, 2)
	expectOutcomes(t, e, idempotency.OutcomeReleased, idempotency.OutcomeExecuted)
	return []Reply{panicked, retry}
}

func playClientGone(t *testing.T, e *Env) []Reply {
	e.Block()
	ctx, cancel := context.WithCancel(context.Background())
	gonec := e.Go(ctx, call("hall"))
	e.Entered(t)
	cancel()
	gone := <-gonec
	expectClass(t, gone, Broken)
	// The work was not cut short by the client leaving: it finishes, and
	// its outcome is stored for the client's retry.
	e.Release()
	e.AwaitOutcomes(t, 1)
	retry := e.Call(t, call("hall"))
	expectOK(t, retry, "hall#1", true)
	expectRuns(t, e, 1)
	expectOutcomes(t, e, idempotency.OutcomeExecuted, idempotency.OutcomeReplayed)
	return []Reply{gone, retry}
}

func playStoreDown(t *testing.T, e *Env) []Reply {
	e.Store.SetDown(true)
	down := e.Call(t, call("hall"))
	expectClass(t, down, Unavailable)
	if down.RetryAfter <= 0 {
		t.Errorf("the answer %v with the store down tells no wait before a retry", down)
	}
	expectRuns(t, e, 0)
	e.Store.SetDown(false)
	retry := e.Call(t, call("hall"))
	expectOK(t, retry, "hall#1", false)
	expectOutcomes(t, e, idempotency.OutcomeStoreError, idempotency.OutcomeExecuted)
	return []Reply{down, retry}
}

func playTenantScope(t *testing.T, e *Env) []Reply {
	a := e.Call(t, Call{Tenant: "tenant-a", Key: key, Input: "hall"})
	expectOK(t, a, "hall#1", false)
	b := e.Call(t, Call{Tenant: "tenant-b", Key: key, Input: "hall"})
	expectOK(t, b, "hall#2", false)
	againA := e.Call(t, Call{Tenant: "tenant-a", Key: key, Input: "hall"})
	expectOK(t, againA, "hall#1", true)
	expectRuns(t, e, 2)
	expectOutcomes(t, e, idempotency.OutcomeExecuted, idempotency.OutcomeExecuted, idempotency.OutcomeReplayed)
	return []Reply{b, againA}
}

func playMissingKey(t *testing.T, e *Env) []Reply {
	r := e.Call(t, Call{Tenant: "tenant-a", Input: "hall"})
	expectClass(t, r, BadKey)
	expectRuns(t, e, 0)
	expectOutcomes(t, e, idempotency.OutcomeRejected)
	return []Reply{r}
}

func playInvalidKey(t *testing.T, e *Env) []Reply {
	r := e.Call(t, Call{Tenant: "tenant-a", Key: strings.Repeat("k", 256), Input: "hall"})
	expectClass(t, r, BadKey)
	expectRuns(t, e, 0)
	expectOutcomes(t, e, idempotency.OutcomeRejected)
	return []Reply{r}
}

func expectClass(t *testing.T, r Reply, want Class) {
	t.Helper()
	if r.Class != want {
		t.Errorf("got %v (%v), want %s", r, r.Err, want)
	}
}

func expectOK(t *testing.T, r Reply, output string, replayed bool) {
	t.Helper()
	expectClass(t, r, OK)
	if r.Output != output || r.Result != output || r.Replayed != replayed {
		t.Errorf("got output %q, %s %q, replayed %v; want %q, replayed %v", r.Output, ResultHeader, r.Result, r.Replayed, output, replayed)
	}
}

func expectRuns(t *testing.T, e *Env, n int) {
	t.Helper()
	if got := e.Runs(); got != n {
		t.Errorf("the operation ran %d times, want %d", got, n)
	}
}

// expectOutcomes checks the outcomes reported, once that many have been.
func expectOutcomes(t *testing.T, e *Env, want ...idempotency.Outcome) {
	t.Helper()
	if got := e.AwaitOutcomes(t, len(want)); !slices.Equal(got, want) {
		t.Errorf("outcomes %v, want %v", got, want)
	}
}
