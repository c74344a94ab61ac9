// Package idempotency makes HTTP APIs and Stripe webhook handlers safe to
// retry.
//
// The middleware built by [New] gives every POST and PATCH route that it
// wraps the behaviour of Stripe's API and of the IETF Idempotency-Key draft:
// the first request with a given Idempotency-Key runs the handler and its
// response is stored; a retry with the same key and the same request gets
// the stored response again, marked with X-Idempotent-Replayed: true; a
// retry while the first is still running gets 409; the same key with a
// different request gets 422. Failed attempts (5xx, panics, requests
// cancelled before an answer) free the key so the client can retry.
//
//	store := idempotency.NewMemoryStore() // or idempotency.NewRedisStore(rdb)
//	mw, err := idempotency.New(store,
//		idempotency.WithScope(func(r *http.Request) string { return r.Header.Get("X-Tenant-ID") }),
//	)
//	if err != nil {
//		return err
//	}
//	mux.Handle("POST /venues", mw.Handler(createVenue))
//
// Records live in a [Store]: [MemoryStore] for one process, [RedisStore]
// for several. The webhook helper ([WebhookHandler]) uses the same stores to
// process each Stripe event exactly once, and [StripeKey] derives
// idempotency keys for outgoing Stripe calls from the request being served.
package idempotency

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Errors reported by this package. The middleware hands them, possibly
// wrapped, to its error handler; test for them with [errors.Is].
var (
	// ErrKeyMissing: the route requires an Idempotency-Key and the request
	// has none (400).
	ErrKeyMissing = errors.New("idempotency: key missing")

	// ErrKeyInvalid: the Idempotency-Key header is malformed (400).
	ErrKeyInvalid = errors.New("idempotency: invalid key")

	// ErrBodyTooLarge: the request body exceeds the configured limit (413).
	ErrBodyTooLarge = errors.New("idempotency: request body too large")

	// ErrBodyUnreadable: reading the request body failed (400).
	ErrBodyUnreadable = errors.New("idempotency: request body unreadable")

	// ErrInvalidJSON: canonical JSON fingerprinting was asked for and the
	// body is not valid JSON (400).
	ErrInvalidJSON = errors.New("idempotency: invalid JSON body")

	// ErrFingerprintMismatch: the key was used before for a different
	// request (422).
	ErrFingerprintMismatch = errors.New("idempotency: key reused with a different request")

	// ErrKeyInUse: a request with the same key is still being processed
	// (409).
	ErrKeyInUse = errors.New("idempotency: key in use")

	// ErrStoreUnavailable: the store failed or did not answer in time, so
	// the request could not be protected (503).
	ErrStoreUnavailable = errors.New("idempotency: store unavailable")

	// ErrLeaseLost: the caller's token no longer owns the key, because its
	// lease lapsed and the key was freed or claimed by someone else. Stores
	// return it from Extend, Complete and Release.
	ErrLeaseLost = errors.New("idempotency: lease lost")
)

// Default settings; each has an option that documents it.
const (
	DefaultKeyHeader      = "Idempotency-Key"
	DefaultReplayHeader   = "X-Idempotent-Replayed"
	DefaultMaxBodyBytes   = 1 << 20
	DefaultMaxStoredBytes = 1 << 20
	DefaultLease          = 30 * time.Second
	DefaultTTL            = 24 * time.Hour
	DefaultStoreTimeout   = 3 * time.Second
)

// MaxKeyLength is the longest Idempotency-Key accepted, Stripe's limit.
const MaxKeyLength = 255

const (
	// Retry-After seconds: a running request usually ends within a second;
	// a store outage is retried as soon, since the 503 costs little.
	retryAfterInUse       = "1"
	retryAfterUnavailable = "1"

	problemTypeBase        = "https://pkg.go.dev/github.com/seed70ea8305/idempotency#"
	problemContentType     = "application/problem+json"
	httpRecordKind         = "http"
	minLease               = time.Millisecond
	leaseRenewalsPerPeriod = 3
)

