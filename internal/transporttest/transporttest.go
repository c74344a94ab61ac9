// Package transporttest is the behavioural table that every transport of
// the idempotency middleware passes: net/http (the middleware itself),
// gRPC, Connect (its three protocols), Gin and Echo. Each transport
// describes how to serve one operation behind the middleware and how to
// call it ([Transport]); [Run] plays every [Scenario] against it, on a
// real server on loopback, and checks the same outcomes in the terms all
// transports share ([Reply]): first call, replay with the marker,
// concurrent duplicate, waiting duplicate, key reused with another input,
// failure and panic freeing the key, client gone, store down, tenant
// scope, missing and malformed keys.
//
// Tests wait for events (the operation entered, a duplicate waiting, an
// outcome reported), never for durations.
package transporttest

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/seed70ea8305/idempotency"
)

// TenantHeader is the header (metadata, lower case, for gRPC) that names
// the caller's tenant; each transport's scope reads it. A real service
// takes the tenant from authentication, never from a header.
const TenantHeader = "X-Tenant"

// ResultHeader is the response header (metadata, lower case, for gRPC)
// the operation sets to its output, so that a replay shows the stored
// headers come back.
const ResultHeader = "X-Result"

// EventBound is how long a test waits for an event before it fails:
// far beyond what a loaded machine needs, so it never decides a result.
const EventBound = 30 * time.Second

// Op is the one operation every transport serves: it gets the call's
// input and answers an output, or fails with an error (which the
// transport answers as its own internal error: HTTP 500, INTERNAL); it
// may panic. It runs concurrently for concurrent calls.
type Op func(ctx context.Context, input string) (output string, err error)

// Call is one call a scenario makes.
type Call struct {
	Tenant string
	Key    string // sent in the transport's key header or metadata; "" sends none
	Input  string
}

// Class is what a reply means, in terms every transport shares.
type Class string

// Classes of replies.
const (
	OK          Class = "ok"          // the operation's output
	Conflict    Class = "conflict"    // the key is held by a running call (409, ABORTED)
	Mismatch    Class = "mismatch"    // the key was used with another input (422, FAILED_PRECONDITION)
	BadKey      Class = "bad-key"     // no key, or a malformed one (400, INVALID_ARGUMENT)
	Unavailable Class = "unavailable" // the store is down; retry (503, UNAVAILABLE)
	Failed      Class = "failed"      // the operation failed (500, INTERNAL)
	Broken      Class = "broken"      // no answer: the call's context ended, or the connection broke
	Other       Class = "other"       // anything else
)

// Reply is what a transport's client got.
type Reply struct {
	Class Class
	// Status is the transport's own status ("201", "ABORTED"), for the
	// figures.
	Status string
	// Output is the operation's output, Result the ResultHeader, on a
	// success.
	Output string
	Result string
	// Replayed is set when the reply carries the replay marker.
	Replayed bool
	// RetryAfter is the advice to retry: Retry-After, or a RetryInfo; 0
	// when there is none.
	RetryAfter time.Duration
	// Err is the error of a call that got no answer.
	Err error
}

// String is the reply as the figures show it: class, status, marker
// and retry advice.
func (r Reply) String() string {
	s := string(r.Class) + " " + r.Status
	if r.Replayed {
		s += " replayed"
	}
	if r.RetryAfter > 0 {
		s += fmt.Sprintf(" retry-after=%v", r.RetryAfter)
	}
	return s
}

// Client calls a transport's server.
type Client interface {
	// Call makes one call and returns what it got; it returns when ctx
	// ends.
	Call(ctx context.Context, c Call) Reply
}

// Transport serves the operation behind the middleware.
type Transport struct {
	// Name names the transport in test names and figures.
	Name string
	// Serve starts a server on loopback (stopped when t ends) that serves
	// op behind an idempotency layer built on store with opts (whose
	// Observer and Wait the scenarios set), with each call's scope read
	// from TenantHeader, and the operation's output in ResultHeader; its
	// framework's own panic recovery, if it has one, sits outside the
	// layer. It returns a client of that server.
	Serve func(t *testing.T, store idempotency.Store, opts idempotency.Options, op Op) Client
}

// Scenario is one row of the table.
type Scenario struct {
	Name string
	// Options are laid over the defaults of the layer (Wait, say).
	Options idempotency.Options
	// Play makes the scenario's calls and checks them; it returns the
	// replies that matter, for the figures.
	Play func(t *testing.T, e *Env) []Reply
}

// Run plays every scenario of [Scenarios] against tr, each on a server of
// its own, and logs one line per scenario with what the transport
// answered: "RESULT <transport> <scenario>: <replies>".
func Run(t *testing.T, tr Transport) {
	for _, sc := range Scenarios {
		t.Run(sc.Name, func(t *testing.T) {
			e := newEnv(t, tr, sc.Options)
			replies := sc.Play(t, e)
			e.checkClaims(t)
			parts := make([]string, len(replies))
			for i, r := range replies {
				parts[i] = r.String()
			}
			t.Logf("RESULT %s %s: %s", tr.Name, sc.Name, strings.Join(parts, "; "))
		})
	}
}

// Env is what a scenario plays with: the transport's client, the
// operation's controls, the store and the observer's reports.
type Env struct {
	Client Client
	Store  *Store
	op     *opControl
	obs    *observer
}

