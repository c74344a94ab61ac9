package idempotency

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"
)

const (
	webhookRecordKind      = "stripe-webhook"
	webhookReceived        = `{"received":true}`
	webhookContentType     = "application/json"
	webhookSignatureHeader = "Stripe-Signature"
)

// WithWebhookScope puts the handler's events in their own namespace, so one
// store can serve several endpoints or Stripe accounts: the same event id
// under two scopes is processed once in each. Use one scope per endpoint
// whose functions do different work. WebhookHandler. Default: "", one
// namespace.
func WithWebhookScope(scope string) Option {
	return option("WithWebhookScope", forWebhook, func(s *settings) error {
		s.webhookScope = scope
		return nil
	})
}

// WithWebhookIgnoreAPIVersion accepts events whose api_version differs from
// [stripe.APIVersion]. Their objects may then decode incompletely into
// stripe-go's types. WebhookHandler. Default: such events are rejected with
// [ErrWebhookPayload], as stripe-go's webhook.ConstructEvent does.
func WithWebhookIgnoreAPIVersion() Option {
	return option("WithWebhookIgnoreAPIVersion", forWebhook, func(s *settings) error {
		s.ignoreAPIVersion = true
		return nil
	})
}

// WithWebhookPayload keeps each processed event's raw payload in its stored
// record, as the [Response.Body] of the record completed under the event's
// claim, for audits and reprocessing. Records then take the payload's size
// in the store. WebhookHandler. Default: the record keeps no payload
// (status 200, no body).
func WithWebhookPayload() Option {
	return option("WithWebhookPayload", forWebhook, func(s *settings) error {
		s.keepPayload = true
		return nil
	})
}

// WebhookHandler receives Stripe webhooks and runs a function once per
// event, however often Stripe delivers it:
//
//   - it reads the body (up to [WithMaxBodyBytes], 64 KiB by default) and
//     verifies its Stripe-Signature before parsing anything; a bad delivery
//     gets 400 and changes nothing;
//   - it claims the event id in the [Store], as the middleware claims a
//     key: the first delivery runs the function; a delivery of an event
//     already processed gets 200 without running it; one arriving while
//     another delivery still processes the event gets 409, so Stripe
//     retries it later;
//   - when the function succeeds, the event is marked processed for
//     [WithTTL] (7 days by default) and Stripe gets 200 {"received":true};
//     when it fails or panics, the claim is released and Stripe gets 500,
//     so its next delivery processes the event again.
//
// While a delivery's claim holds (see [WithLease]), no other delivery of
// the event runs the function; once it succeeded for an event, no later
// delivery runs it again, as long as the success was recorded. If the
// process dies, or loses its claim, between the function's return and
// that record, a later delivery runs the function again; keep its external
// effects idempotent too, for Stripe calls with [StripeKey].
//
// The store keeps a processing status per event (in flight while the
// function runs, then processed) and, when it implements
// [FailureRecorder] as [MemoryStore] and [RedisStore] do, how often the
// function failed for it and the last error; [WebhookHandler.Event] reads
// them.
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
	engine  *engine
	secrets []string
	fn      func(ctx context.Context, event stripe.Event) error
	s       settings
}

var _ http.Handler = (*WebhookHandler)(nil)

