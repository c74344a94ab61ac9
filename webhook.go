package idempotency

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"
)

// Errors reported by [WebhookHandler]. Besides these, a delivery can fail
// with [ErrBodyTooLarge] (413), [ErrBodyUnreadable] (400), [ErrKeyInUse]
// (409: the event is being processed by another delivery) and
// [ErrStoreUnavailable] (503). Test for them with [errors.Is].
var (
	// ErrWebhookSignature: the Stripe-Signature header is missing or
	// malformed, no signature matches any of the secrets, or its timestamp
	// is older than the tolerance (400). It wraps the error from stripe-go's
	// webhook package ([webhook.ErrNotSigned], [webhook.ErrInvalidHeader],
	// [webhook.ErrNoValidSignature] or [webhook.ErrTooOld]), so both can be
	// tested with [errors.Is].
	ErrWebhookSignature = errors.New("idempotency: invalid webhook signature")

	// ErrWebhookPayload: the signed payload is not a Stripe event: malformed
	// JSON, or no event id (400).
	ErrWebhookPayload = errors.New("idempotency: invalid webhook payload")

	// ErrWebhookAPIVersion: the event was rendered with another Stripe API
	// version than the one stripe-go was built for, [stripe.APIVersion]
	// (400). See [WithWebhookIgnoreAPIVersion].
	ErrWebhookAPIVersion = errors.New("idempotency: webhook API version mismatch")

	// ErrWebhookFailed: the webhook function returned an error or panicked;
	// the event was released so that Stripe's next delivery processes it
	// again (500). It wraps the function's error.
	ErrWebhookFailed = errors.New("idempotency: webhook function failed")

	// ErrWebhookNotRecorded: the webhook function succeeded, but the event
	// could not be marked processed (the store failed, or the claim lapsed).
	// The event was processed, so [WebhookHandler.ServeHTTP] still answers
	// 200; a later delivery of it may run the function again.
	ErrWebhookNotRecorded = errors.New("idempotency: webhook processed but not recorded")
)

// Webhook defaults; each has an option that documents it.
const (
	// DefaultWebhookTolerance is how old a signature's timestamp may be,
	// the same as stripe-go's [webhook.DefaultTolerance].
	DefaultWebhookTolerance = 300 * time.Second
	// DefaultWebhookTTL is how long a processed event is remembered. Stripe
	// retries an undelivered event for up to 3 days.
	DefaultWebhookTTL = 7 * 24 * time.Hour
	// DefaultWebhookMaxBodyBytes caps the payload read; Stripe's events
	// are a few KiB.
	DefaultWebhookMaxBodyBytes = 64 << 10
)

// WebhookSignatureHeader is the request header that carries Stripe's
// signature of a delivery.
const WebhookSignatureHeader = "Stripe-Signature"

const (
	// maxFailureReason caps the error text kept with a failed attempt.
	maxFailureReason   = 1 << 10
	webhookRecordKind  = "stripe-webhook"
	webhookReceived    = `{"received":true}`
	webhookContentType = "application/json"
)

// WebhookFunc processes one Stripe event. It returns nil once the event is
// handled, including events it chooses to ignore; an error (or a panic)
// makes Stripe deliver the event again later.
//
// Its ctx is cancelled when the delivery's context is, and when the
// handler loses its claim on the event (see [WithWebhookLease]). It carries
// the event's [Claim] (Kind "stripe-webhook", Key the event id), so
// [StripeKey] derives idempotency keys for the Stripe calls it makes.
type WebhookFunc func(ctx context.Context, event stripe.Event) error

// WebhookOption configures a [WebhookHandler]. An invalid option makes
// [NewWebhookHandler] fail.
type WebhookOption func(*webhookConfig) error

type webhookConfig struct {
	tolerance        time.Duration
	scope            string
	ttl              time.Duration
	lease            time.Duration
	maxBodyBytes     int64
	ignoreAPIVersion bool
	keepPayload      bool
	observer         Observer
	logger           *slog.Logger
	storeTimeout     time.Duration
	now              func() time.Time
}

