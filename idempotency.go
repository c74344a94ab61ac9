// Package idempotency makes HTTP APIs and webhook handlers safe to retry.
//
// The middleware built by [New] gives every POST and PATCH route that it
// wraps the behaviour of Stripe's API and of the IETF Idempotency-Key
// draft: the first request with a given Idempotency-Key runs the handler
// and its response is stored; a retry with the same key and the same
// request gets the stored response again, marked with
// X-Idempotent-Replayed: true; a retry while the first is still running
// gets 409 (with Retry-After, the rest of the first's lease), or waits for
// the first's outcome and gets the replay ([Options].Wait); the same key
// with a different request gets 422. Failed attempts (5xx, panics,
// handlers cut short) free the key so the client can retry.
//
//	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
//	mw, err := idempotency.New(store, idempotency.Options{
//		Scope: func(r *http.Request) string { return tenantOf(r) },
//	})
//	if err != nil {
//		return err
//	}
//	mux.Handle("POST /venues", mw.Handler(http.HandlerFunc(createVenue)))
//
// Records live in a [Store]: [MemoryStore] for one process, [RedisStore]
// for several, or PostgreSQL (module pgstore), where the stored response
// can commit in the handler's own transaction. [WebhookHandler] runs each
// webhook event once, for Stripe, Standard Webhooks, GitHub or any
// provider a [Verifier] describes, and [StripeKey] derives idempotency
// keys for outgoing Stripe calls from the request being served.
//
// # What a lease promises
//
// A claim on a key is a lease: renewed while the handler runs, lapsing
// after [Options].Lease if the process dies, so that a crash blocks
// retries for one lease at most. No lease can stop a process that is
// paused (a long GC pause, a frozen VM or container, SIGSTOP) and resumes
// after another instance took its key over. What this package promises
// instead:
//
//   - the handler's context tells the truth: it reports the end of the
//     lease (Err non-nil, Done closed, a cause wrapping [ErrLeaseLost]) as
//     soon as the lease's deadline has passed on the monotonic clock, also
//     in a process resumed from a pause before any timer ran; check it
//     right before a side effect;
//   - every write is fenced: a store refuses every write of an owner whose
//     lease lapsed, and [Claim].Fence, which grows with every new owner of
//     a key and never goes backwards (not even across a Redis restart that
//     lost its data), lets a downstream system refuse it too
//     (UPDATE … SET …, fence = $1 WHERE id = $2 AND fence < $1);
//   - no answer leaves before its outcome is stored: responses are held
//     until the store has them, so a client never gets a success that a
//     replay would contradict; it gets 503 and retries instead.
//
// # What is stored, and when
//
// The route's rule ([Options].Retryable) decides which statuses are stored
// and which free the key: by default every answer but 5xx, 408 and 429 is
// kept for [Options].TTL. Then, from the least to the most involved:
//
//   - [Claim.Keep], from the handler, overrides the rule for its own
//     response: store it for a TTL of its own, or store nothing;
//   - responses are held until stored; [Options].Streaming passes them
//     through instead, for routes that stream, with a weaker promise;
//   - [Claim.Checkpoint] records a recovery point between the steps of a
//     handler that calls other systems, so that a retry after a crash or a
//     failure resumes after the last step instead of starting over;
//   - pgstore's Tx commits the handler's own rows and the stored response
//     in one transaction, and its Phase commits a step's rows with its
//     recovery point: use them when the handler's data lives in the same
//     PostgreSQL.
package idempotency

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/seed70ea8305/idempotency/internal/recordkey"
)

// Outcome names what happened to one request or webhook delivery. Its
// values are stable and short, fit for metric labels.
type Outcome string

// Outcomes reported to an observer ([Options].Observer).
const (
	// OutcomeExecuted: the handler ran and its response was stored. For
	// webhooks: the event was processed.
	OutcomeExecuted Outcome = "executed"
	// OutcomeReplayed: a stored response was sent again. For webhooks: a
	// duplicate delivery of a processed event.
	OutcomeReplayed Outcome = "replayed"
	// OutcomeInFlight: rejected with 409, the same key is still running.
	OutcomeInFlight Outcome = "in_flight"
	// OutcomeMismatch: rejected with 422, the key belongs to another request.
	OutcomeMismatch Outcome = "mismatch"
	// OutcomeRejected: rejected before any lookup (bad key, body, signature).
	OutcomeRejected Outcome = "rejected"
	// OutcomeReleased: the attempt failed (retryable status, panic, cut
	// short); the key was freed for a retry. For webhooks: processing
	// failed.
	OutcomeReleased Outcome = "released"
	// OutcomeStoreError: the store failed; the request was refused (503),
	// or its outcome could not be recorded.
	OutcomeStoreError Outcome = "store_error"
	// OutcomeLeaseLost: the handler ran but its claim lapsed before the
	// response could be stored; nothing was stored.
	OutcomeLeaseLost Outcome = "lease_lost"
	// OutcomeUnprotected: the handler ran without protection: the request
	// carried no key and the route allows that ([Options].KeyOptional), or
	// the store failed and the route fails open ([Options].FailOpen), when
	// Err is the store's error.
	OutcomeUnprotected Outcome = "unprotected"
	// OutcomeUnreadable: the record under the key cannot be read
	// ([ErrRecordUnreadable]); the request was refused with 500 and
	// nothing ran.
	OutcomeUnreadable Outcome = "unreadable"
)