// NewWebhookHandler returns a handler that verifies deliveries against
// secrets (the endpoint's signing secrets, "whsec_..."; list the old and
// the new one while rolling a secret) and runs fn once per event, keeping
// its records in store.
//
// fn processes one Stripe event. It returns nil once the event is handled,
// including events it chooses to ignore; an error (or a panic) makes
// Stripe deliver the event again later. Calls for different events run
// concurrently. Its ctx carries the delivery's values and the event's [Claim] (Kind
// "stripe-webhook", Key the event id, and a Fence), so [StripeKey] derives
// idempotency keys for the Stripe calls it makes. It is cancelled when the
// handler loses its claim on the event (see [WithLease]) and on shutdown
// ([WithShutdown]), not when the sender hangs up: finished work is
// recorded, and Stripe's next delivery gets 200 without running it again.
//
// It takes the shared options ([WithLease], [WithTTL], [WithStoreTimeout],
// [WithMaxBodyBytes], [WithObserver], [WithLogger], [WithShutdown]) and the
// WithWebhook ones.
func NewWebhookHandler(store Store, secrets []string, fn func(ctx context.Context, event stripe.Event) error, opts ...Option) (*WebhookHandler, error) {
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
	s := settings{
		lease:        defaultLease,
		ttl:          7 * 24 * time.Hour,
		storeTimeout: defaultStoreTimeout,
		maxBodyBytes: 64 << 10,
		tolerance:    webhook.DefaultTolerance,
		now:          time.Now,
	}
	if err := s.apply(forWebhook, opts); err != nil {
		return nil, err
	}
	return &WebhookHandler{
		engine:  newEngine(store, &s, true),
		secrets: append([]string(nil), secrets...),
		fn:      fn,
		s:       s,
	}, nil
}

// ServeHTTP handles one delivery from Stripe: it reads the body and the
// Stripe-Signature header, calls [WebhookHandler.Handle], and answers once:
//
//   - 200 {"received":true} when the event was processed, also when the
//     outcome could not be recorded ([ErrWebhookNotRecorded]);
//   - 200 {"received":true} with X-Idempotent-Replayed: true for an event
//     already processed;
//   - 400 (bad signature or payload) or 413 (body too large), having done
//     nothing;
//   - 409 with Retry-After while another delivery processes the event;
//   - 500 when the function failed or panicked (the panic continues after
//     the answer is written and the event released);
//   - 503 with Retry-After when the store failed.
//
// Error answers are application/problem+json with fixed text.
func (h *WebhookHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rep := Report{Kind: webhookRecordKind, Method: r.Method, Path: r.URL.Path, Route: r.Pattern}
	buf := getBuffer()
	defer putBuffer(buf)
	payload, err := readBody(r, h.s.maxBodyBytes, buf)
	if err != nil {
		writeWebhookAnswer(w, OutcomeRejected, h.finish(r.Context(), &rep, OutcomeRejected, err))
		return
	}
	answered := false
	defer func() {
		if !answered { // the function panicked; the event is released
			writeWebhookAnswer(w, OutcomeReleased, ErrWebhookFailed)
		}
	}()
	outcome, err := h.handle(r.Context(), &rep, *payload, r.Header.Get(webhookSignatureHeader))
	answered = true
	writeWebhookAnswer(w, outcome, err)
}

// WebhookEvent is what the store knows of one Stripe event: see
// [WebhookHandler.Event].
type WebhookEvent struct {
	ID string
	// Status is "processed" (the function succeeded: later deliveries are
	// acknowledged without running it), "processing" (a delivery's attempt
	// holds the event now), "failed" (the last attempt failed or was cut
	// off: Stripe's next delivery runs the function again), or "unseen"
	// (nothing is kept: never received, or its record expired).
	Status string
	// Attempts counts the failed attempts, and LastError is the last one's
	// error text (the function's error, or "panic"), while the history
	// lasts ([WithTTL] after the last failure; it outlives a later
	// success). Zero when none failed or the store keeps no history
	// ([FailureRecorder]).
	Attempts  int
	LastError string
	// ClaimedAt is when the attempt that processed the event, or that
	// holds it, began; zero otherwise.
	ClaimedAt time.Time
	// RecoveryPoint is the last checkpoint of an unfinished attempt
	// ([Claim.Checkpoint]).
	RecoveryPoint string
	// Payload is the event as Stripe sent it, for a processed event when
	// [WithWebhookPayload] keeps it.
	Payload []byte
}

