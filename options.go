package idempotency

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"
)

// Option configures a [Middleware] ([New]), a [WebhookHandler]
// ([NewWebhookHandler]), a [RedisStore] ([NewRedisStore]) or a
// [MemoryStore] ([NewMemoryStore]). Options
// shared by the middleware and the webhook helper say so; the others name
// what they configure, and the other constructors reject them. An invalid
// option makes the constructor fail.
type Option struct {
	name    string
	targets target
	apply   func(*settings) error
}

type target uint8

const (
	forMiddleware target = 1 << iota
	forWebhook
	forRedisStore
	forMemoryStore
	forBoth = forMiddleware | forWebhook
)

// settings is what the options set, for both constructors; each fills in
// its own defaults first.
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
	tolerance        time.Duration
	webhookScope     string
	ignoreAPIVersion bool
	keepPayload      bool
	now              func() time.Time

	// RedisStore.
	redisPrefix  string
	waitReplicas int
	waitTimeout  time.Duration

	// MemoryStore.
	memoryMaxRecords int
	memoryMaxBytes   int64
}

// Defaults shared by the middleware and the webhook helper.
const (
	defaultLease        = 30 * time.Second
	defaultStoreTimeout = 3 * time.Second
	minLease            = time.Millisecond
)

// apply runs opts for the constructor of t, then checks what depends on
// more than one setting.
func (s *settings) apply(t target, opts []Option) error {
	for _, opt := range opts {
		if opt.apply == nil {
			return errors.New("idempotency: zero Option")
		}
		if opt.targets&t == 0 {
			return fmt.Errorf("idempotency: %s does not apply to a %s", opt.name, t)
		}
		if err := opt.apply(s); err != nil {
			return fmt.Errorf("idempotency: %s: %w", opt.name, err)
		}
	}
	if t&forBoth != 0 && s.lease >= s.ttl {
		return fmt.Errorf("idempotency: lease %v must be shorter than the TTL %v", s.lease, s.ttl)
	}
	return nil
}

func (t target) String() string {
	switch t {
	case forWebhook:
		return "WebhookHandler"
	case forRedisStore:
		return "RedisStore"
	case forMemoryStore:
		return "MemoryStore"
	}
	return "Middleware"
}

func option(name string, t target, apply func(*settings) error) Option {
	return Option{name: name, targets: t, apply: apply}
}

func positive[T int64 | time.Duration](what string, v T) error {
	if v <= 0 {
		return fmt.Errorf("%s %v is not positive", what, v)
	}
	return nil
}

func notNil(what string, isNil bool) error {
	if isNil {
		return fmt.Errorf("%s is nil", what)
	}
	return nil
}

// WithLease sets how long a claim on a key lasts without renewal. While the
// work runs (a handler, a webhook function) its lease is renewed every
// lease/3; its context is cancelled, with a cause wrapping [ErrLeaseLost],
// before the store could let anyone else claim the key: at the send time of
// the last successful claim or renewal, plus lease, minus min(store
// timeout, lease/4) and lease/1000. If the process dies, the key frees
// itself after one lease: keep it short, it is how long a crash blocks
// retries. At least 1 ms, shorter than the TTL. Shared. Default: 30 s.
func WithLease(d time.Duration) Option {
	return option("WithLease", forBoth, func(s *settings) error {
		if d < minLease {
			return fmt.Errorf("lease %v is shorter than %v", d, minLease)
		}
		s.lease = d
		return nil
	})
}

// WithTTL sets how long an outcome is kept: a completed response for
// replay, a processed webhook event against redelivery. Shared. Default:
// 24 h for the middleware (as Stripe does); 7 days for the webhook helper
// (Stripe retries an undelivered event for 3 days).
func WithTTL(d time.Duration) Option {
	return option("WithTTL", forBoth, func(s *settings) error {
		s.ttl = d
		return positive("TTL", d)
	})
}

// WithStoreTimeout bounds each store call. Calls made after the work
// (storing the outcome, freeing the key) are detached from the request's
// cancellation, so this timeout is their only bound. Shared. Default: 3 s.
func WithStoreTimeout(d time.Duration) Option {
	return option("WithStoreTimeout", forBoth, func(s *settings) error {
		s.storeTimeout = d
		return positive("store timeout", d)
	})
}

// WithMaxBodyBytes caps the request body read (to fingerprint it, or to
// verify a webhook); a larger body gets 413 and changes nothing stored.
// Shared. Default: 1 MiB for the middleware, 64 KiB for the webhook helper.
func WithMaxBodyBytes(n int64) Option {
	return option("WithMaxBodyBytes", forBoth, func(s *settings) error {
		s.maxBodyBytes = n
		return positive("max body bytes", n)
	})
}