// Report describes the outcome of one request or webhook delivery, for an
// observer ([Options].Observer).
type Report struct {
	// Kind is "http" for the middleware, "<provider>-webhook" (for example
	// "stripe-webhook") for the webhook
	// helper, as in [Claim].
	Kind    string
	Outcome Outcome
	// Scope and Key identify the record; for webhooks Key is the event ID.
	Scope string
	Key   string
	// Method and Path of the HTTP request, when there is one, and Route,
	// the pattern that matched it ([http.Request.Pattern], empty without a
	// ServeMux pattern): a label of low cardinality, where Path is not.
	Method string
	Path   string
	Route  string
	// Status is the HTTP status sent, 0 if none was.
	Status int
	// Duration is how long the handler ran, 0 if it did not.
	Duration time.Duration
	// Err is the error behind a rejection, a failure or a store failure.
	Err error
	// EventType is the event's type, for a webhook delivery that was
	// verified: a label of low cardinality. APIVersion is a Stripe event's
	// API version (which may differ from stripe-go's: see
	// [NewStripeVerifier]).
	EventType  string
	APIVersion string
	// Attempts, for a webhook delivery whose function failed, counts the
	// failed attempts the store has recorded for the event, this one
	// included; 0 when the store keeps no history ([FailureRecorder]).
	Attempts int
}

// recordKey names a claim's record in a [Store].
func recordKey(kind, scope, key string) string { return recordkey.Name(kind, scope, key) }

const (
	httpRecordKind = "http"
	keyHeader      = "Idempotency-Key"
)

// Middleware makes handlers idempotent. It is safe for concurrent use;
// create it with [New].
type Middleware struct {
	engine *engine
	s      settings
	// ownFingerprint: Options.Fingerprint is the default Fingerprinter,
	// which serve makes in one allocation with the record's key.
	ownFingerprint bool

	// headers holds the http.Header of the last response stored, which
	// the next one shares when it stores the same headers (see
	// recorder.snapshot).
	headers atomic.Value
}

// New returns a Middleware that keeps its records in store, configured by
// opts (its zero value is the defaults). It fails when store is nil or an
// option is invalid.
func New(store Store, opts Options) (*Middleware, error) {
	if isNilStore(store) {
		return nil, errNilStore
	}
	s, err := opts.settings()
	if err != nil {
		return nil, err
	}
	return &Middleware{engine: newEngine(store, &s, false), s: s, ownFingerprint: opts.Fingerprint == nil}, nil
}

// Handler wraps next. Its signature fits routers that take
// func(http.Handler) http.Handler middleware.
//
// The handler runs at most once per key at a time, across every process
// sharing the store. Its context carries the request's values and the
// [Claim]; it is cancelled when the lease is lost (see [Options].Lease), on
// shutdown ([Options].Shutdown), and not when the client disconnects unless
// [Options].CancelOnDisconnect is set. The context reports a lost lease as
// soon as the lease's deadline has passed on the monotonic clock, even in
// a process resumed from a pause longer than the lease before any timer
// ran: check ctx.Err() (or Done) of the handler's own context right before
// a side effect, and guard writes to other systems with [Claim.Fence]. A
// handler that returns without writing a response after its context was
// cancelled is taken as cut short: nothing is stored, the key is freed,
// and a client still connected gets 503. A handler that writes nothing
// otherwise answers 200, which is stored.
//
// No answer leaves before its outcome is stored: the writer the handler
// gets holds the response, and the client gets it only once
// [Store.Complete] succeeded; when storing fails, or the lease was lost
// meanwhile, the client gets a 503 problem with Retry-After instead (and
// the key is free for its retry), never a success that a replay would
// contradict. A response that is not stored (a retryable status, see
// [Options].Retryable) is sent once the key is freed. A response whose
// body outgrows [Options].MaxStoredBytes is stored, with its status and
// headers and without its body, when it passes that size and before any
// of it is sent; the rest then streams through. [Options].Streaming gives up
// holding for routes that stream, with a weaker promise.
//
// The writer records the response for replay, like
// [http.TimeoutHandler]'s contract spelled out:
//   - headers are snapshotted at the first WriteHeader (or Write): the
//     headers the handler set, less those outer middleware had set before
//     the middleware ran, hop-by-hop headers, trailers, and what
//     [Options].StoredHeader leaves out (by default Set-Cookie);
//   - the first final status wins; 1xx statuses pass through and are never
//     stored (a 101 frees the key); 5xx, 408 and 429 free the key
//     ([Options].Retryable);
//   - the body is recorded through Write only, up to [Options].MaxStoredBytes;
//     there is deliberately no ReadFrom, so io.Copy cannot bypass it;
//   - Flush and [http.ResponseController] Flush do nothing while the
//     response is held, and write through once it is not (with
//     [Options].Streaming, or past the size limit); Hijack fails with an error
//     wrapping [http.ErrNotSupported], since a hijacked connection cannot
//     be replayed; deadlines and full duplex reach the connection through
//     Unwrap; trailers are sent but not stored;
//   - a Write after storing failed returns the error, so the handler can
//     stop.
//
// A duplicate of a request still running gets 409 with Retry-After (the
// rest of the running request's lease, rounded up to whole seconds), or,
// with [Options].Wait, waits for its outcome. The handler decides for its own
// response with [Claim.Keep] whether, and for how long, it is stored.
//
// A handler that does several things in turn can record recovery points
// with [Claim.Checkpoint], so that a retry after a crash or a failure
// resumes after the last one instead of starting over.
//
// A panic frees the key, then continues with its original stack.
func (m *Middleware) Handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !m.s.methods[r.Method] {
			next.ServeHTTP(w, r)
			return
		}
		m.serve(w, r, next)
	})
}