// Event tells what became of the event eventID, for an operator or an
// admin endpoint: read from the store, claiming nothing and running
// nothing. Each store call is bounded by [WithStoreTimeout]. The error
// wraps [errors.ErrUnsupported] when the store cannot read records
// without claiming them ([Reader]; every store of this module can).
func (h *WebhookHandler) Event(ctx context.Context, eventID string) (WebhookEvent, error) {
	ev := WebhookEvent{ID: eventID, Status: "unseen"}
	reader, ok := findStore[Reader](h.engine.store)
	if !ok {
		return ev, fmt.Errorf("idempotency: %T cannot read records: %w", h.engine.store, errors.ErrUnsupported)
	}
	key := recordKey(webhookRecordKind, h.s.webhookScope, eventID)
	callCtx, cancel := h.engine.bound(ctx)
	defer cancel()
	rec, err := reader.Get(callCtx, key)
	if err != nil {
		return ev, fmt.Errorf("%w: %w", ErrStoreUnavailable, err)
	}
	if recorder, ok := findStore[FailureRecorder](h.engine.store); ok {
		if ev.Attempts, ev.LastError, err = recorder.Failures(callCtx, key); err != nil {
			return ev, fmt.Errorf("%w: %w", ErrStoreUnavailable, err)
		}
	}
	switch {
	case rec != nil && rec.Response != nil:
		ev.Status, ev.ClaimedAt = "processed", rec.CreatedAt
		if len(rec.Response.Body) > 0 {
			ev.Payload = slices.Clone(rec.Response.Body)
		}
	case rec != nil && rec.Token != "":
		ev.Status, ev.ClaimedAt, ev.RecoveryPoint = "processing", rec.CreatedAt, rec.RecoveryPoint
	case rec != nil: // suspended: an attempt stopped after a checkpoint
		ev.Status, ev.RecoveryPoint = "failed", rec.RecoveryPoint
	case ev.Attempts > 0:
		ev.Status = "failed"
	}
	return ev, nil
}

// Remove deletes what the store keeps of the event eventID, whatever its
// state: the operator's way out of a record that cannot be read
// ([ErrRecordUnreadable]), which makes every delivery of the event fail
// with 500 until it ends. The next delivery then processes the event. The
// error wraps [errors.ErrUnsupported] when the store cannot remove
// records ([Remover]).
func (h *WebhookHandler) Remove(ctx context.Context, eventID string) error {
	remover, ok := findStore[Remover](h.engine.store)
	if !ok {
		return fmt.Errorf("idempotency: %T cannot remove records: %w", h.engine.store, errors.ErrUnsupported)
	}
	callCtx, cancel := h.engine.bound(ctx)
	defer cancel()
	if err := remover.Remove(callCtx, recordKey(webhookRecordKind, h.s.webhookScope, eventID)); err != nil {
		return fmt.Errorf("%w: removing a record: %w", ErrStoreUnavailable, err)
	}
	return nil
}

// Handle is the core of the handler, for deliveries that do not arrive as
// an [http.Request] (a queue, a serverless runtime): it verifies payload
// against signatureHeader, the value of the Stripe-Signature header,
// claims the event, runs the function and records the outcome.
//
// It returns [OutcomeExecuted] (processed) or [OutcomeReplayed] (a
// duplicate) with a nil error. Any other outcome comes with an error:
// [OutcomeRejected] with one wrapping [ErrWebhookSignature],
// [ErrWebhookPayload] or [ErrBodyTooLarge]; [OutcomeInFlight] with
// [ErrKeyInUse]; [OutcomeReleased] with one wrapping [ErrWebhookFailed] and
// the function's error; [OutcomeStoreError] with one wrapping
// [ErrStoreUnavailable] when nothing ran. When the function succeeded but
// its outcome was not recorded, it returns [OutcomeStoreError] or
// [OutcomeLeaseLost] with an error wrapping [ErrWebhookNotRecorded]: the
// event was processed, tell the sender so. [StatusCode] of the error is
// the status ServeHTTP answers.
//
// If the function panics, Handle releases the event and lets the panic
// continue.
func (h *WebhookHandler) Handle(ctx context.Context, payload []byte, signatureHeader string) (Outcome, error) {
	rep := Report{Kind: webhookRecordKind}
	if int64(len(payload)) > h.s.maxBodyBytes {
		err := newRequestError(ErrBodyTooLarge, fmt.Sprintf("%d bytes, limit %d", len(payload), h.s.maxBodyBytes))
		return OutcomeRejected, h.finish(ctx, &rep, OutcomeRejected, err)
	}
	return h.handle(ctx, &rep, payload, signatureHeader)
}