func newEnv(t *testing.T, tr Transport, opts idempotency.Options) *Env {
	e := &Env{Store: NewStore(idempotency.NewMemoryStore(idempotency.MemoryOptions{})), op: newOpControl(), obs: &observer{changed: make(chan struct{})}}
	opts.Observer = e.obs.observe
	e.Client = tr.Serve(t, e.Store, opts, e.op.run)
	return e
}

// Call makes c with a context bounded by EventBound.
func (e *Env) Call(t *testing.T, c Call) Reply {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), EventBound)
	defer cancel()
	return e.Client.Call(ctx, c)
}

// Go makes c in a goroutine; the channel gets its reply.
func (e *Env) Go(ctx context.Context, c Call) <-chan Reply {
	out := make(chan Reply, 1)
	go func() { out <- e.Client.Call(ctx, c) }()
	return out
}

// checkClaims fails t if the operation ran without the call's claim in
// its context.
func (e *Env) checkClaims(t *testing.T) {
	t.Helper()
	e.op.mu.Lock()
	defer e.op.mu.Unlock()
	for _, problem := range e.op.claimProblems {
		t.Error(problem)
	}
}

// opControl is the operation the scenarios serve: it counts its runs,
// checks its claim, and blocks, fails or panics when told to.
type opControl struct {
	mu            sync.Mutex
	runs          int
	block         bool
	fail          map[int]bool // by run number, from 1
	panics        map[int]bool
	claimProblems []string
	entered       chan struct{} // one send per run, when block is set
	release       chan struct{} // closed to let blocked runs finish
}

func newOpControl() *opControl {
	return &opControl{fail: map[int]bool{}, panics: map[int]bool{}, entered: make(chan struct{}, 16), release: make(chan struct{})}
}

func (o *opControl) run(ctx context.Context, input string) (string, error) {
	o.mu.Lock()
	o.runs++
	n, block, fail, panics := o.runs, o.block, o.fail[o.runs], o.panics[o.runs]
	if claim, ok := idempotency.ClaimFromContext(ctx); !ok || claim.Key == "" || claim.Fingerprint == "" {
		o.claimProblems = append(o.claimProblems, fmt.Sprintf("run %d: no claim in the operation's context (%+v, %v)", n, claim, ok))
	}
	o.mu.Unlock()
	if block {
		o.entered <- struct{}{}
		select {
		case <-o.release:
		case <-time.After(EventBound):
			return "", errors.New("transporttest: never released")
		}
	}
	switch {
	case panics:
		panic(fmt.Sprintf("transporttest: panic in run %d", n))
	case fail:
		return "", fmt.Errorf("transporttest: failure in run %d", n)
	}
	return fmt.Sprintf("%s#%d", input, n), nil
}

// Runs returns how many times the operation ran.
func (e *Env) Runs() int {
	e.op.mu.Lock()
	defer e.op.mu.Unlock()
	return e.op.runs
}

// Block makes the operation's runs wait, after announcing themselves,
// until Release.
func (e *Env) Block() {
	e.op.mu.Lock()
	defer e.op.mu.Unlock()
	e.op.block = true
}

// Entered waits until a blocked run has started.
func (e *Env) Entered(t *testing.T) {
	t.Helper()
	select {
	case <-e.op.entered:
	case <-time.After(EventBound):
		t.Fatalf("the operation did not start within %v", EventBound)
	}
}

// Release lets blocked runs finish.
func (e *Env) Release() { close(e.op.release) }

// FailRun makes run n (from 1) fail; PanicRun makes it panic.
func (e *Env) FailRun(n int) {
	e.op.mu.Lock()
	defer e.op.mu.Unlock()
	e.op.fail[n] = true
}

// PanicRun makes run n (from 1) panic.
func (e *Env) PanicRun(n int) {
	e.op.mu.Lock()
	defer e.op.mu.Unlock()
	e.op.panics[n] = true
}

// observer records the middleware's reports.
type observer struct {
	mu      sync.Mutex
	reports []idempotency.Report
	changed chan struct{}
}

func (o *observer) observe(_ context.Context, r idempotency.Report) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.reports = append(o.reports, r)
	close(o.changed)
	o.changed = make(chan struct{})
}

// Outcomes returns the outcomes reported so far, in order.
func (e *Env) Outcomes() []idempotency.Outcome {
	e.obs.mu.Lock()
	defer e.obs.mu.Unlock()
	out := make([]idempotency.Outcome, len(e.obs.reports))
	for i, r := range e.obs.reports {
		out[i] = r.Outcome
	}
	return out
}

// AwaitOutcomes waits until n outcomes have been reported and returns
// them.
func (e *Env) AwaitOutcomes(t *testing.T, n int) []idempotency.Outcome {
	t.Helper()
	timeout := time.NewTimer(EventBound)
	defer timeout.Stop()
	for {
		e.obs.mu.Lock()
		got, changed := len(e.obs.reports), e.obs.changed
		e.obs.mu.Unlock()
		if got >= n {
			return e.Outcomes()
		}
		select {
		case <-changed:
		case <-timeout.C:
			t.Fatalf("%d outcomes reported after %v, want %d: %v", got, EventBound, n, e.Outcomes())
		}
	}
}