// Option configures a [Middleware]. An invalid option makes [New] fail.
type Option func(*config) error

type config struct {
	methods        map[string]bool
	keyHeader      string
	keyOptional    bool
	replayHeader   string
	maxBodyBytes   int64
	maxStoredBytes int
	lease          time.Duration
	ttl            time.Duration
	storeTimeout   time.Duration
	scope          func(*http.Request) string
	fingerprint    FingerprintFunc
	retryable      func(status int) bool
	failOpen       bool
	errorHandler   func(http.ResponseWriter, *http.Request, error)
	observer       Observer
	logger         *slog.Logger
}

// WithMethods sets the request methods the middleware protects; other
// methods pass through untouched. Default: POST and PATCH, the methods
// that are not idempotent by definition.
func WithMethods(methods ...string) Option {
	return func(c *config) error {
		if len(methods) == 0 {
			return errors.New("idempotency: WithMethods needs at least one method")
		}
		c.methods = make(map[string]bool, len(methods))
		for _, m := range methods {
			if m == "" || strings.ToUpper(m) != m {
				return fmt.Errorf("idempotency: method %q must be upper case", m)
			}
			c.methods[m] = true
		}
		return nil
	}
}

// WithKeyHeader sets the request header that carries the key.
// Default: [DefaultKeyHeader], "Idempotency-Key".
func WithKeyHeader(name string) Option {
	return func(c *config) error {
		if strings.TrimSpace(name) == "" {
			return errors.New("idempotency: key header name is empty")
		}
		c.keyHeader = name
		return nil
	}
}

// WithKeyOptional lets requests without a key through, unprotected, instead
// of rejecting them with 400. Default: the key is required.
func WithKeyOptional() Option {
	return func(c *config) error {
		c.keyOptional = true
		return nil
	}
}

// WithReplayHeader sets the response header, with value "true", that marks
// a replayed response. Default: [DefaultReplayHeader],
// "X-Idempotent-Replayed" (Stripe sends "Idempotent-Replayed").
func WithReplayHeader(name string) Option {
	return func(c *config) error {
		if strings.TrimSpace(name) == "" {
			return errors.New("idempotency: replay header name is empty")
		}
		c.replayHeader = name
		return nil
	}
}

// WithMaxBodyBytes caps the request body the middleware reads to
// fingerprint it; a larger body gets 413 and stores nothing.
// Default: [DefaultMaxBodyBytes], 1 MiB.
func WithMaxBodyBytes(n int64) Option {
	return func(c *config) error {
		if n <= 0 {
			return fmt.Errorf("idempotency: max body bytes %d is not positive", n)
		}
		c.maxBodyBytes = n
		return nil
	}
}

// WithMaxStoredBytes caps the response body kept for replay. A larger
// response still reaches the first client whole, and its key is still
// completed, so a retry never runs the handler again; the retry gets the
// original status and headers with an empty body (see
// [Response.BodyOmitted]). Default: [DefaultMaxStoredBytes], 1 MiB.
func WithMaxStoredBytes(n int) Option {
	return func(c *config) error {
		if n < 0 {
			return fmt.Errorf("idempotency: max stored bytes %d is negative", n)
		}
		c.maxStoredBytes = n
		return nil
	}
}

// WithLease sets how long a claim on a key lasts without renewal. While the
// handler runs, the middleware renews it every lease/3; if the process dies,
// the key frees itself after at most one lease. Keep it short: it is how
// long a crash blocks retries. Default: [DefaultLease], 30 s.
func WithLease(d time.Duration) Option {
	return func(c *config) error {
		if d < minLease {
			return fmt.Errorf("idempotency: lease %v is shorter than %v", d, minLease)
		}
		c.lease = d
		return nil
	}
}

