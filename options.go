package idempotency

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"reflect"
	"strings"
	"time"
)

// Options configures a [Middleware] ([New]). The zero value is the
// defaults each field states; set only what you need:
//
//	mw, err := idempotency.New(store, idempotency.Options{
//		Scope: func(r *http.Request) string { return tenantOf(r) },
//	})
type Options struct {
	// Scope derives the scope of a request, typically the tenant or the
	// authenticated principal (never a header the client chooses freely).
	// Records are kept per scope and key: a key sent in one scope never
	// replays a response from another. It runs concurrently for
	// concurrent requests. Default: one scope for every request, so keys
	// are shared by all clients and a client that learns another's key
	// could read that client's response: set a scope on any API with more
	// than one client.
	Scope func(r *http.Request) string

	// Lease is how long a claim on a key lasts without renewal. While the
	// handler runs its lease is renewed every Lease/3; its context ends,
	// with a cause wrapping [ErrLeaseLost], before the store could let
	// anyone else claim the key: at the send time of the last successful
	// claim or renewal, plus Lease, minus min(StoreTimeout, Lease/4) and
	// Lease/1000. If the process dies, the key frees itself after one
	// lease: keep it short, it is how long a crash blocks retries. At
	// least 1 ms, shorter than TTL. Default: 30 s.
	Lease time.Duration

	// TTL is how long a stored response is kept for replay. Default: 24 h,
	// as Stripe does.
	TTL time.Duration

	// StoreTimeout bounds each store call. Calls made after the handler
	// (storing the outcome, freeing the key) are detached from the
	// request's cancellation, so this timeout is their only bound.
	// Default: 3 s.
	StoreTimeout time.Duration

	// MaxBodyBytes caps the request body read to fingerprint it; a larger
	// body gets 413 and changes nothing stored. Default: 1 MiB.
	MaxBodyBytes int64

	// MaxStoredBytes caps the response body kept for replay. A response
	// that outgrows it is stored without its body when it passes the cap,
	// before any of it is sent, and then streams to its client whole; a
	// retry gets the original status and headers with an empty body (see
	// [Response.BodyOmitted]). Negative keeps no body at all. Default:
	// 1 MiB.
	MaxStoredBytes int

	// Methods are the request methods the middleware protects (upper
	// case); others pass through untouched. Default: POST and PATCH, the
	// methods that are not idempotent by definition.
	Methods []string

	// KeyOptional lets requests without a key through, unprotected
	// (reported as [OutcomeUnprotected]), instead of answering 400.
	KeyOptional bool

	// Fingerprint decides when two requests under one key are the same
	// request: exactly when their fingerprints are equal. It gets the body
	// already read, which it must not keep after it returns; it runs
	// concurrently for concurrent requests. An error rejects the request:
	// one wrapping [ErrInvalidJSON] or another of the package's request
	// errors answers 400, anything else 500, both with fixed text.
	// Default: the zero [Fingerprinter] (method, path, query, Content-Type
	// and body).
	Fingerprint func(r *http.Request, body []byte) (string, error)

	// Retryable decides which response statuses free the key instead of
	// being stored, so that a retry runs the handler again. To store only
	// successes: func(status int) bool { return status >= 300 }. Stripe's
	// rule stores everything but 409, 429 and 5xx. A handler decides for
	// its own response with [Claim.Keep], which overrides it. Default:
	// every 5xx, 408 and 429, answers that say "try again".
	Retryable func(status int) bool

	// Wait lets a duplicate of a request that is still running (same key,
	// same fingerprint) wait up to Wait for the first attempt's outcome
	// instead of getting 409 at once: it then gets the replay, or the 409
	// (with Retry-After) when the wait ends first. A request may ask for
	// less with Prefer: wait=N (RFC 7240, seconds; wait=0 asks not to
	// wait), never for more. A different fingerprint still gets 422 at
	// once.
	//
	// The store wakes the waiters when the outcome is stored or the key
	// freed ([MemoryStore] directly, [RedisStore] through one pub/sub
	// connection per store, per Redis node for a Cluster); a wake-up that
	// is lost is covered by a re-read at the end of the holder's lease and
	// at the deadline, so a waiter never waits past Wait (plus one store
	// call) and never misses an outcome that was stored. A [Store] from
	// another package cannot wake waiters; they re-read it every 100 ms.
	// When the first attempt fails and frees the key, exactly one waiter
	// claims it and runs the handler; the others wait for its outcome. A
	// waiter costs no goroutine of its own and one timer. Default: 0,
	// duplicates get 409 at once.
	Wait time.Duration

	// MaxWaiters caps how many requests of this middleware wait at once;
	// above it a duplicate gets 409 at once. Default: 1000.
	MaxWaiters int

	// Streaming passes each response through to the client as the
	// handler writes it, instead of holding it until its outcome is
	// stored: for routes whose responses stream (large exports, progress
	// reports), which then reach the client sooner. The promise is
	// weaker: when storing the outcome fails, or the lease was lost, after
	// the client received a success, nothing is stored, and the client's
	// retry runs the handler again and may answer differently. Flush
	// writes through. Give it to a Middleware that wraps only such
	// routes; a handler whose store commits the response with its own
	// writes ([Claim.HoldResponse], pgstore's Tx) is held all the same.
	Streaming bool

	// CancelOnDisconnect ends the handler's context when the client
	// disconnects, as net/http does without this middleware. A handler
	// that then returns without writing is taken as cut short: nothing is
	// stored and the key is freed. Default: a disconnect does not reach
	// the handler, so finished work is stored and the client's retry gets
	// the replay.
	CancelOnDisconnect bool

	// FailOpen runs the handler unprotected when the store fails, instead
	// of answering 503; each such request is reported as
	// [OutcomeUnprotected] with the store's error, and logged.
	FailOpen bool

	// StoredHeader decides which of the response headers the handler set
	// are stored and replayed; it gets the canonical name. Headers set
	// before the middleware ran (by outer middleware, for that request)
	// are stored only when the handler changed them; hop-by-hop headers
	// and trailers never are. Default: every header but Set-Cookie, which
	// would hand one client's session to another.
	StoredHeader func(name string) bool

	// ReplayHeader is the response header set to "true" on a replay.
	// Default: X-Idempotent-Replayed.
	ReplayHeader string

	// ErrorHandler answers rejected requests. It receives one of the
	// package's errors, possibly wrapped; it runs concurrently for
	// concurrent requests. Default: [WriteError], which writes
	// application/problem+json.
	ErrorHandler func(w http.ResponseWriter, r *http.Request, err error)

	// Observer is called once for every request, after its outcome is
	// known: the hook for metrics (package idemotel) and for an audit log
	// of replays. It runs on the request's goroutine, concurrently for
	// concurrent requests, and should be quick.
	Observer func(ctx context.Context, r Report)

	// Logger gets, as warnings, what an operator must know about: store
	// failures, lost leases, unreadable records, requests served
	// unprotected. It never logs an Idempotency-Key, which would let a
	// reader fetch the stored response, only key_hash, the first 16 hex
	// digits of its SHA-256. Default: nil, silent.
	Logger *slog.Logger

	// Shutdown ends the context of every running handler, and of any
	// started after, with a cause wrapping [ErrShutdown], when it ends:
	// pass the context your server's shutdown cancels. A handler that then
	// returns without answering is taken as cut short. Default: nil, a
	// handler's context ends only when its lease is lost.
	Shutdown context.Context
}