// WithWebhookTolerance sets how old the timestamp of a Stripe-Signature
// may be; older deliveries are rejected with [ErrWebhookSignature]
// wrapping [webhook.ErrTooOld], which stops replays of captured requests.
// Default: [DefaultWebhookTolerance], 300 s.
func WithWebhookTolerance(d time.Duration) WebhookOption {
	return func(c *webhookConfig) error {
		if d <= 0 {
			return fmt.Errorf("idempotency: webhook tolerance %v is not positive", d)
		}
		c.tolerance = d
		return nil
	}
}

// WithWebhookScope puts the handler's events in their own namespace, so one
// store can serve several endpoints or Stripe accounts: the same event id
// under two scopes is processed once in each. Use one scope per endpoint
// whose functions do different work. Default: "", one namespace.
func WithWebhookScope(scope string) WebhookOption {
	return func(c *webhookConfig) error {
		c.scope = scope
		return nil
	}
}

// WithWebhookTTL sets how long a processed event is remembered; a delivery
// of it within that time answers 200 without running the function. Keep it
// longer than Stripe's 3 days of retries. Default: [DefaultWebhookTTL],
// 7 days.
func WithWebhookTTL(d time.Duration) WebhookOption {
	return func(c *webhookConfig) error {
		if d <= 0 {
			return fmt.Errorf("idempotency: webhook TTL %v is not positive", d)
		}
		c.ttl = d
		return nil
	}
}

// WithWebhookLease sets how long a claim on an event lasts without renewal.
// While the function runs, the handler renews it every lease/3; when it
// cannot, it cancels the function's context with an error wrapping
// [ErrLeaseLost], because another delivery may then claim the event. If the
// process dies, the event is free again after at most one lease.
// Default: [DefaultLease], 30 s.
func WithWebhookLease(d time.Duration) WebhookOption {
	return func(c *webhookConfig) error {
		if d < minLease {
			return fmt.Errorf("idempotency: webhook lease %v is shorter than %v", d, minLease)
		}
		c.lease = d
		return nil
	}
}

// WithWebhookMaxBodyBytes caps the payload size; a larger one is rejected
// with [ErrBodyTooLarge] (413) before anything else is done.
// Default: [DefaultWebhookMaxBodyBytes], 64 KiB.
func WithWebhookMaxBodyBytes(n int64) WebhookOption {
	return func(c *webhookConfig) error {
		if n <= 0 {
			return fmt.Errorf("idempotency: webhook max body bytes %d is not positive", n)
		}
		c.maxBodyBytes = n
		return nil
	}
}

// WithWebhookIgnoreAPIVersion accepts events whose api_version differs from
// [stripe.APIVersion]. Their objects may then decode incompletely into
// stripe-go's types. Default: such events are rejected with
// [ErrWebhookAPIVersion], as stripe-go's webhook.ConstructEvent does.
func WithWebhookIgnoreAPIVersion() WebhookOption {
	return func(c *webhookConfig) error {
		c.ignoreAPIVersion = true
		return nil
	}
}

// WithWebhookPayload keeps each processed event's raw payload in its stored
// record, as the [Response.Body] of the record completed under the event's
// claim, for audits and reprocessing. Records then take the payload's size
// in the store. Default: the record keeps no payload (status 200, no body).
func WithWebhookPayload() WebhookOption {
	return func(c *webhookConfig) error {
		c.keepPayload = true
		return nil
	}
}

// WithWebhookObserver calls observe once per delivery, after its outcome is
// known: [OutcomeExecuted] (processed), [OutcomeReplayed] (duplicate),
// [OutcomeInFlight], [OutcomeRejected], [OutcomeReleased] (the function
// failed; Event.Err holds its error), [OutcomeStoreError] or
// [OutcomeLeaseLost]. Event.Key is the event id, once known. Every delivery
// is one call, so counting OutcomeReleased per Key counts failed attempts.
// It runs on the delivery's goroutine and should be quick. Default: none.
func WithWebhookObserver(observe Observer) WebhookOption {
	return func(c *webhookConfig) error {
		c.observer = observe
		return nil
	}
}