// WithTTL sets how long a completed response is kept for replay.
// Default: [DefaultTTL], 24 h, as Stripe does.
func WithTTL(d time.Duration) Option {
	return func(c *config) error {
		if d < time.Second {
			return fmt.Errorf("idempotency: record TTL %v is shorter than a second", d)
		}
		c.ttl = d
		return nil
	}
}

// WithStoreTimeout bounds each store call. Calls made after the handler
// (storing or releasing) run detached from the request's cancellation, so a
// client that hangs up does not lose the record; this timeout is then their
// only bound. Default: [DefaultStoreTimeout], 3 s.
func WithStoreTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("idempotency: store timeout %v is not positive", d)
		}
		c.storeTimeout = d
		return nil
	}
}

// WithScope derives the scope of a request, typically the tenant or the
// authenticated principal. Records are kept per scope and key: a key sent
// in one scope never replays a response from another.
//
// Default: one scope for every request. Keys are then shared by all
// clients, and a client that learns another's key could read that client's
// response, so set a scope on any API with more than one client.
func WithScope(scope func(r *http.Request) string) Option {
	return func(c *config) error {
		if scope == nil {
			return errors.New("idempotency: scope function is nil")
		}
		c.scope = scope
		return nil
	}
}

// WithFingerprint sets how requests are fingerprinted. Default: the zero
// [Fingerprinter] (method, path, query and body).
func WithFingerprint(fn FingerprintFunc) Option {
	return func(c *config) error {
		if fn == nil {
			return errors.New("idempotency: fingerprint function is nil")
		}
		c.fingerprint = fn
		return nil
	}
}

// WithRetryableStatus decides which response statuses free the key instead
// of being stored, so that a retry runs the handler again. Default:
// [DefaultRetryable], every 5xx plus 408 and 429. To store server errors
// too, as Stripe does, pass a function that returns false for them.
func WithRetryableStatus(retryable func(status int) bool) Option {
	return func(c *config) error {
		if retryable == nil {
			return errors.New("idempotency: retryable function is nil")
		}
		c.retryable = retryable
		return nil
	}
}

// DefaultRetryable reports whether status is 408, 429 or a 5xx: answers
// that say "try again" and must not be replayed for a day.
func DefaultRetryable(status int) bool {
	return status >= 500 || status == http.StatusRequestTimeout || status == http.StatusTooManyRequests
}

// WithFailOpen runs the handler unprotected when the store fails, instead
// of answering 503. Each such request is reported to the observer as
// [OutcomeFailOpen] and logged as a warning. Default: fail closed.
func WithFailOpen() Option {
	return func(c *config) error {
		c.failOpen = true
		return nil
	}
}

// WithErrorHandler replaces the function that answers rejected requests.
// It receives one of the package's errors, possibly wrapped. Default:
// [WriteError], which writes application/problem+json.
func WithErrorHandler(h func(w http.ResponseWriter, r *http.Request, err error)) Option {
	return func(c *config) error {
		if h == nil {
			return errors.New("idempotency: error handler is nil")
		}
		c.errorHandler = h
		return nil
	}
}

// WithObserver calls observe once for every request the middleware
// handles, after the outcome is known: the hook for metrics and for an
// audit log of replays. It runs on the request's goroutine and should be
// quick. Default: none.
func WithObserver(observe Observer) Option {
	return func(c *config) error {
		c.observer = observe
		return nil
	}
}

// WithLogger logs what an operator must know about: store failures, lost
// leases and requests served unprotected. Default: nil, silent.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) error {
		c.logger = l
		return nil
	}
}

// Outcome names what happened to one request or webhook delivery. Its
// values are stable and short, fit for metric labels.
type Outcome string