func (h *WebhookHandler) handle(ctx context.Context, rep *Report, payload []byte, signatureHeader string) (Outcome, error) {
	event, err := h.verify(payload, signatureHeader)
	if err != nil {
		return OutcomeRejected, h.finish(ctx, rep, OutcomeRejected, err)
	}
	rep.Scope, rep.Key, rep.EventType = h.s.webhookScope, event.ID, string(event.Type)
	key := recordKey(webhookRecordKind, rep.Scope, event.ID)
	token := rand.Text()
	created := h.s.now()

	got, err := h.engine.acquire(ctx, key, Record{Token: token, CreatedAt: created})
	existing := got.existing
	switch {
	case errors.Is(err, ErrRecordUnreadable):
		rep.Err = err
		h.log(ctx, slog.LevelError, "idempotency: the event's record is unreadable; remove it with WebhookHandler.Remove", rep, event.Type)
		return OutcomeUnreadable, h.finish(ctx, rep, OutcomeUnreadable, err)
	case err != nil:
		rep.Err = err
		h.log(ctx, slog.LevelWarn, "idempotency: webhook store failed, delivery refused", rep, event.Type)
		return OutcomeStoreError, h.finish(ctx, rep, OutcomeStoreError, err)
	case existing != nil && existing.Response == nil:
		return OutcomeInFlight, h.finish(ctx, rep, OutcomeInFlight, ErrKeyInUse)
	case existing != nil:
		return OutcomeReplayed, h.finish(ctx, rep, OutcomeReplayed, nil)
	}
	a := &webhookAttempt{h: h, ctx: ctx, event: event, payload: payload, rep: rep}
	a.claim = Claim{Kind: webhookRecordKind, Scope: rep.Scope, Key: event.ID, created: created}
	a.key, a.token = key, token
	fnCtx := h.engine.start(&a.attempt, ctx, got, false)
	h.engine.execute(fnCtx, &a.attempt, a)
	return a.outcome, a.err
}

// webhookAttempt is one run of the webhook function for an event.
type webhookAttempt struct {
	attempt
	h        *WebhookHandler
	ctx      context.Context
	event    stripe.Event
	payload  []byte
	rep      *Report
	returned bool // the function returned (did not panic)
	fnFailed bool
	outcome  Outcome
	err      error
}

func (a *webhookAttempt) run(ctx context.Context) (*Record, string, error) {
	start := time.Now()
	err := a.h.fn(ctx, a.event)
	a.rep.Duration = time.Since(start)
	a.returned = true
	if err != nil {
		a.fnFailed = true
		return nil, err.Error(), fmt.Errorf("%w: %w", ErrWebhookFailed, err)
	}
	resp := Response{StatusCode: http.StatusOK}
	if a.h.s.keepPayload {
		resp.Header = http.Header{"Content-Type": {webhookContentType}}
		resp.Body = append([]byte(nil), a.payload...)
	}
	return newCompletion(resp), "", nil
}