// WithWebhookLogger logs failed processing (with the event id, type and
// error), store failures and lost claims as warnings, and rejected
// deliveries at info level. Default: nil, silent.
func WithWebhookLogger(l *slog.Logger) WebhookOption {
	return func(c *webhookConfig) error {
		c.logger = l
		return nil
	}
}

// WithWebhookStoreTimeout bounds each store call. Calls made after the
// function ran are detached from the delivery's cancellation, so a Stripe
// timeout cannot leave the event claimed. Default: [DefaultStoreTimeout],
// 3 s.
func WithWebhookStoreTimeout(d time.Duration) WebhookOption {
	return func(c *webhookConfig) error {
		if d <= 0 {
			return fmt.Errorf("idempotency: webhook store timeout %v is not positive", d)
		}
		c.storeTimeout = d
		return nil
	}
}

// WithWebhookClock makes the handler read the time from now when it checks
// a signature's age and stamps a claim, so tests can sign payloads at fixed
// times. Default: [time.Now].
func WithWebhookClock(now func() time.Time) WebhookOption {
	return func(c *webhookConfig) error {
		if now == nil {
			return errors.New("idempotency: webhook clock is nil")
		}
		c.now = now
		return nil
	}
}

// WebhookHandler receives Stripe webhooks and runs a [WebhookFunc] once per
// event, however often Stripe delivers it:
//
//   - it reads the body (up to [WithWebhookMaxBodyBytes]) and verifies its
//     Stripe-Signature before parsing anything; a bad delivery gets 400 and
//     changes nothing;
//   - it claims the event id in the [Store]: the first delivery runs the
//     function; a delivery of an event already processed gets 200 without
//     running it; one arriving while another delivery still processes the
//     event gets 409, so Stripe retries it later;
//   - when the function succeeds, the event is marked processed for
//     [WithWebhookTTL] and Stripe gets 200 {"received":true}; when it fails
//     or panics, the claim is released and Stripe gets 500, so its next
//     delivery processes the event again.
//
// While a delivery's claim holds (see [WithWebhookLease]), no other
// delivery of the event runs the function; once it succeeded for an event,
// no later delivery runs it again, as long as the success was recorded. If the process dies, or loses its claim,
// between the function's return and that record, a later delivery runs the
// function again; keep its external effects idempotent too, for Stripe
// calls with [StripeKey].
//
// The store keeps a processing status per event (in flight while the
// function runs, then processed) and, when it implements
// [FailureRecorder] as [MemoryStore] and [RedisStore] do, how often the
// function failed for it and the last error ([WebhookHandler.Failures]).
// Every attempt, with its error and that count, also reaches the observer
// and the logger.
//
//	h, err := idempotency.NewWebhookHandler(store, []string{os.Getenv("STRIPE_WEBHOOK_SECRET")},
//		func(ctx context.Context, ev stripe.Event) error {
//			switch ev.Type {
//			case "account.updated":
//				return syncAccount(ctx, ev)
//			}
//			return nil
//		})
//	if err != nil {
//		return err
//	}
//	mux.Handle("POST /stripe/webhook", h)
//
// A WebhookHandler is safe for concurrent use; create it with
// [NewWebhookHandler].
type WebhookHandler struct {
	claims  claims
	secrets []string
	fn      WebhookFunc
	cfg     webhookConfig
}

var _ http.Handler = (*WebhookHandler)(nil)