// Outcomes reported to an [Observer].
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
	// OutcomeReleased: the handler failed (retryable status, panic, request
	// cancelled); the key was freed for a retry. For webhooks: processing
	// failed.
	OutcomeReleased Outcome = "released"
	// OutcomeStoreError: the store failed; the request was refused (503),
	// or the outcome could not be recorded.
	OutcomeStoreError Outcome = "store_error"
	// OutcomeFailOpen: the store failed and the handler ran unprotected.
	OutcomeFailOpen Outcome = "fail_open"
	// OutcomeLeaseLost: the handler ran but its claim lapsed before the
	// response could be stored; nothing was stored.
	OutcomeLeaseLost Outcome = "lease_lost"
	// OutcomeUnprotected: the request carried no key and the route allows
	// that; the handler ran without protection.
	OutcomeUnprotected Outcome = "unprotected"
)

// Event describes the outcome of one request or webhook delivery.
type Event struct {
	Outcome Outcome
	// Scope and Key identify the record; for webhooks Key is the event ID.
	Scope string
	Key   string
	// Method and Path of the HTTP request, when there is one.
	Method string
	Path   string
	// Status is the HTTP status sent, 0 if none was.
	Status int
	// Duration is how long the handler ran, 0 if it did not.
	Duration time.Duration
	// Err is the error behind a rejection or a store failure.
	Err error
	// Attempts, for a webhook delivery whose function failed, counts the
	// failed attempts the store has recorded for the event, this one
	// included; 0 when the store keeps no history ([FailureRecorder]).
	Attempts int
}

// Observer receives one [Event] per request or delivery. ctx is the
// request's context.
type Observer func(ctx context.Context, e Event)

// Claim identifies the idempotent work being served. Handlers wrapped by the
// middleware, and webhook functions, find it in their context with
// [ClaimFromContext].
type Claim struct {
	// Kind tells what is being served: "http" for the middleware,
	// "stripe-webhook" for the webhook helper.
	Kind        string
	Scope       string
	Key         string
	Fingerprint string
}

type claimContextKey struct{}

// ClaimFromContext returns the claim of the idempotent request or webhook
// event that ctx belongs to.
func ClaimFromContext(ctx context.Context) (Claim, bool) {
	c, ok := ctx.Value(claimContextKey{}).(Claim)
	return c, ok
}

// Middleware makes handlers idempotent. It is safe for concurrent use;
// create it with [New].
type Middleware struct {
	claims claims
	cfg    config
}

// New returns a Middleware that keeps its records in store.
func New(store Store, opts ...Option) (*Middleware, error) {
	if store == nil {
		return nil, errors.New("idempotency: store is nil")
	}
	cfg := config{
		methods:        map[string]bool{http.MethodPost: true, http.MethodPatch: true},
		keyHeader:      DefaultKeyHeader,
		replayHeader:   DefaultReplayHeader,
		maxBodyBytes:   DefaultMaxBodyBytes,
		maxStoredBytes: DefaultMaxStoredBytes,
		lease:          DefaultLease,
		ttl:            DefaultTTL,
		storeTimeout:   DefaultStoreTimeout,
		scope:          func(*http.Request) string { return "" },
		fingerprint:    Fingerprinter{}.Fingerprint,
		retryable:      DefaultRetryable,
		errorHandler:   WriteError,
	}
	for _, opt := range opts {
		if err := opt(&cfg); err != nil {
			return nil, err
		}
	}
	if cfg.lease >= cfg.ttl {
		return nil, fmt.Errorf("idempotency: lease %v must be shorter than the record TTL %v", cfg.lease, cfg.ttl)
	}
	return &Middleware{claims: claims{store: store, lease: cfg.lease, ttl: cfg.ttl, timeout: cfg.storeTimeout}, cfg: cfg}, nil
}

// Handler wraps next. Its signature fits routers that take
// func(http.Handler) http.Handler middleware.
func (m *Middleware) Handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !m.cfg.methods[r.Method] {
			next.ServeHTTP(w, r)
			return
		}
		m.serve(w, r, next)
	})
}