func (m *Middleware) serve(w http.ResponseWriter, r *http.Request, next http.Handler) {
	rep := Report{Kind: httpRecordKind, Method: r.Method, Path: r.URL.Path, Route: r.Pattern}
	key, err := requestKey(r.Header, keyHeader)
	if err == ErrKeyMissing && m.s.keyOptional {
		m.serveUnprotected(w, r, next, &rep, OutcomeUnprotected, nil)
		return
	}
	if err != nil {
		m.reject(w, r, &rep, OutcomeRejected, err)
		return
	}
	rep.Key = key

	buf := getBuffer()
	defer putBuffer(buf)
	body, err := readBody(r, m.s.maxBodyBytes, buf)
	if err != nil {
		m.reject(w, r, &rep, OutcomeRejected, err)
		return
	}
	storeKey, token, fingerprint, err := m.claimStrings(r, *body, &rep)
	if err != nil {
		m.reject(w, r, &rep, OutcomeRejected, fingerprintError(err))
		return
	}
	created := time.Now()

	claim := Record{Token: token, Fingerprint: fingerprint, CreatedAt: created}
	got, err := m.engine.acquire(r.Context(), storeKey, claim)
	if err == nil && got.existing != nil && got.existing.Response == nil && got.existing.Fingerprint == fingerprint && m.s.wait > 0 {
		// Only a duplicate of a running request gets here: the fast path
		// pays for waiting with one comparison.
		if d := waitFor(r.Header, m.s.wait); d > 0 {
			got, err = m.engine.wait(r.Context(), storeKey, claim, got, time.Now().Add(d))
		}
	}
	existing := got.existing
	switch {
	case errors.Is(err, ErrRecordUnreadable):
		// Not an outage: retrying cannot help, and running the handler
		// could do the work twice. 500, until the record ends or an
		// operator removes it.
		rep.Err = err
		m.log(r.Context(), "idempotency: the record under this key is unreadable; remove it with Middleware.Remove", &rep)
		m.reject(w, r, &rep, OutcomeUnreadable, err)
	case err != nil && m.s.failOpen:
		rep.Err = err
		m.log(r.Context(), "idempotency: store failed, serving unprotected", &rep)
		r.Body = &bodyReader{b: *body}
		m.serveUnprotected(w, r, next, &rep, OutcomeUnprotected, err)
	case err != nil:
		rep.Err = err
		m.log(r.Context(), "idempotency: store failed, request refused", &rep)
		m.reject(w, r, &rep, OutcomeStoreError, err)
	// The fingerprint is compared before the in-flight state, so a
	// different request under a running key learns of its mistake (422)
	// instead of being told to retry (409).
	case existing != nil && existing.Fingerprint != fingerprint:
		m.reject(w, r, &rep, OutcomeMismatch, ErrFingerprintMismatch)
	case existing != nil && existing.Response == nil:
		m.reject(w, r, &rep, OutcomeInFlight, keyInUse(existing))
	case existing != nil:
		m.replay(w, existing.Response)
		rep.Outcome, rep.Status = OutcomeReplayed, existing.Response.StatusCode
		m.observe(r.Context(), &rep)
	default:
		a := &httpAttempt{m: m, w: w, r: r, next: next, rep: rep}
		a.claim = Claim{Kind: httpRecordKind, Scope: rep.Scope, Key: key, Fingerprint: fingerprint, Route: r.Pattern, created: created}
		a.key, a.token = storeKey, token
		a.body.b = *body
		a.hold.Store(!m.s.streaming)
		a.rec = recorder{w: w, capture: true, maxBody: m.s.maxStoredBytes, keep: m.s.storeHeader, shared: &m.headers, hold: &a.hold, spill: a}
		if outer := w.Header(); len(outer) > 0 {
			a.rec.outer = outer.Clone()
		}
		ctx := m.engine.start(&a.attempt, r.Context(), got, m.s.cancelOnDisconnect)
		m.engine.execute(ctx, &a.attempt, a)
		a.rec.free()
	}
}

// claimStrings returns what a claim on the request's key is made of: the
// record's key (with the request's scope, which it sets in rep) and the
// request's fingerprint, made as one string since a stored record keeps
// both, and a new owner token, apart since it is dropped once the record
// is complete. The fingerprint comes first: when it fails, the scope is
// not asked for.
func (m *Middleware) claimStrings(r *http.Request, body []byte, rep *Report) (storeKey, token, fingerprint string, err error) {
	var buf [256]byte
	b := buf[:0]
	if m.ownFingerprint {
		b, err = Fingerprinter{}.appendFingerprint(b, r, body)
	} else {
		fingerprint, err = m.s.fingerprint(r, body)
	}
	if err != nil {
		return "", "", "", err
	}
	rep.Scope = m.s.scope(r)
	fp := len(b)
	b = recordkey.Append(b, httpRecordKind, rep.Scope, rep.Key)
	all := string(b)
	if m.ownFingerprint {
		fingerprint = all[:fp]
	}
	return all[fp:], rand.Text(), fingerprint, nil
}