// NewWebhookHandler returns a handler that verifies deliveries against
// secrets (the endpoint's signing secrets, "whsec_..."; list the old and
// the new one while rolling a secret) and runs fn once per event, keeping
// its records in store.
func NewWebhookHandler(store Store, secrets []string, fn WebhookFunc, opts ...WebhookOption) (*WebhookHandler, error) {
	switch {
	case store == nil:
		return nil, errors.New("idempotency: store is nil")
	case fn == nil:
		return nil, errors.New("idempotency: webhook function is nil")
	case len(secrets) == 0:
		return nil, errors.New("idempotency: no webhook signing secret")
	}
	for i, s := range secrets {
		if s == "" {
			return nil, fmt.Errorf("idempotency: webhook signing secret %d is empty", i)
		}
	}
	cfg := webhookConfig{
		tolerance:    DefaultWebhookTolerance,
		ttl:          DefaultWebhookTTL,
		lease:        DefaultLease,
		maxBodyBytes: DefaultWebhookMaxBodyBytes,
		storeTimeout: DefaultStoreTimeout,
		now:          time.Now,
	}
	for _, opt := range opts {
		if err := opt(&cfg); err != nil {
			return nil, err
		}
	}
	if cfg.lease >= cfg.ttl {
		return nil, fmt.Errorf("idempotency: webhook lease %v must be shorter than the TTL %v", cfg.lease, cfg.ttl)
	}
	return &WebhookHandler{
		claims:  claims{store: store, lease: cfg.lease, ttl: cfg.ttl, timeout: cfg.storeTimeout},
		secrets: append([]string(nil), secrets...),
		fn:      fn,
		cfg:     cfg,
	}, nil
}

// ServeHTTP handles one delivery from Stripe. It answers:
//
//   - 200 {"received":true} when the event was processed, also when the
//     outcome could not be recorded ([ErrWebhookNotRecorded]);
//   - 200 {"received":true} with X-Idempotent-Replayed: true for an event
//     already processed;
//   - 400 (bad signature, payload or API version) or 413 (body too large),
//     having done nothing;
//   - 409 with Retry-After while another delivery processes the event;
//   - 500 when the function failed or panicked (the panic continues after
//     the answer is written and the event released);
//   - 503 with Retry-After when the store failed.
//
// Error answers are application/problem+json with fixed text.
func (h *WebhookHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ev := Event{Method: r.Method, Path: r.URL.Path}
	payload, err := readBody(w, r, h.cfg.maxBodyBytes)
	if err != nil {
		h.finish(r.Context(), w, ev, OutcomeRejected, err)
		return
	}
	h.handle(r.Context(), w, ev, payload, r.Header.Get(WebhookSignatureHeader))
}

// Failures returns how often the function failed for the event eventID,
// counted while the history lasts ([WithWebhookTTL] after the last
// failure), and the last failure's error text (the function's error, or
// "panic"). The history outlives a later success. The error wraps
// [errors.ErrUnsupported] when the store keeps no history (see
// [FailureRecorder]; [MemoryStore] and [RedisStore] do).
func (h *WebhookHandler) Failures(ctx context.Context, eventID string) (attempts int, lastError string, err error) {
	recorder, ok := h.claims.store.(FailureRecorder)
	if !ok {
		return 0, "", fmt.Errorf("idempotency: %T keeps no failure history: %w", h.claims.store, errors.ErrUnsupported)
	}
	claim := Claim{Kind: webhookRecordKind, Scope: h.cfg.scope, Key: eventID}
	return recorder.Failures(ctx, claim.recordKey())
}