func (m *Middleware) serve(w http.ResponseWriter, r *http.Request, next http.Handler) {
	ev := Event{Method: r.Method, Path: r.URL.Path}
	key, err := requestKey(r.Header, m.cfg.keyHeader)
	if errors.Is(err, ErrKeyMissing) && m.cfg.keyOptional {
		ev.Outcome = OutcomeUnprotected
		m.observe(r.Context(), ev)
		next.ServeHTTP(w, r)
		return
	}
	if err != nil {
		m.reject(w, r, ev, OutcomeRejected, err)
		return
	}
	ev.Key = key

	body, err := readBody(w, r, m.cfg.maxBodyBytes)
	if err != nil {
		m.reject(w, r, ev, OutcomeRejected, err)
		return
	}
	fingerprint, err := m.cfg.fingerprint(r, body)
	if err != nil {
		if !errors.Is(err, ErrInvalidJSON) {
			err = fmt.Errorf("%w: %w", ErrInvalidJSON, err)
		}
		m.reject(w, r, ev, OutcomeRejected, err)
		return
	}
	claim := Claim{Kind: httpRecordKind, Scope: m.cfg.scope(r), Key: key, Fingerprint: fingerprint}
	ev.Scope = claim.Scope
	storeKey := claim.recordKey()
	token := rand.Text()

	existing, err := m.claims.acquire(r.Context(), storeKey, Record{Token: token, Fingerprint: fingerprint, CreatedAt: time.Now()})
	if err != nil {
		err = fmt.Errorf("%w: %w", ErrStoreUnavailable, err)
	}
	switch {
	case err != nil && m.cfg.failOpen:
		ev.Err = err
		m.log(r.Context(), "idempotency: store failed, serving unprotected", ev)
		r.Body = io.NopCloser(bytes.NewReader(body))
		start := time.Now()
		rec := &recorder{w: w}
		next.ServeHTTP(rec, r)
		ev.Outcome, ev.Status, ev.Duration = OutcomeFailOpen, rec.statusOr200(), time.Since(start)
		m.observe(r.Context(), ev)
	case err != nil:
		ev.Err = err
		m.log(r.Context(), "idempotency: store failed, request refused", ev)
		m.reject(w, r, ev, OutcomeStoreError, err)
	// The fingerprint is compared before the in-flight state, so a
	// different request under a running key learns of its mistake (422)
	// instead of being told to retry (409).
	case existing != nil && existing.Fingerprint != fingerprint:
		m.reject(w, r, ev, OutcomeMismatch, ErrFingerprintMismatch)
	case existing != nil && existing.InFlight():
		m.reject(w, r, ev, OutcomeInFlight, ErrKeyInUse)
	case existing != nil:
		m.replay(w, existing.Response)
		ev.Outcome, ev.Status = OutcomeReplayed, existing.Response.StatusCode
		m.observe(r.Context(), ev)
	default:
		r.Body = io.NopCloser(bytes.NewReader(body))
		m.execute(w, r, next, claim, storeKey, token, ev)
	}
}