// Do runs work once per key, as [Middleware.Handler] runs a handler, for
// requests that do not arrive as an *http.Request: gRPC, Connect, a queue's
// messages. It uses the same store, leases, fences, waiting ([Options].Wait,
// for up to the whole Wait), held outcome and observer as Handler; the
// transport adapters (modules idemgrpc and others) are built on it.
//
// call names the request: Kind (what serves it, such as "grpc"; records
// are kept per kind), Scope, Key (1 to 255 printable ASCII characters, as
// [ParseKey] reads them) and Fingerprint (its identity: the same key with
// another fingerprint is [ErrFingerprintMismatch]); Route, a label of low
// cardinality for the observer. work runs as the owner of the key, with
// the claim in its context (see [ClaimFromContext]) and a context that
// tells the truth about the lease, and returns the outcome to store, whose
// StatusCode is an HTTP status that [Options].Retryable and [Claim.Keep]
// judge as for HTTP (a retryable one frees the key instead), or an error,
// which frees the key.
//
// Do returns the stored outcome: the one work returned (replayed false)
// once it is stored, or the one an earlier call stored (replayed true). It
// returns an error wrapping [ErrKeyInvalid], [ErrFingerprintMismatch],
// [ErrKeyInUse] (another call holds the key), [ErrStoreUnavailable] or
// [ErrRecordUnreadable] without running work; work's own error, wrapped,
// when it failed; the response work returned with an error wrapping
// [ErrLeaseLost] or [ErrStoreUnavailable] when it could not be stored:
// never report that response as a success, since a retry runs work again.
// A response that is not to be stored (a retryable status) comes back
// with a nil error. [StatusCode] of any error is the HTTP status the
// middleware would answer.
func (m *Middleware) Do(ctx context.Context, call Claim, work func(ctx context.Context) (*Response, error)) (resp *Response, replayed bool, err error) {
	if call.Kind == "" || call.Kind == httpRecordKind {
		return nil, false, errors.New("idempotency: Do needs a Kind of its own, such as \"grpc\"")
	}
	rep := Report{Kind: call.Kind, Scope: call.Scope, Key: call.Key, Route: call.Route}
	if _, err := ParseKey(call.Key); err != nil {
		rep.Outcome, rep.Err, rep.Status = OutcomeRejected, err, StatusCode(err)
		m.observe(ctx, &rep)
		return nil, false, err
	}
	storeKey := recordKey(call.Kind, call.Scope, call.Key)
	token := rand.Text()
	created := time.Now()
	claim := Record{Token: token, Fingerprint: call.Fingerprint, CreatedAt: created}
	got, err := m.engine.acquire(ctx, storeKey, claim)
	if err == nil && got.existing != nil && got.existing.Response == nil && got.existing.Fingerprint == call.Fingerprint && m.s.wait > 0 {
		got, err = m.engine.wait(ctx, storeKey, claim, got, time.Now().Add(m.s.wait))
	}
	existing := got.existing
	finish := func(outcome Outcome, err error) error {
		rep.Outcome, rep.Err = outcome, err
		if err != nil {
			rep.Status = StatusCode(err)
		}
		m.observe(ctx, &rep)
		return err
	}
	switch {
	case errors.Is(err, ErrRecordUnreadable):
		rep.Err = err
		m.log(ctx, "idempotency: the record under this key is unreadable; remove it", &rep)
		return nil, false, finish(OutcomeUnreadable, err)
	case err != nil:
		rep.Err = err
		m.log(ctx, "idempotency: store failed, call refused", &rep)
		return nil, false, finish(OutcomeStoreError, err)
	case existing != nil && existing.Fingerprint != call.Fingerprint:
		return nil, false, finish(OutcomeMismatch, ErrFingerprintMismatch)
	case existing != nil && existing.Response == nil:
		return nil, false, finish(OutcomeInFlight, keyInUse(existing))
	case existing != nil:
		rep.Status = existing.Response.StatusCode
		finish(OutcomeReplayed, nil)
		return existing.Response, true, nil
	}
	a := &callAttempt{m: m, ctx: ctx, work: work, rep: rep}
	a.claim = Claim{Kind: call.Kind, Scope: call.Scope, Key: call.Key, Fingerprint: call.Fingerprint, Route: call.Route, created: created}
	a.key, a.token = storeKey, token
	a.hold.Store(true) // the caller gets the outcome only once it is stored
	workCtx := m.engine.start(&a.attempt, ctx, got, m.s.cancelOnDisconnect)
	m.engine.execute(workCtx, &a.attempt, a)
	return a.resp, false, a.err
}

// callAttempt is one run of the work of [Middleware.Do].
type callAttempt struct {
	attempt
	m        *Middleware
	ctx      context.Context
	work     func(context.Context) (*Response, error)
	rep      Report
	resp     *Response // what work answered
	workErr  bool      // work returned an error
	returned bool
	err      error
}