func (a *webhookAttempt) settled(outcome Outcome, err error) {
	processed := a.returned && !a.fnFailed
	switch {
	case !a.returned:
		err = fmt.Errorf("%w: panic", ErrWebhookFailed)
		if outcome == OutcomeStoreError {
			err = fmt.Errorf("%w (freeing the event failed)", err)
		}
	case processed && outcome == OutcomeLeaseLost:
		a.h.log(a.ctx, slog.LevelWarn, "idempotency: webhook processed, but its claim lapsed before it was recorded", a.rep, a.event.Type)
		err = fmt.Errorf("%w: %w", ErrWebhookNotRecorded, err)
	case processed && outcome == OutcomeStoreError:
		a.h.log(a.ctx, slog.LevelWarn, "idempotency: webhook processed, but recording it failed", a.rep, a.event.Type)
		err = fmt.Errorf("%w: %w", ErrWebhookNotRecorded, err)
	}
	if !processed {
		a.rep.Attempts = a.failures
		a.rep.Err = err
		a.h.log(a.ctx, slog.LevelWarn, "idempotency: webhook processing failed; the event is released for Stripe's retry", a.rep, a.event.Type)
	}
	a.outcome, a.err = outcome, a.h.finish(a.ctx, a.rep, outcome, err)
}

// finish tells the observer the delivery's outcome and returns err.
func (h *WebhookHandler) finish(ctx context.Context, rep *Report, outcome Outcome, err error) error {
	rep.Outcome, rep.Err, rep.Status = outcome, err, webhookStatus(err)
	if outcome == OutcomeRejected {
		h.log(ctx, slog.LevelInfo, "idempotency: webhook delivery rejected", rep, "")
	}
	if h.s.observer != nil {
		h.s.observer(ctx, *rep)
	}
	return err
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
		return event, &requestError{kind: ErrWebhookSignature.(*kind), detail: err.Error(), cause: err}
	}
	if h.s.now().Sub(signatureTime(header)) > h.s.tolerance {
		return event, &requestError{kind: ErrWebhookSignature.(*kind), detail: webhook.ErrTooOld.Error(), cause: webhook.ErrTooOld}
	}
	if err := json.Unmarshal(payload, &event); err != nil {
		return event, newRequestError(ErrWebhookPayload, eventJSONErrorText(err))
	}
	switch {
	case event.ID == "":
		return event, newRequestError(ErrWebhookPayload, "event without an id")
	case len(event.ID) > maxKeyLength:
		return event, newRequestError(ErrWebhookPayload, fmt.Sprintf("event id longer than %d characters", maxKeyLength))
	case !h.s.ignoreAPIVersion && event.APIVersion != stripe.APIVersion:
		return event, newRequestError(ErrWebhookPayload, fmt.Sprintf("event has API version %q, stripe-go expects %q", event.APIVersion, stripe.APIVersion))
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

func (h *WebhookHandler) log(ctx context.Context, level slog.Level, msg string, rep *Report, eventType stripe.EventType) {
	if h.s.logger == nil {
		return
	}
	attrs := []slog.Attr{slog.String("scope", rep.Scope), slog.String("event_id", rep.Key)}
	if eventType != "" {
		attrs = append(attrs, slog.String("event_type", string(eventType)))
	}
	if rep.Duration > 0 {
		attrs = append(attrs, slog.Duration("duration", rep.Duration))
	}
	if rep.Attempts > 0 {
		attrs = append(attrs, slog.Int("failed_attempts", rep.Attempts))
	}
	attrs = append(attrs, slog.Any("error", rep.Err))
	h.s.logger.LogAttrs(ctx, level, msg, attrs...)
}

// webhookStatus is the status a delivery with this error is answered.
func webhookStatus(err error) int {
	if err == nil {
		return http.StatusOK
	}
	return StatusCode(err)
}

// writeWebhookAnswer answers a delivery.
func writeWebhookAnswer(w http.ResponseWriter, outcome Outcome, err error) {
	if webhookStatus(err) != http.StatusOK {
		WriteError(w, nil, err)
		return
	}
	h := w.Header()
	h.Set("Content-Type", webhookContentType)
	h.Set("Content-Length", strconv.Itoa(len(webhookReceived)))
	if outcome == OutcomeReplayed {
		h.Set("X-Idempotent-Replayed", "true")
	}
	w.WriteHeader(http.StatusOK)
	w.Write([]byte(webhookReceived))
}