// execute runs next as the owner of storeKey and then stores or releases
// the key. It releases on the way out of a panic too, without recovering,
// so the panic continues with its original stack.
func (m *Middleware) execute(w http.ResponseWriter, r *http.Request, next http.Handler, claim Claim, storeKey, token string, ev Event) {
	ctx, cancel := context.WithCancelCause(context.WithValue(r.Context(), claimContextKey{}, claim))
	defer cancel(nil)
	stopRenewing := m.claims.keepLease(ctx, cancel, storeKey, token)

	rec := &recorder{w: w, capture: true, maxBody: m.cfg.maxStoredBytes}
	start := time.Now()
	returned := false
	defer func() {
		if returned {
			return
		}
		stopRenewing()
		ev.Duration = time.Since(start)
		ev.Status = rec.status
		m.release(r.Context(), storeKey, token, ev, errors.New("idempotency: handler panicked"))
	}()
	next.ServeHTTP(rec, r.WithContext(ctx))
	returned = true
	stopRenewing()
	ev.Duration = time.Since(start)

	// A handler that returns without writing answers 200 (net/http does
	// so after we return), unless its context was cancelled: then it was
	// cut short, and a retry must run it again. If the client is still
	// there, the cancellation was ours (lease lost) and it gets a 503.
	if !rec.wroteHeader && ctx.Err() != nil {
		cause := context.Cause(ctx)
		if r.Context().Err() == nil {
			cause = fmt.Errorf("%w: %w", ErrStoreUnavailable, cause)
			m.cfg.errorHandler(rec, r, cause)
		}
		ev.Status = rec.status
		m.release(r.Context(), storeKey, token, ev, fmt.Errorf("idempotency: handler cancelled before a response: %w", cause))
		return
	}
	rec.commit()
	ev.Status = rec.status
	if m.cfg.retryable(rec.status) {
		m.release(r.Context(), storeKey, token, ev, fmt.Errorf("idempotency: handler answered %d", rec.status))
		return
	}

	err := m.claims.complete(r.Context(), storeKey, token, Record{Fingerprint: claim.Fingerprint, CreatedAt: start, Response: rec.response()})
	switch {
	case errors.Is(err, ErrLeaseLost):
		ev.Outcome, ev.Err = OutcomeLeaseLost, err
		m.log(r.Context(), "idempotency: lease lost before the response was stored", ev)
	case err != nil:
		// The lease will lapse on its own; a retry then runs the handler again.
		ev.Outcome, ev.Err = OutcomeStoreError, err
		m.log(r.Context(), "idempotency: storing the response failed", ev)
	default:
		ev.Outcome = OutcomeExecuted
	}
	m.observe(r.Context(), ev)
}

// release frees storeKey after a failed attempt. It runs detached from the
// request's cancellation: a client that hung up must not leave the key
// claimed until the lease lapses.
func (m *Middleware) release(ctx context.Context, storeKey, token string, ev Event, cause error) {
	ev.Outcome, ev.Err = OutcomeReleased, cause
	if err := m.claims.release(ctx, storeKey, token); err != nil {
		ev.Outcome, ev.Err = OutcomeStoreError, errors.Join(cause, err)
		m.log(ctx, "idempotency: releasing the key failed; it frees itself when the lease lapses", ev)
	}
	m.observe(ctx, ev)
}

func (m *Middleware) replay(w http.ResponseWriter, resp *Response) {
	h := w.Header()
	for name, values := range resp.Header {
		h[name] = append([]string(nil), values...)
	}
	if resp.BodyOmitted {
		h.Set("Content-Length", "0")
	}
	h.Set(m.cfg.replayHeader, "true")
	w.WriteHeader(resp.StatusCode)
	w.Write(resp.Body)
}

func (m *Middleware) reject(w http.ResponseWriter, r *http.Request, ev Event, outcome Outcome, err error) {
	m.cfg.errorHandler(w, r, err)
	ev.Outcome, ev.Status = outcome, StatusCode(err)
	if ev.Err == nil {
		ev.Err = err
	}
	m.observe(r.Context(), ev)
}

func (m *Middleware) observe(ctx context.Context, ev Event) {
	if m.cfg.observer != nil {
		m.cfg.observer(ctx, ev)
	}
}

func (m *Middleware) log(ctx context.Context, msg string, ev Event) {
	if m.cfg.logger == nil {
		return
	}
	m.cfg.logger.LogAttrs(ctx, slog.LevelWarn, msg,
		slog.String("scope", ev.Scope),
		slog.String("key", ev.Key),
		slog.String("method", ev.Method),
		slog.String("path", ev.Path),
		slog.Any("error", ev.Err),
	)
}

// recordKey names the claim's record in a [Store]. The kind keeps HTTP keys
// and webhook event IDs apart; the scope is quoted, which keeps the name
// unambiguous whatever either part holds.
func (c Claim) recordKey() string {
	return c.Kind + ":" + strconv.Quote(c.Scope) + ":" + c.Key
}