// WithObserver calls observe once for every request or delivery, after
// its outcome is known: the hook for metrics and for an audit log of
// replays. Given more than once, every observer is called, in order. It runs on the request's goroutine, concurrently for
// concurrent requests, and should be quick. Shared. Default: none.
func WithObserver(observe func(ctx context.Context, r Report)) Option {
	return option("WithObserver", forBoth, func(s *settings) error {
		if observe == nil {
			return errors.New("observer is nil")
		}
		if previous := s.observer; previous != nil {
			s.observer = func(ctx context.Context, r Report) { previous(ctx, r); observe(ctx, r) }
		} else {
			s.observer = observe
		}
		return nil
	})
}

// WithLogger logs what an operator must know about, as warnings: store
// failures, lost leases, requests served unprotected, failed webhook
// functions. It never logs an Idempotency-Key, which would let a reader
// fetch the stored response, only key_hash, the first 16 hex digits of
// its SHA-256. A webhook function's error is logged as its text: keep
// payloads and secrets out of it. Shared. Default: nil, silent.
func WithLogger(l *slog.Logger) Option {
	return option("WithLogger", forBoth, func(s *settings) error {
		s.logger = l
		return nil
	})
}

// WithShutdown cancels the context of every running handler or webhook
// function, with a cause wrapping [ErrShutdown], when ctx ends, and of any
// started after: pass the context your server's shutdown cancels. Work
// that then returns without answering is treated as cut short (see
// [Middleware.Handler]). Without it, a handler's context ends only when
// its lease is lost. Shared. Default: none.
func WithShutdown(ctx context.Context) Option {
	return option("WithShutdown", forBoth, func(s *settings) error {
		s.shutdown = ctx
		return notNil("shutdown context", ctx == nil)
	})
}

// WithMethods sets the request methods the middleware protects; other
// methods pass through untouched. Middleware. Default: POST and PATCH, the
// methods that are not idempotent by definition.
func WithMethods(methods ...string) Option {
	return option("WithMethods", forMiddleware, func(s *settings) error {
		if len(methods) == 0 {
			return errors.New("no methods")
		}
		s.methods = make(map[string]bool, len(methods))
		for _, m := range methods {
			if m == "" || strings.ToUpper(m) != m {
				return fmt.Errorf("method %q must be upper case", m)
			}
			s.methods[m] = true
		}
		return nil
	})
}

// WithKeyOptional lets requests without a key through, unprotected,
// instead of rejecting them with 400. Middleware. Default: the key is
// required.
func WithKeyOptional() Option {
	return option("WithKeyOptional", forMiddleware, func(s *settings) error {
		s.keyOptional = true
		return nil
	})
}

// WithWait lets a duplicate of a request that is still running (same key,
// same fingerprint) wait up to d for the first attempt's outcome instead
// of getting 409 at once: it then gets the replay, or the 409 (with
// Retry-After) when the wait ends first. A request may ask for less with
// a Prefer: wait=N header (RFC 7240, seconds; wait=0 asks not to wait),
// never for more than d. A different fingerprint still gets 422 at once.
//
// The store wakes the waiters when the outcome is stored or the key freed
// ([MemoryStore] directly, [RedisStore] through one pub/sub connection per
// store, Redis node for a Cluster); a wake-up that is lost is covered by a
// re-read at the end of the holder's lease and at the deadline, so a
// waiter never waits past d (plus one store call) and never misses an
// outcome that was stored. A [Store] from another package cannot wake
// waiters; they re-read it every 100 ms. When the first attempt fails and frees the
// key, exactly one waiter claims it and runs the handler; the others wait
// for its outcome. A waiter costs no goroutine of its own and one timer;
// a request that does not wait costs nothing.
//
// At most maxWaiters requests of this middleware wait at once; above that,
// a duplicate gets 409 at once. Middleware. Default: off (a duplicate gets
// 409 at once).
func WithWait(d time.Duration, maxWaiters int) Option {
	return option("WithWait", forMiddleware, func(s *settings) error {
		if maxWaiters < 1 {
			return fmt.Errorf("max waiters %d: need at least one", maxWaiters)
		}
		s.wait, s.maxWaiters = d, maxWaiters
		return positive("wait", d)
	})
}

// WithMaxStoredBytes caps the response body kept for replay. A larger
// response still reaches the first client whole, and its key is still
// completed, so a retry never runs the handler again; the retry gets the
// original status and headers with an empty body (see
// [Response.BodyOmitted]). Middleware. Default: 1 MiB.
func WithMaxStoredBytes(n int) Option {
	return option("WithMaxStoredBytes", forMiddleware, func(s *settings) error {
		s.maxStoredBytes = n
		if n < 0 {
			return fmt.Errorf("max stored bytes %d is negative", n)
		}
		return nil
	})
}