func (a *callAttempt) run(ctx context.Context) (*Record, string, error) {
	start := time.Now()
	resp, err := a.work(ctx)
	a.rep.Duration = time.Since(start)
	a.returned = true
	switch {
	case err != nil:
		a.workErr = true
		return nil, err.Error(), err
	case resp == nil:
		return nil, "", errors.New("idempotency: Do's work returned neither a response nor an error")
	case resp.StatusCode < http.StatusOK || resp.StatusCode > 999:
		return nil, "", fmt.Errorf("idempotency: Do's work answered status %d, which cannot be stored", resp.StatusCode)
	}
	a.resp = resp
	a.rep.Status = resp.StatusCode
	keep := a.keep.Load()
	if keep == keepNothing || (keep == 0 && a.m.s.retryable(resp.StatusCode)) {
		return nil, "", errKeptNothing
	}
	return newCompletion(*resp), "", nil
}

func (a *callAttempt) settled(outcome Outcome, err error) {
	a.rep.Outcome, a.rep.Err = outcome, err
	switch {
	case !a.returned:
		// A panic: it goes on after this.
	case a.workErr:
		a.err = err
	case outcome == OutcomeExecuted:
	case a.resp != nil && errors.Is(err, errKeptNothing):
		// Not stored, as the route's rule says: the caller may send it.
		a.err = nil
	case a.resp != nil:
		// Not stored: the caller must not report it as a success.
		a.err = err
		a.rep.Status = StatusCode(err)
		a.m.log(a.ctx, "idempotency: the call's outcome could not be stored", &a.rep)
	default:
		a.err = err
	}
	a.m.observe(a.ctx, &a.rep)
}

// Remove deletes the record kept for key (as the client sends it in
// Idempotency-Key) in scope (as [Options].Scope derives it), whatever its
// state: the operator's way out of a record that cannot be read
// ([ErrRecordUnreadable]), which the logger names by its scope and
// key_hash. A request under the key then runs its handler afresh. A
// record in flight loses its owner, so a duplicate may run while the
// first still does: remove only records that are unreadable or known to
// be abandoned. The error wraps [errors.ErrUnsupported] when the store
// cannot remove records ([Inspector]; every store of this module can), and
// [ErrKeyInvalid] for a key the middleware would refuse.
func (m *Middleware) Remove(ctx context.Context, scope, key string) error {
	if _, err := ParseKey(key); err != nil {
		return err
	}
	inspector, ok := findStore[Inspector](m.engine.store)
	if !ok {
		return fmt.Errorf("idempotency: %T cannot remove records: %w", m.engine.store, errors.ErrUnsupported)
	}
	callCtx, cancel := m.engine.bound(ctx)
	defer cancel()
	if err := inspector.Remove(callCtx, recordKey(httpRecordKind, scope, key)); err != nil {
		return fmt.Errorf("%w: removing a record: %w", ErrStoreUnavailable, err)
	}
	return nil
}

// serveUnprotected runs next without a claim and reports it afterwards,
// with the status it answered and how long it ran.
func (m *Middleware) serveUnprotected(w http.ResponseWriter, r *http.Request, next http.Handler, rep *Report, outcome Outcome, err error) {
	start := time.Now()
	rec := recorder{w: w}
	next.ServeHTTP(&rec, r)
	rep.Outcome, rep.Err, rep.Status, rep.Duration = outcome, err, rec.statusOr200(), time.Since(start)
	m.observe(r.Context(), rep)
}

// fingerprintError keeps the package's own request errors (with their
// detail) and turns any other error into one that shows no text: 400 when
// it wraps one of the package's errors, 500 otherwise.
func fingerprintError(err error) error {
	var re *requestError
	if errors.As(err, &re) {
		return err
	}
	return fmt.Errorf("idempotency: fingerprint: %w", err)
}

// httpAttempt is one run of a handler as the owner of its key: the
// attempt, the recorder and the body, in one allocation.
type httpAttempt struct {
	attempt
	m    *Middleware
	w    http.ResponseWriter
	r    *http.Request
	next http.Handler
	rec  recorder
	body bodyReader
	rep  Report

	returned bool // the handler returned (did not panic)
}

func (a *httpAttempt) run(ctx context.Context) (*Record, string, error) {
	r := a.r.WithContext(ctx)
	r.Body = &a.body
	start := time.Now()
	a.next.ServeHTTP(&a.rec, r)
	a.rep.Duration = time.Since(start)
	a.returned = true

	if !a.rec.wroteHeader && ctx.Err() != nil {
		cause := context.Cause(ctx)
		if a.r.Context().Err() == nil { // the client is still there
			a.m.s.errorHandler(a.w, a.r, cause)
			a.rep.Status = StatusCode(cause)
		}
		return nil, "", fmt.Errorf("idempotency: handler cut short: %w", cause)
	}
	a.rec.commit()
	a.rep.Status = a.rec.status
	switch {
	case a.rec.status < http.StatusOK:
		return nil, "", fmt.Errorf("idempotency: handler answered %d, which cannot be replayed", a.rec.status)
	case !a.stored(a.rec.status):
		if ctx.Err() != nil { // say why: a lost lease, a shutdown
			return nil, "", fmt.Errorf("idempotency: handler answered %d: %w", a.rec.status, context.Cause(ctx))
		}
		return nil, "", fmt.Errorf("idempotency: handler answered %d", a.rec.status)
	}
	return a.rec.response(), "", nil
}

// stored reports whether a response with status is to be stored rather
// than free the key: by the route's rule, unless the handler decided
// otherwise with [Claim.Keep].
func (a *httpAttempt) stored(status int) bool {
	keep := a.keep.Load()
	return keep > 0 || (keep == 0 && !a.m.s.retryable(status))
}