// requestKey extracts the key from the request headers.
func requestKey(h http.Header, name string) (string, error) {
	values := h.Values(name)
	switch len(values) {
	case 0:
		return "", ErrKeyMissing
	case 1:
		return ParseKey(values[0])
	default:
		return "", fmt.Errorf("%w: several %s headers", ErrKeyInvalid, name)
	}
}

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
				return "", fmt.Errorf("%w: several keys in one header", ErrKeyInvalid)
			case c == '"' || c == ' ' || c == '\t':
				return "", fmt.Errorf("%w: unquoted key contains %q", ErrKeyInvalid, c)
			case c < 0x21 || c > 0x7e:
				return "", fmt.Errorf("%w: not printable ASCII", ErrKeyInvalid)
			}
		}
		key = value
	}
	switch {
	case key == "":
		return "", fmt.Errorf("%w: empty", ErrKeyInvalid)
	case len(key) > MaxKeyLength:
		return "", fmt.Errorf("%w: longer than %d characters", ErrKeyInvalid, MaxKeyLength)
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
				return "", fmt.Errorf("%w: bad escape in quoted key", ErrKeyInvalid)
			}
			b.WriteByte(value[i])
		case c == '"':
			if i != len(value)-1 {
				return "", fmt.Errorf("%w: characters after the quoted key", ErrKeyInvalid)
			}
			return b.String(), nil
		case c < 0x20 || c > 0x7e:
			return "", fmt.Errorf("%w: not printable ASCII", ErrKeyInvalid)
		default:
			b.WriteByte(c)
		}
	}
	return "", fmt.Errorf("%w: unterminated quoted key", ErrKeyInvalid)
}

// readBody reads the whole request body, up to limit bytes.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	if r.Body == nil || r.Body == http.NoBody {
		return nil, nil
	}
	if r.ContentLength > limit {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrBodyTooLarge, r.ContentLength, limit)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		return nil, fmt.Errorf("%w: limit %d bytes", ErrBodyTooLarge, limit)
	case err != nil:
		return nil, fmt.Errorf("%w: %w", ErrBodyUnreadable, err)
	}
	return body, nil
}

// recorder passes a response through to the client and, when capture is
// set, records it for replay: the status and a snapshot of the headers at
// the first WriteHeader, and the body written through Write, up to maxBody.
// It deliberately has no ReadFrom, so io.Copy cannot bypass the capture.
type recorder struct {
	w           http.ResponseWriter
	capture     bool
	maxBody     int
	wroteHeader bool
	status      int
	header      http.Header
	body        bytes.Buffer
	omitted     bool
}

func (rec *recorder) Header() http.Header { return rec.w.Header() }

func (rec *recorder) WriteHeader(code int) {
	// 1xx answers other than 101 are informational; the final status
	// follows. Later calls are superfluous: net/http ignores them too.
	if rec.wroteHeader || (code >= 100 && code < 200 && code != http.StatusSwitchingProtocols) {
		rec.w.WriteHeader(code)
		return
	}
	rec.w.WriteHeader(code)
	rec.wroteHeader, rec.status = true, code
	if rec.capture {
		rec.header = rec.w.Header().Clone()
	}
}

func (rec *recorder) Write(p []byte) (int, error) {
	if !rec.wroteHeader {
		rec.WriteHeader(http.StatusOK)
	}
	// Record what the handler wrote even if the client is gone: the retry
	// deserves the whole response.
	if rec.capture && !rec.omitted {
		if rec.body.Len()+len(p) > rec.maxBody {
			rec.omitted = true
			rec.body = bytes.Buffer{}
		} else {
			rec.body.Write(p)
		}
	}
	return rec.w.Write(p)
}