// WithScope derives the scope of a request, typically the tenant or the
// authenticated principal (never a header the client chooses freely).
// Records are kept per scope and key: a key sent in one scope never
// replays a response from another. It runs on the request's goroutine,
// concurrently for concurrent requests. Middleware.
//
// Default: one scope for every request. Keys are then shared by all
// clients, and a client that learns another's key could read that client's
// response, so set a scope on any API with more than one client.
func WithScope(scope func(r *http.Request) string) Option {
	return option("WithScope", forMiddleware, func(s *settings) error {
		s.scope = scope
		return notNil("scope function", scope == nil)
	})
}

// WithFingerprint sets how requests are fingerprinted: two requests under
// one key are the same request exactly when their fingerprints are equal.
// fn gets the body already read, which it must not keep after it returns;
// it runs concurrently for concurrent requests. An error rejects the
// request: one wrapping [ErrInvalidJSON] or another of the package's
// request errors answers 400, anything else 500, both with fixed text.
// Middleware. Default: the zero [Fingerprinter] (method, path, query and
// body).
func WithFingerprint(fn func(r *http.Request, body []byte) (string, error)) Option {
	return option("WithFingerprint", forMiddleware, func(s *settings) error {
		s.fingerprint = fn
		return notNil("fingerprint function", fn == nil)
	})
}

// WithRetryableStatus decides which response statuses free the key instead
// of being stored, so that a retry runs the handler again: it is the
// route's storage rule. To store only successes, free every other status:
//
//	idempotency.WithRetryableStatus(func(status int) bool { return status >= 300 })
//
// Stripe's rule stores everything except 409, 429 and 5xx:
//
//	idempotency.WithRetryableStatus(func(status int) bool {
//		return status >= 500 || status == http.StatusConflict || status == http.StatusTooManyRequests
//	})
//
// A handler decides for its own response with [Claim.Keep], which
// overrides this rule. Middleware. Default: every 5xx, 408 and 429,
// answers that say "try again" and must not be replayed for a day.
func WithRetryableStatus(retryable func(status int) bool) Option {
	return option("WithRetryableStatus", forMiddleware, func(s *settings) error {
		s.retryable = retryable
		return notNil("retryable function", retryable == nil)
	})
}

func defaultRetryable(status int) bool {
	return status >= 500 || status == http.StatusRequestTimeout || status == http.StatusTooManyRequests
}

// WithFailOpen runs the handler unprotected when the store fails, instead
// of answering 503. Each such request is reported as [OutcomeFailOpen] and
// logged as a warning. Middleware. Default: fail closed.
func WithFailOpen() Option {
	return option("WithFailOpen", forMiddleware, func(s *settings) error {
		s.failOpen = true
		return nil
	})
}

// WithErrorHandler replaces the function that answers rejected requests.
// It receives one of the package's errors, possibly wrapped; it runs
// concurrently for concurrent requests. Middleware. Default: [WriteError],
// which writes application/problem+json.
func WithErrorHandler(h func(w http.ResponseWriter, r *http.Request, err error)) Option {
	return option("WithErrorHandler", forMiddleware, func(s *settings) error {
		s.errorHandler = h
		return notNil("error handler", h == nil)
	})
}

// WithStoredHeaders decides which of the response headers the handler set
// are stored and replayed; keep gets the canonical header name. Headers
// set before the middleware ran (by outer middleware, for that request)
// are never stored, and hop-by-hop headers and trailers never are either.
// Middleware. Default: every header the handler set except Set-Cookie,
// which would hand one client's session to another.
func WithStoredHeaders(keep func(name string) bool) Option {
	return option("WithStoredHeaders", forMiddleware, func(s *settings) error {
		s.storeHeader = keep
		return notNil("header filter", keep == nil)
	})
}

func defaultStoredHeader(name string) bool { return name != "Set-Cookie" }

// WithCancelOnDisconnect cancels the handler's context when the client
// disconnects, as net/http does without this middleware. A handler that
// then returns without writing a response is taken as cut short: nothing
// is stored and the key is freed, so the retry runs it again; one that
// wrote a response has it stored as usual. Middleware. Default: a client
// disconnect does not reach the handler's context, so finished work is
// stored and the client's retry gets the replay.
func WithCancelOnDisconnect() Option {
	return option("WithCancelOnDisconnect", forMiddleware, func(s *settings) error {
		s.cancelOnDisconnect = true
		return nil
	})
}

// WithStreaming passes each response through to the client as the handler
// writes it, instead of holding it until its outcome is stored: for routes
// whose responses stream (large exports, progress reports), which then
// reach the client sooner and cost no copy beyond [WithMaxStoredBytes].
// The promise is weaker: when storing the outcome fails, or the lease was
// lost, after the client received a success, nothing is stored, and the
// client's retry runs the handler again and may answer differently.
// Flush writes through. Give it to a Middleware that wraps only such
// routes; a handler that commits its writes with the stored response
// ([Claim.HoldResponse], pgstore's Tx) is held all the same. Middleware.
// Default: off, responses are held until stored.
func WithStreaming() Option {
	return option("WithStreaming", forMiddleware, func(s *settings) error {
		s.streaming = true
		return nil
	})
}