// WebhookOptions configures a [WebhookHandler] ([NewWebhookHandler]). The
// zero value is the defaults each field states.
type WebhookOptions struct {
	// Scope puts the handler's events in a namespace of their own, so one
	// store can serve several endpoints (or several accounts of one
	// provider) whose functions do different work: the same event ID under
	// two scopes is processed once in each. Events of different providers
	// never collide, whatever the scope. Default: "".
	Scope string

	// Lease, TTL, StoreTimeout: as in [Options]. TTL is how long a
	// processed event is remembered against redelivery. Defaults: 30 s,
	// 7 days (Stripe retries an undelivered event for 3 days), 3 s.
	Lease        time.Duration
	TTL          time.Duration
	StoreTimeout time.Duration

	// MaxBodyBytes caps the delivery's body; a larger one gets 413 and
	// changes nothing. Default: 64 KiB.
	MaxBodyBytes int64

	// KeepPayload keeps each processed event's payload in its record, as
	// the [Response.Body] of the record completed under the event's
	// claim, for audits (see [WebhookHandler.Event]). Records then take
	// the payload's size in the store. Default: false.
	KeepPayload bool

	// Observer, Logger, Shutdown: as in [Options], for deliveries. A
	// function's error is logged as its text: keep payloads and secrets
	// out of it.
	Observer func(ctx context.Context, r Report)
	Logger   *slog.Logger
	Shutdown context.Context
}

// Defaults.
const (
	defaultLease          = 30 * time.Second
	defaultStoreTimeout   = 3 * time.Second
	defaultMaxWaiters     = 1000
	defaultReplayHeader   = "X-Idempotent-Replayed"
	defaultWebhookTTL     = 7 * 24 * time.Hour
	defaultWebhookMaxBody = 64 << 10
	minLease              = time.Millisecond
)

// settings is what the engine, the middleware and the webhook handler run
// with: an Options or a WebhookOptions with the defaults filled in and
// checked.
type settings struct {
	// Shared.
	lease        time.Duration
	ttl          time.Duration
	storeTimeout time.Duration
	maxBodyBytes int64
	observer     func(context.Context, Report)
	logger       *slog.Logger
	shutdown     context.Context

	// Middleware.
	methods            map[string]bool
	keyOptional        bool
	replayHeader       string
	maxStoredBytes     int
	scope              func(*http.Request) string
	fingerprint        func(*http.Request, []byte) (string, error)
	retryable          func(status int) bool
	failOpen           bool
	errorHandler       func(http.ResponseWriter, *http.Request, error)
	storeHeader        func(name string) bool
	cancelOnDisconnect bool
	streaming          bool
	wait               time.Duration // 0: duplicates do not wait
	maxWaiters         int

	// Webhook.
	webhookScope string
	keepPayload  bool
	now          func() time.Time // tests move it
}