// FlushError sends buffered data to the client; [http.ResponseController]
// calls it. Flushing before WriteHeader commits the implicit 200.
func (rec *recorder) FlushError() error {
	if !rec.wroteHeader {
		rec.WriteHeader(http.StatusOK)
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

func (rec *recorder) response() *Response {
	header := rec.header
	for _, name := range hopByHopHeaders {
		header.Del(name)
	}
	resp := &Response{StatusCode: rec.status, Header: header, BodyOmitted: rec.omitted}
	if !rec.omitted {
		resp.Body = rec.body.Bytes()
	}
	return resp
}

// hopByHopHeaders describe one connection, not the response, so they are
// not replayed.
var hopByHopHeaders = [...]string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade", "Trailer"}

// WriteError is the default error handler: it answers err as an RFC 9457
// application/problem+json document. The status comes from [StatusCode];
// 409 and 503 carry Retry-After. Errors from this package's checks of the
// request (key, body, JSON) show their message as the detail; any other
// error gets fixed text, so internal details never reach the client.
func WriteError(w http.ResponseWriter, r *http.Request, err error) {
	kind := problemKindOf(err)
	p := problem{Type: problemTypeBase + kind.anchor, Title: kind.title, Status: kind.status}
	if kind.showDetail {
		p.Detail = strings.TrimPrefix(err.Error(), "idempotency: ")
	}
	switch kind.status {
	case http.StatusConflict:
		w.Header().Set("Retry-After", retryAfterInUse)
	case http.StatusServiceUnavailable:
		w.Header().Set("Retry-After", retryAfterUnavailable)
	}
	writeProblem(w, p)
}

// StatusCode returns the HTTP status the package answers err with: 400,
// 413, 422, 409 or 503 for its own errors, 500 for a failed webhook
// function and for anything else.
func StatusCode(err error) int { return problemKindOf(err).status }

type problem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail,omitempty"`
}

func writeProblem(w http.ResponseWriter, p problem) {
	body, _ := json.Marshal(p) // plain strings and ints always encode
	h := w.Header()
	h.Set("Content-Type", problemContentType)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(p.Status)
	w.Write(body)
}

type problemKind struct {
	err        error
	status     int
	anchor     string
	title      string
	showDetail bool // the error's text describes the client's request, nothing internal
}

var problemKinds = [...]problemKind{
	{ErrKeyMissing, http.StatusBadRequest, "ErrKeyMissing", "Idempotency-Key header missing", true},
	{ErrKeyInvalid, http.StatusBadRequest, "ErrKeyInvalid", "Idempotency-Key header invalid", true},
	{ErrBodyTooLarge, http.StatusRequestEntityTooLarge, "ErrBodyTooLarge", "Request body too large", true},
	{ErrBodyUnreadable, http.StatusBadRequest, "ErrBodyUnreadable", "Request body unreadable", false},
	{ErrInvalidJSON, http.StatusBadRequest, "ErrInvalidJSON", "Request body is not valid JSON", true},
	{ErrFingerprintMismatch, http.StatusUnprocessableEntity, "ErrFingerprintMismatch", "Idempotency-Key reused with a different request", false},
	{ErrKeyInUse, http.StatusConflict, "ErrKeyInUse", "A request with this Idempotency-Key is still being processed", false},
	{ErrWebhookSignature, http.StatusBadRequest, "ErrWebhookSignature", "Invalid Stripe-Signature", true},
	{ErrWebhookAPIVersion, http.StatusBadRequest, "ErrWebhookAPIVersion", "Webhook API version mismatch", true},
	{ErrWebhookPayload, http.StatusBadRequest, "ErrWebhookPayload", "Invalid webhook payload", false},
	// Before ErrStoreUnavailable: a failed function whose release failed
	// too is still a 500.
	{ErrWebhookFailed, http.StatusInternalServerError, "ErrWebhookFailed", "Webhook processing failed", false},
	{ErrStoreUnavailable, http.StatusServiceUnavailable, "ErrStoreUnavailable", "Idempotency store unavailable", false},
}

var internalErrorKind = problemKind{status: http.StatusInternalServerError, anchor: "WriteError", title: "Internal server error"}

func problemKindOf(err error) problemKind {
	for _, k := range problemKinds {
		if errors.Is(err, k.err) {
			return k
		}
	}
	return internalErrorKind
}