// spill settles a held response that has outgrown the stored-size limit,
// before any of it is sent: a response to be stored is stored now, with
// its status and headers and its body omitted (as a replay of it gives
// it), so that the client never gets a success the store does not hold;
// one that is not to be stored is simply sent on. When storing fails, the
// client gets the error instead, the work is cancelled, and spill returns
// the error.
func (a *httpAttempt) spill() error {
	if !a.stored(a.rec.status) {
		return nil
	}
	outcome, err := a.engine.complete(&a.attempt, newCompletion(Response{StatusCode: a.rec.status, Header: a.rec.header, BodyOmitted: true}))
	a.settle(outcome, err)
	if err == nil {
		return nil
	}
	a.lease.Cancel(err)
	a.rec.dropHeaders()
	a.m.s.errorHandler(a.w, a.r, err)
	a.rep.Status = StatusCode(err)
	return fmt.Errorf("idempotency: the response was not sent: %w", err)
}

func (a *httpAttempt) settled(outcome Outcome, err error) {
	a.rep.Outcome, a.rep.Err = outcome, err
	if a.rep.Status == 0 {
		a.rep.Status = a.rec.status
	}
	if a.rec.held && a.returned {
		switch {
		case !a.stored(a.rec.status):
			// Not a response to store (a 5xx, a 429): the client may
			// have it whether or not freeing the key worked.
			a.rec.sendHeld()
		case outcome == OutcomeStoreError || outcome == OutcomeLeaseLost:
			// Not stored (nor, with a transaction, committed): the client
			// must not take it for a success.
			a.rec.dropHeaders()
			a.m.s.errorHandler(a.w, a.r, err)
			a.rep.Status = StatusCode(err)
		default:
			a.rec.sendHeld()
		}
	}
	switch outcome {
	case OutcomeLeaseLost:
		a.m.log(a.r.Context(), "idempotency: lease lost before the response was stored", &a.rep)
	case OutcomeStoreError:
		a.m.log(a.r.Context(), "idempotency: the store failed after the handler ran", &a.rep)
	}
	a.m.observe(a.r.Context(), &a.rep)
}

// replay writes a stored response. Headers the current response already
// has (set by outer middleware for this request) are left as they are.
func (m *Middleware) replay(w http.ResponseWriter, resp *Response) {
	h := w.Header()
	for name, values := range resp.Header {
		if _, set := h[name]; !set {
			h[name] = slices.Clone(values)
		}
	}
	if resp.BodyOmitted {
		h.Set("Content-Length", "0")
	}
	h[m.s.replayHeader] = []string{"true"}
	w.WriteHeader(resp.StatusCode)
	w.Write(resp.Body)
}

func (m *Middleware) reject(w http.ResponseWriter, r *http.Request, rep *Report, outcome Outcome, err error) {
	m.s.errorHandler(w, r, err)
	rep.Outcome, rep.Status = outcome, StatusCode(err)
	if rep.Err == nil {
		rep.Err = err
	}
	m.observe(r.Context(), rep)
}

func (m *Middleware) observe(ctx context.Context, rep *Report) {
	if m.s.observer != nil {
		m.s.observer(ctx, *rep)
	}
}

func (m *Middleware) log(ctx context.Context, msg string, rep *Report) {
	if m.s.logger == nil {
		return
	}
	m.s.logger.LogAttrs(ctx, slog.LevelWarn, msg,
		slog.String("scope", rep.Scope),
		slog.String("key_hash", keyHash(rep.Key)),
		slog.String("method", rep.Method),
		slog.String("path", rep.Path),
		slog.Any("error", rep.Err),
	)
}

// keyHash names a key in logs without revealing it: whoever knows a key
// can read the response stored under it. It is the first 16 hex digits of
// its SHA-256, enough to match log lines with each other and with a key
// the operator is given.
func keyHash(key string) string {
	if key == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:8])
}

// requestKey extracts the key from the request headers; name is canonical.
func requestKey(h http.Header, name string) (string, error) {
	values := h[name]
	switch len(values) {
	case 0:
		return "", ErrKeyMissing
	case 1:
		return ParseKey(values[0])
	default:
		return "", newRequestError(ErrKeyInvalid, "several "+name+" headers")
	}
}

// maxKeyLength is the longest Idempotency-Key accepted, Stripe's limit.
const maxKeyLength = 255

// ParseKey returns the key carried by one Idempotency-Key header value. It
// accepts the draft standard's form, an RFC 8941 string ("abc", with \" and
// \\ escapes), and the bare form most clients send (abc); both name the
// same key. A key is 1 to 255 printable ASCII characters; a bare key has no
// spaces, quotes or commas (a comma means a list of keys). Errors wrap
// [ErrKeyInvalid].
func ParseKey(value string) (string, error) {
	value = strings.Trim(value, " \t")
	var key string
	if strings.HasPrefix(value, `"`) {
		var err error
		if key, err = parseQuotedKey(value); err != nil {
			return "", err
		}
	} else {
		for i := 0; i < len(value); i++ {
			switch c := value[i]; {
			case c == ',':
				return "", newRequestError(ErrKeyInvalid, "several keys in one header")
			case c == '"' || c == ' ' || c == '\t':
				return "", newRequestError(ErrKeyInvalid, fmt.Sprintf("unquoted key contains %q", c))
			case c < 0x21 || c > 0x7e:
				return "", newRequestError(ErrKeyInvalid, "not printable ASCII")
			}
		}
		key = value
	}
	switch {
	case key == "":
		return "", newRequestError(ErrKeyInvalid, "empty")
	case len(key) > maxKeyLength:
		return "", newRequestError(ErrKeyInvalid, fmt.Sprintf("longer than %d characters", maxKeyLength))
	}
	return key, nil
}