// or returns v, or def when v is the zero value.
func or[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// shared fills in and checks what the middleware and the webhook handler
// share.
func (s *settings) shared(lease, ttl, storeTimeout time.Duration, maxBody int64) error {
	s.lease, s.ttl, s.storeTimeout, s.maxBodyBytes = or(lease, defaultLease), ttl, or(storeTimeout, defaultStoreTimeout), maxBody
	switch {
	case s.lease < minLease:
		return fmt.Errorf("idempotency: Lease %v is shorter than %v", s.lease, minLease)
	case s.ttl <= 0:
		return fmt.Errorf("idempotency: TTL %v is not positive", s.ttl)
	case s.lease >= s.ttl:
		return fmt.Errorf("idempotency: Lease %v must be shorter than the TTL %v", s.lease, s.ttl)
	case s.storeTimeout <= 0:
		return fmt.Errorf("idempotency: StoreTimeout %v is not positive", s.storeTimeout)
	case s.maxBodyBytes <= 0:
		return fmt.Errorf("idempotency: MaxBodyBytes %d is not positive", s.maxBodyBytes)
	}
	return nil
}

// settings checks o and fills in its defaults.
func (o Options) settings() (settings, error) {
	s := settings{
		observer:           o.Observer,
		logger:             o.Logger,
		shutdown:           o.Shutdown,
		keyOptional:        o.KeyOptional,
		replayHeader:       http.CanonicalHeaderKey(strings.TrimSpace(or(o.ReplayHeader, defaultReplayHeader))),
		maxStoredBytes:     max(or(o.MaxStoredBytes, 1<<20), 0),
		scope:              o.Scope,
		fingerprint:        o.Fingerprint,
		retryable:          o.Retryable,
		failOpen:           o.FailOpen,
		errorHandler:       o.ErrorHandler,
		storeHeader:        o.StoredHeader,
		cancelOnDisconnect: o.CancelOnDisconnect,
		streaming:          o.Streaming,
		wait:               o.Wait,
		maxWaiters:         or(o.MaxWaiters, defaultMaxWaiters),
	}
	if err := s.shared(o.Lease, or(o.TTL, 24*time.Hour), o.StoreTimeout, or(o.MaxBodyBytes, 1<<20)); err != nil {
		return s, err
	}
	if s.scope == nil {
		s.scope = func(*http.Request) string { return "" }
	}
	if s.fingerprint == nil {
		s.fingerprint = Fingerprinter{}.Fingerprint
	}
	if s.retryable == nil {
		s.retryable = defaultRetryable
	}
	if s.errorHandler == nil {
		s.errorHandler = WriteError
	}
	if s.storeHeader == nil {
		s.storeHeader = defaultStoredHeader
	}
	if len(o.Methods) == 0 {
		s.methods = map[string]bool{http.MethodPost: true, http.MethodPatch: true}
	} else {
		s.methods = make(map[string]bool, len(o.Methods))
		for _, m := range o.Methods {
			if m == "" || strings.ToUpper(m) != m {
				return s, fmt.Errorf("idempotency: method %q must be upper case", m)
			}
			s.methods[m] = true
		}
	}
	switch {
	case o.Wait < 0:
		return s, fmt.Errorf("idempotency: Wait %v is negative", o.Wait)
	case o.MaxWaiters < 0:
		return s, fmt.Errorf("idempotency: MaxWaiters %d is negative", o.MaxWaiters)
	}
	return s, nil
}

// settings checks o and fills in its defaults.
func (o WebhookOptions) settings() (settings, error) {
	s := settings{
		observer:     o.Observer,
		logger:       o.Logger,
		shutdown:     o.Shutdown,
		webhookScope: o.Scope,
		keepPayload:  o.KeepPayload,
		now:          time.Now,
	}
	err := s.shared(o.Lease, or(o.TTL, defaultWebhookTTL), o.StoreTimeout, or(o.MaxBodyBytes, defaultWebhookMaxBody))
	return s, err
}

func defaultRetryable(status int) bool {
	return status >= 500 || status == http.StatusRequestTimeout || status == http.StatusTooManyRequests
}

func defaultStoredHeader(name string) bool { return name != "Set-Cookie" }

// isNilStore reports whether store is nil, or a nil pointer in an
// interface (a *MemoryStore that was never made), which would panic on
// the first request instead of failing at construction.
func isNilStore(store Store) bool {
	if store == nil {
		return true
	}
	v := reflect.ValueOf(store)
	return v.Kind() == reflect.Pointer && v.IsNil()
}

// errNilStore is what the constructors answer a nil store.
var errNilStore = errors.New("idempotency: store is nil")