// Handle is the lower-level form of ServeHTTP, for deliveries that do not
// arrive as an [http.Request] (a queue, a serverless runtime): it verifies
// payload against signatureHeader, the value of the Stripe-Signature
// header, claims the event, runs the function and records the outcome.
//
// It returns [OutcomeExecuted] (processed) or [OutcomeReplayed] (a
// duplicate) with a nil error. Any other outcome comes with an error:
// [OutcomeRejected] with one wrapping [ErrWebhookSignature],
// [ErrWebhookPayload], [ErrWebhookAPIVersion] or [ErrBodyTooLarge];
// [OutcomeInFlight] with [ErrKeyInUse]; [OutcomeReleased] with one wrapping
// [ErrWebhookFailed] and the function's error; [OutcomeStoreError] with one
// wrapping [ErrStoreUnavailable] when nothing ran. When the function
// succeeded but its outcome was not recorded, it returns
// [OutcomeStoreError] or [OutcomeLeaseLost] with an error wrapping
// [ErrWebhookNotRecorded]: the event was processed, tell the sender so.
//
// If the function panics, Handle releases the event and lets the panic
// continue.
func (h *WebhookHandler) Handle(ctx context.Context, payload []byte, signatureHeader string) (Outcome, error) {
	if int64(len(payload)) > h.cfg.maxBodyBytes {
		return h.finish(ctx, nil, Event{}, OutcomeRejected,
			fmt.Errorf("%w: %d bytes, limit %d", ErrBodyTooLarge, len(payload), h.cfg.maxBodyBytes))
	}
	return h.handle(ctx, nil, Event{}, payload, signatureHeader)
}

// handle does the work of Handle and ServeHTTP; w is nil for Handle.
func (h *WebhookHandler) handle(ctx context.Context, w http.ResponseWriter, ev Event, payload []byte, signatureHeader string) (Outcome, error) {
	event, err := h.verify(payload, signatureHeader)
	if err != nil {
		return h.finish(ctx, w, ev, OutcomeRejected, err)
	}
	claim := Claim{Kind: webhookRecordKind, Scope: h.cfg.scope, Key: event.ID}
	ev.Scope, ev.Key = claim.Scope, claim.Key
	storeKey := claim.recordKey()
	token := rand.Text()
	created := h.cfg.now()

	existing, err := h.claims.acquire(ctx, storeKey, Record{Token: token, CreatedAt: created})
	switch {
	case err != nil:
		ev.Err = err
		h.log(ctx, slog.LevelWarn, "idempotency: webhook store failed, delivery refused", ev, event.Type)
		return h.finish(ctx, w, ev, OutcomeStoreError, fmt.Errorf("%w: %w", ErrStoreUnavailable, err))
	case existing != nil && existing.InFlight():
		return h.finish(ctx, w, ev, OutcomeInFlight, ErrKeyInUse)
	case existing != nil:
		return h.finish(ctx, w, ev, OutcomeReplayed, nil)
	}
	return h.run(ctx, w, ev, claim, storeKey, token, created, payload, event)
}

// run calls the function as the owner of storeKey, then marks the event
// processed or releases it. On a panic it releases the event in a deferred
// call, without recovering, so the panic continues with its own stack.
func (h *WebhookHandler) run(ctx context.Context, w http.ResponseWriter, ev Event, claim Claim, storeKey, token string, created time.Time, payload []byte, event stripe.Event) (Outcome, error) {
	fnCtx, cancel := context.WithCancelCause(context.WithValue(ctx, claimContextKey{}, claim))
	defer cancel(nil)
	stopRenewing := h.claims.keepLease(fnCtx, cancel, storeKey, token)

	start := time.Now()
	returned := false
	defer func() {
		if returned {
			return
		}
		stopRenewing()
		ev.Duration = time.Since(start)
		h.fail(ctx, w, ev, storeKey, token, event.Type, fmt.Errorf("%w: panic", ErrWebhookFailed), "panic")
	}()
	fnErr := h.fn(fnCtx, event)
	returned = true
	stopRenewing()
	ev.Duration = time.Since(start)

	if fnErr != nil {
		return h.fail(ctx, w, ev, storeKey, token, event.Type, fmt.Errorf("%w: %w", ErrWebhookFailed, fnErr), fnErr.Error())
	}

	resp := &Response{StatusCode: http.StatusOK}
	if h.cfg.keepPayload {
		resp.Header = http.Header{"Content-Type": {webhookContentType}}
		resp.Body = payload
	}
	err := h.claims.complete(ctx, storeKey, token, Record{CreatedAt: created, Response: resp})
	switch {
	case errors.Is(err, ErrLeaseLost):
		ev.Err = err
		h.log(ctx, slog.LevelWarn, "idempotency: webhook processed, but its claim lapsed before it was recorded", ev, event.Type)
		return h.finish(ctx, w, ev, OutcomeLeaseLost, fmt.Errorf("%w: %w", ErrWebhookNotRecorded, err))
	case err != nil:
		ev.Err = err
		h.log(ctx, slog.LevelWarn, "idempotency: webhook processed, but recording it failed", ev, event.Type)
		return h.finish(ctx, w, ev, OutcomeStoreError, fmt.Errorf("%w: %w: %w", ErrWebhookNotRecorded, ErrStoreUnavailable, err))
	}
	return h.finish(ctx, w, ev, OutcomeExecuted, nil)
}