func parseQuotedKey(value string) (string, error) {
	var b strings.Builder
	for i := 1; i < len(value); i++ {
		c := value[i]
		switch {
		case c == '\\':
			i++
			if i == len(value) || (value[i] != '"' && value[i] != '\\') {
				return "", newRequestError(ErrKeyInvalid, "bad escape in quoted key")
			}
			b.WriteByte(value[i])
		case c == '"':
			if i != len(value)-1 {
				return "", newRequestError(ErrKeyInvalid, "characters after the quoted key")
			}
			return b.String(), nil
		case c < 0x20 || c > 0x7e:
			return "", newRequestError(ErrKeyInvalid, "not printable ASCII")
		default:
			b.WriteByte(c)
		}
	}
	return "", newRequestError(ErrKeyInvalid, "unterminated quoted key")
}

// recorder passes a response through to the client and, when capture is
// set, records it for replay (see [Middleware.Handler] for the contract).
type recorder struct {
	w           http.ResponseWriter
	capture     bool
	maxBody     int
	keep        func(name string) bool
	outer       http.Header   // the headers set before the handler ran; nil if none
	shared      *atomic.Value // the http.Header last stored, to share; nil: none
	hold        *atomic.Bool  // hold the response until it is stored; nil never
	spill       spiller       // settles a held response that outgrew maxBody
	held        bool          // the response is held, not yet sent
	failed      error         // the response was given up: Write returns it
	wroteHeader bool
	status      int
	header      http.Header
	body        []byte  // what was recorded, in pooled; response copies or keeps it
	pooled      *[]byte // the pooled buffer body grows in; nil until used
	omitted     bool
}

func (rec *recorder) Header() http.Header { return rec.w.Header() }

func (rec *recorder) WriteHeader(code int) {
	// 1xx answers other than 101 are informational; the final status
	// follows. Later calls are superfluous: net/http ignores them too.
	informational := code >= 100 && code < 200 && code != http.StatusSwitchingProtocols
	if !rec.wroteHeader && !informational && rec.hold != nil && rec.hold.Load() {
		rec.held = true
	}
	if !rec.held {
		rec.w.WriteHeader(code)
	}
	if rec.wroteHeader || informational {
		return
	}
	rec.wroteHeader, rec.status = true, code
	if rec.capture {
		rec.header = rec.snapshot(rec.w.Header())
	}
}

// snapshot copies the headers of h that belong to the handler's response.
// A route's responses mostly carry the same headers (a Content-Type): when
// they equal the last snapshot stored, that one is returned instead of a
// copy, so that the records share one map (about 400 bytes and three
// allocations a record). Sharing is safe because nothing modifies a
// stored record's headers: the stores keep or encode them, replays copy
// them.
func (rec *recorder) snapshot(h http.Header) http.Header {
	n, size := 0, 0
	for name, values := range h {
		if rec.stored(name, values) {
			n++
			size += len(values)
		}
	}
	if n == 0 {
		return nil
	}
	if rec.shared != nil {
		if last, _ := rec.shared.Load().(http.Header); len(last) == n && rec.matches(h, last) {
			return last
		}
	}
	kept := make(http.Header, n)
	all := make([]string, 0, size) // one backing array, as Header.Clone does
	for name, values := range h {
		if rec.stored(name, values) {
			all = append(all, values...)
			kept[name] = all[len(all)-len(values) : len(all) : len(all)]
		}
	}
	if rec.shared != nil {
		rec.shared.Store(kept)
	}
	return kept
}

// matches reports whether every header of h that is stored has the same
// values in last, which holds as many names as are stored.
func (rec *recorder) matches(h, last http.Header) bool {
	for name, values := range h {
		if rec.stored(name, values) {
			if kept, ok := last[name]; !ok || !slices.Equal(kept, values) {
				return false
			}
		}
	}
	return true
}

func (rec *recorder) stored(name string, values []string) bool {
	if hopByHop(name) || strings.HasPrefix(name, http.TrailerPrefix) || !rec.keep(name) {
		return false
	}
	outer, set := rec.outer[name]
	return !set || !slices.Equal(outer, values)
}

// hopByHop reports whether a header describes one connection or the
// trailers, not the response, so it is not replayed.
func hopByHop(name string) bool {
	switch name {
	case "Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade", "Trailer", "Te":
		return true
	}
	return false
}

func (rec *recorder) Write(p []byte) (int, error) {
	if !rec.wroteHeader {
		rec.WriteHeader(http.StatusOK)
	}
	if rec.failed != nil {
		return 0, rec.failed
	}
	// Record what the handler wrote even if the client is gone: the retry
	// deserves the whole response.
	if rec.capture && !rec.omitted {
		if len(rec.body)+len(p) <= rec.maxBody {
			if rec.pooled == nil {
				rec.pooled = getBuffer()
				rec.body = (*rec.pooled)[:0]
			}
			rec.body = append(rec.body, p...)
		} else if rec.held {
			if err := rec.release(); err != nil {
				return 0, err
			}
		} else {
			rec.omitted, rec.body = true, nil
		}
	}
	if rec.held {
		return len(p), nil
	}
	return rec.w.Write(p)
}