// fail releases the event after the function failed, detached from the
// delivery's cancellation: a sender that hung up must not leave the event
// claimed until the lease lapses.
func (h *WebhookHandler) fail(ctx context.Context, w http.ResponseWriter, ev Event, storeKey, token string, eventType stripe.EventType, cause error, reason string) (Outcome, error) {
	if len(reason) > maxFailureReason {
		reason = reason[:maxFailureReason]
	}
	attempts, err := h.claims.fail(ctx, storeKey, token, reason)
	ev.Err, ev.Attempts = cause, attempts
	h.log(ctx, slog.LevelWarn, "idempotency: webhook processing failed; the event is released for Stripe's retry", ev, eventType)
	if err != nil {
		ev.Err = errors.Join(cause, fmt.Errorf("%w: %w", ErrStoreUnavailable, err))
		h.log(ctx, slog.LevelWarn, "idempotency: releasing the webhook event failed; it frees itself when the lease lapses", ev, eventType)
		return h.finish(ctx, w, ev, OutcomeStoreError, ev.Err)
	}
	return h.finish(ctx, w, ev, OutcomeReleased, cause)
}

// finish answers the delivery when there is a writer, tells the observer
// and returns the outcome.
func (h *WebhookHandler) finish(ctx context.Context, w http.ResponseWriter, ev Event, outcome Outcome, err error) (Outcome, error) {
	ev.Outcome, ev.Err = outcome, err
	if outcome == OutcomeRejected {
		h.log(ctx, slog.LevelInfo, "idempotency: webhook delivery rejected", ev, "")
	}
	if w != nil {
		ev.Status = writeWebhookAnswer(w, outcome, err)
	}
	if h.cfg.observer != nil {
		h.cfg.observer(ctx, ev)
	}
	return outcome, err
}

// verify checks the signature with stripe-go, trying each secret, then the
// timestamp's age, and only then parses the payload.
func (h *WebhookHandler) verify(payload []byte, header string) (stripe.Event, error) {
	var event stripe.Event
	var err error
	for _, secret := range h.secrets {
		// The age is checked below against the handler's clock; stripe-go
		// would read time.Now.
		err = webhook.ValidatePayloadIgnoringTolerance(payload, header, secret)
		if !errors.Is(err, webhook.ErrNoValidSignature) {
			break
		}
	}
	if err != nil {
		return event, fmt.Errorf("%w: %w", ErrWebhookSignature, err)
	}
	if h.cfg.now().Sub(signatureTime(header)) > h.cfg.tolerance {
		return event, fmt.Errorf("%w: %w", ErrWebhookSignature, webhook.ErrTooOld)
	}
	if err := json.Unmarshal(payload, &event); err != nil {
		return event, fmt.Errorf("%w: %s", ErrWebhookPayload, eventJSONErrorText(err))
	}
	switch {
	case event.ID == "":
		return event, fmt.Errorf("%w: event without an id", ErrWebhookPayload)
	case len(event.ID) > MaxKeyLength:
		return event, fmt.Errorf("%w: event id longer than %d characters", ErrWebhookPayload, MaxKeyLength)
	case !h.cfg.ignoreAPIVersion && event.APIVersion != stripe.APIVersion:
		return event, fmt.Errorf("%w: event has %q, stripe-go expects %q", ErrWebhookAPIVersion, event.APIVersion, stripe.APIVersion)
	}
	return event, nil
}