// spiller settles the outcome of a held response that outgrew the
// stored-size limit; httpAttempt is one.
type spiller interface{ spill() error }

// release ends the holding of a response that outgrew maxBody: once spill
// has settled its outcome, what was held is sent and the rest streams
// through, recorded as omitted.
func (rec *recorder) release() error {
	rec.held = false
	if err := rec.spill.spill(); err != nil {
		rec.failed = err
		return err
	}
	rec.omitted = true
	rec.sendHeld()
	rec.body = nil
	return nil
}

// sendHeld writes the held response to the client; its headers are
// already in place.
func (rec *recorder) sendHeld() {
	rec.w.WriteHeader(rec.status)
	rec.w.Write(rec.body)
}

// dropHeaders takes the headers the handler set off the response, before
// an error answer replaces a response that was held.
func (rec *recorder) dropHeaders() {
	h := rec.w.Header()
	for name := range h {
		if outer, set := rec.outer[name]; set {
			h[name] = outer
		} else {
			delete(h, name)
		}
	}
}

// FlushError sends buffered data to the client; [http.ResponseController]
// calls it. Flushing before WriteHeader commits the implicit 200.
func (rec *recorder) FlushError() error {
	if !rec.wroteHeader {
		rec.WriteHeader(http.StatusOK)
	}
	if rec.held {
		return nil
	}
	return http.NewResponseController(rec.w).Flush()
}

// Flush implements [http.Flusher] for handlers that still assert it.
func (rec *recorder) Flush() { _ = rec.FlushError() }

// Hijack refuses: a hijacked connection's bytes cannot be recorded, so a
// replay would be empty. It returns an error wrapping [http.ErrNotSupported].
func (rec *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return nil, nil, fmt.Errorf("idempotency: cannot hijack a recorded response: %w", http.ErrNotSupported)
}

// Unwrap gives [http.ResponseController] the underlying writer, for
// deadlines and full duplex.
func (rec *recorder) Unwrap() http.ResponseWriter { return rec.w }

// commit makes the implicit 200 of a handler that wrote nothing explicit,
// so the header snapshot is taken now.
func (rec *recorder) commit() {
	if !rec.wroteHeader {
		rec.WriteHeader(http.StatusOK)
	}
}

func (rec *recorder) statusOr200() int {
	if !rec.wroteHeader {
		return http.StatusOK
	}
	return rec.status
}

func (rec *recorder) response() *Record {
	done, kept := newCompletionCopy(Response{StatusCode: rec.status, Header: rec.header, BodyOmitted: rec.omitted}, rec.body)
	if kept {
		rec.pooled = nil // the record has the buffer now
	}
	return done
}

// free gives back the buffer the body was recorded in, once the response
// has been sent and stored.
func (rec *recorder) free() {
	if rec.pooled == nil {
		return
	}
	if cap(rec.body) > cap(*rec.pooled) {
		*rec.pooled = rec.body // it grew: keep the larger one
	}
	putBuffer(rec.pooled)
	rec.pooled, rec.body = nil, nil
}

// Request bodies are read into pooled buffers: a body is needed only
// until the handler returns (net/http forbids reading it after), so the
// same few buffers serve every request. So are the responses recorded,
// which are needed until sent and stored (as a copy).
var bufferPool = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// maxPooledBuffer keeps rare large bodies from pinning memory in the pool.
const maxPooledBuffer = 64 << 10

func getBuffer() *[]byte { return bufferPool.Get().(*[]byte) }

func putBuffer(b *[]byte) {
	if cap(*b) <= maxPooledBuffer {
		*b = (*b)[:0]
		bufferPool.Put(b)
	}
}

// readBody reads the whole request body into buf, up to limit bytes, and
// returns buf.
func readBody(r *http.Request, limit int64, buf *[]byte) (*[]byte, error) {
	b := (*buf)[:0]
	if r.Body == nil || r.Body == http.NoBody {
		*buf = b
		return buf, nil
	}
	if r.ContentLength > limit {
		return nil, newRequestError(ErrBodyTooLarge, fmt.Sprintf("%d bytes, limit %d", r.ContentLength, limit))
	}
	if want := r.ContentLength + 1; want > 1 && int64(cap(b)) < want { // +1: room to read the EOF
		b = make([]byte, 0, want)
	}
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := r.Body.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if int64(len(b)) > limit {
			return nil, newRequestError(ErrBodyTooLarge, fmt.Sprintf("limit %d bytes", limit))
		}
		if err == io.EOF {
			*buf = b
			return buf, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBodyUnreadable, err)
		}
	}
}

// bodyReader gives the handler the body the middleware read.
type bodyReader struct {
	b   []byte
	off int
}

func (r *bodyReader) Read(p []byte) (int, error) {
	if r.off >= len(r.b) {
		return 0, io.EOF
	}
	n := copy(p, r.b[r.off:])
	r.off += n
	return n, nil
}

// WriteTo lets io.Copy and io.ReadAll-like callers take the bytes at once.
func (r *bodyReader) WriteTo(w io.Writer) (int64, error) {
	n, err := w.Write(r.b[r.off:])
	r.off += n
	return int64(n), err
}

func (r *bodyReader) Close() error { return nil }