// eventJSONErrorText describes why a payload is not an event without
// echoing it.
func eventJSONErrorText(err error) string {
	var typeErr *json.UnmarshalTypeError
	if errors.As(err, &typeErr) {
		return fmt.Sprintf("field %q has the wrong type", typeErr.Field)
	}
	return jsonErrorText(err)
}

// signatureTime returns the timestamp of a Stripe-Signature header that
// stripe-go has accepted, read the way stripe-go reads it: the last "t="
// pair wins, and a header without one has the zero time.
func signatureTime(header string) time.Time {
	var t time.Time
	for _, pair := range strings.Split(header, ",") {
		name, value, ok := strings.Cut(pair, "=")
		if !ok || name != "t" {
			continue
		}
		if unix, err := strconv.ParseInt(value, 10, 64); err == nil {
			t = time.Unix(unix, 0)
		}
	}
	return t
}

func (h *WebhookHandler) log(ctx context.Context, level slog.Level, msg string, ev Event, eventType stripe.EventType) {
	if h.cfg.logger == nil {
		return
	}
	attrs := []slog.Attr{slog.String("scope", ev.Scope), slog.String("event_id", ev.Key)}
	if eventType != "" {
		attrs = append(attrs, slog.String("event_type", string(eventType)))
	}
	if ev.Duration > 0 {
		attrs = append(attrs, slog.Duration("duration", ev.Duration))
	}
	if ev.Attempts > 0 {
		attrs = append(attrs, slog.Int("failed_attempts", ev.Attempts))
	}
	attrs = append(attrs, slog.Any("error", ev.Err))
	h.cfg.logger.LogAttrs(ctx, level, msg, attrs...)
}

// writeWebhookAnswer writes the answer for a delivery's outcome and returns
// its status.
func writeWebhookAnswer(w http.ResponseWriter, outcome Outcome, err error) int {
	if err == nil || errors.Is(err, ErrWebhookNotRecorded) {
		h := w.Header()
		h.Set("Content-Type", webhookContentType)
		h.Set("Content-Length", strconv.Itoa(len(webhookReceived)))
		if outcome == OutcomeReplayed {
			h.Set(DefaultReplayHeader, "true")
		}
		w.WriteHeader(http.StatusOK)
		w.Write([]byte(webhookReceived))
		return http.StatusOK
	}
	kind := webhookProblemKind(err)
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
	return kind.status
}

// webhookProblemKind is the problem document for a delivery's error: the
// package's, with a 409 title that speaks of events. Details are shown only
// where the error's text is fixed by this package or stripe-go, never the
// function's or the store's.
func webhookProblemKind(err error) problemKind {
	kind := problemKindOf(err)
	if kind.err == ErrKeyInUse {
		kind.title = "The event is still being processed"
	}
	return kind
}

// SignWebhookPayload returns a Stripe-Signature header value for payload,
// signed with secret at time t (time.Now when t is zero) the way Stripe
// signs deliveries. It is for tests of webhook functions:
//
//	payload := []byte(`{"id":"evt_1","object":"event","api_version":"` + stripe.APIVersion + `","type":"account.updated","data":{"object":{}}}`)
//	req := httptest.NewRequest("POST", "/webhook", bytes.NewReader(payload))
//	req.Header.Set("Stripe-Signature", idempotency.SignWebhookPayload(payload, secret, time.Now()))
func SignWebhookPayload(payload []byte, secret string, t time.Time) string {
	return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{
		Payload:   payload,
		Secret:    secret,
		Timestamp: t,
	}).Header
}
