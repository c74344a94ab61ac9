package idempotency

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/stripe/stripe-go/v76"
)

const (
	webhookReceived    = `{"received":true}`
	webhookContentType = "application/json"
)

// webhookKind is the [Claim.Kind] and [Report.Kind] of the events of a
// provider: "stripe-webhook", "github-webhook", … Stripe's keeps the name
// its records had before other providers came, so that an upgrade never
// processes a recorded event again.
func webhookKind(provider string) string { return provider + "-webhook" }

// WebhookHandler receives the webhook deliveries of one endpoint and runs
// a function once per event, however often the provider delivers it:
//
//   - it reads the body (up to [WebhookOptions].MaxBodyBytes) and has its
//     [Verifier] check the delivery's signature before anything else; a
//     bad delivery gets 400 and changes nothing;
//   - it claims the event's ID in the [Store], as the middleware claims a
//     key: the first delivery runs the function; a delivery of an event
//     already processed gets 200 without running it; one arriving while
//     another delivery still processes the event gets 409, so the
//     provider retries it later;
//   - when the function succeeds, the event is marked processed for the
//     TTL (7 days by default) and the provider gets 200
//     {"received":true}; when it fails or panics, the claim is released
//     and the provider gets 500, so its next delivery processes the event
//     again.
//
// While a delivery's claim holds, no other delivery of the event runs the
// function; once it succeeded for an event, no later delivery runs it
// again, as long as the success was recorded. If the process dies, or
// loses its claim, between the function's return and that record, a later
// delivery runs the function again; keep its external effects idempotent
// too, for Stripe calls with [StripeKey].
//
// Records are kept per provider and scope ([WebhookOptions].Scope), so
// two providers' event IDs, or two endpoints', never collide. The store
// keeps a processing status per event and, when it implements
// [FailureRecorder] as every store of this module does, how often the
// function failed for it and the last error; [WebhookHandler.Event] reads
// them. Every attempt also reaches the observer and the logger.
//
// The synchronous handler answers once the function has run, so the
// provider waits for it and retries what failed on its own schedule
// (Stripe: up to three days). pgstore's inbox instead stores each
// delivery and answers at once, and its workers process the events with
// retries, dead letters and redrive: pick it when processing is slow, or
// when an operator must see and replay what failed (see docs/webhooks.md).
//
//	v, err := idempotency.NewStripeVerifier([]string{os.Getenv("STRIPE_WEBHOOK_SECRET")}, 0)
//	if err != nil {
//		return err
//	}
//	h, err := idempotency.NewWebhookHandler(store, v, func(ctx context.Context, ev idempotency.WebhookEvent) error {
//		switch ev.Type {
//		case "account.updated":
//			return syncAccount(ctx, ev.Stripe)
//		}
//		return nil
//	}, idempotency.WebhookOptions{})
//	if err != nil {
//		return err
//	}
//	mux.Handle("POST /stripe/webhook", h)
//
// A WebhookHandler is safe for concurrent use; create it with
// [NewWebhookHandler].
type WebhookHandler struct {
	engine   *engine
	verifier Verifier
	provider string
	kind     string
	fn       func(ctx context.Context, ev WebhookEvent) error
	s        settings
	versions sync.Map // the Stripe API versions other than stripe-go's already logged
}

var _ http.Handler = (*WebhookHandler)(nil)

// WebhookEvent is one webhook event: what a [Verifier] read from a
// delivery, handed to the handler's function, and, from
// [WebhookHandler.Event], what the store knows of it.
type WebhookEvent struct {
	// Provider is the [Verifier]'s, ID the event's (unique for the
	// provider) and Type its type where the delivery says it ("" where it
	// does not): a label of low cardinality.
	Provider string
	ID       string
	Type     string

	// Object names what the event is about, where the provider says it
	// (for Stripe, the data object's id): pgstore's inbox processes the
	// events of one object in order when asked to.
	Object string

	// Payload is the body as the provider signed it: the raw JSON.
	Payload []byte

	// APIVersion and Stripe, for a Stripe event: the API version of its
	// payload, and the event decoded as far as stripe-go v76 can (see
	// [NewStripeVerifier]); an APIVersion other than [stripe.APIVersion]
	// is no error. Nil for other providers.
	APIVersion string
	Stripe     *stripe.Event

	// What the store knows, filled in by [WebhookHandler.Event] only.
	//
	// Status is "processed" (the function succeeded: later deliveries are
	// acknowledged without running it), "processing" (a delivery's attempt
	// holds the event now), "failed" (the last attempt failed or was cut
	// off: the next delivery runs the function again), or "unseen"
	// (nothing is kept: never received, or its record expired).
	Status string
	// Attempts counts the failed attempts, and LastError is the last one's
	// error text (the function's error, or "panic"), while the history
	// lasts (the TTL after the last failure; it outlives a later
	// success). Zero when none failed or the store keeps no history.
	Attempts  int
	LastError string
	// ClaimedAt is when the attempt that processed the event, or that
	// holds it, began; zero otherwise.
	ClaimedAt time.Time
	// RecoveryPoint is the last checkpoint of an unfinished attempt
	// ([Claim.Checkpoint]).
	RecoveryPoint string
}

// NewWebhookHandler returns a handler that verifies deliveries with v and
// runs fn once per event, keeping its records in store.
//
// fn processes one event. It returns nil once the event is handled,
// including events it chooses to ignore; an error (or a panic) makes the
// provider deliver the event again later. Calls for different events run
// concurrently. Its ctx carries the delivery's values and the event's
// [Claim] (Kind "<provider>-webhook", Key the event ID, and a Fence), so
// [StripeKey] derives idempotency keys for the Stripe calls it makes. It is
// cancelled when the handler loses its claim on the event (see
// [WebhookOptions].Lease) and on shutdown, not when the sender hangs up:
// finished work is recorded, and the next delivery gets 200 without
// running it again.
func NewWebhookHandler(store Store, v Verifier, fn func(ctx context.Context, ev WebhookEvent) error, opts WebhookOptions) (*WebhookHandler, error) {
	switch {
	case isNilStore(store):
		return nil, errors.New("idempotency: store is nil")
	case v == nil:
		return nil, errors.New("idempotency: webhook verifier is nil")
	case fn == nil:
		return nil, errors.New("idempotency: webhook function is nil")
	case v.Provider() == "":
		return nil, fmt.Errorf("idempotency: webhook verifier %T names no provider", v)
	}
	s, err := opts.settings()
	if err != nil {
		return nil, err
	}
	return &WebhookHandler{
		engine:   newEngine(store, &s, true),
		verifier: v,
		provider: v.Provider(),
		kind:     webhookKind(v.Provider()),
		fn:       fn,
		s:        s,
	}, nil
}

// ServeHTTP handles one delivery: it reads the body, calls
// [WebhookHandler.Handle] with the request's headers, and answers once:
//
//   - 200 {"received":true} when the event was processed, also when the
//     outcome could not be recorded ([ErrWebhookNotRecorded]);
//   - 200 {"received":true} with X-Idempotent-Replayed: true for an event
//     already processed;
//   - 400 (bad signature or payload) or 413 (body too large), having done
//     nothing;
//   - 409 with Retry-After while another delivery processes the event;
//   - 500 when the function failed or panicked (the panic continues after
//     the answer is written and the event released), or when the event's
//     record is unreadable ([ErrRecordUnreadable]);
//   - 503 with Retry-After when the store failed.
//
// Error answers are application/problem+json with fixed text.
func (h *WebhookHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rep := Report{Kind: h.kind, Method: r.Method, Path: r.URL.Path, Route: r.Pattern}
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
	outcome, err := h.handle(r.Context(), &rep, r.Header, *payload)
	answered = true
	writeWebhookAnswer(w, outcome, err)
}

// Event tells what became of the event eventID, for an operator or an
// admin endpoint: read from the store, claiming nothing and running
// nothing. Each store call is bounded by the store timeout. The error
// wraps [errors.ErrUnsupported] when the store cannot read records
// without claiming them ([Inspector]; every store of this module can).
func (h *WebhookHandler) Event(ctx context.Context, eventID string) (WebhookEvent, error) {
	ev := WebhookEvent{Provider: h.provider, ID: eventID, Status: "unseen"}
	inspector, ok := findStore[Inspector](h.engine.store)
	if !ok {
		return ev, fmt.Errorf("idempotency: %T cannot read records: %w", h.engine.store, errors.ErrUnsupported)
	}
	key := recordKey(h.kind, h.s.webhookScope, eventID)
	callCtx, cancel := h.engine.bound(ctx)
	defer cancel()
	rec, err := inspector.Get(callCtx, key)
	if err != nil {
		if errors.Is(err, ErrRecordUnreadable) {
			return ev, err
		}
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
// records ([Inspector]).
func (h *WebhookHandler) Remove(ctx context.Context, eventID string) error {
	inspector, ok := findStore[Inspector](h.engine.store)
	if !ok {
		return fmt.Errorf("idempotency: %T cannot remove records: %w", h.engine.store, errors.ErrUnsupported)
	}
	callCtx, cancel := h.engine.bound(ctx)
	defer cancel()
	if err := inspector.Remove(callCtx, recordKey(h.kind, h.s.webhookScope, eventID)); err != nil {
		return fmt.Errorf("%w: removing a record: %w", ErrStoreUnavailable, err)
	}
	return nil
}

// Handle is the core of the handler, for deliveries that do not arrive as
// an [http.Request] (a queue, a serverless runtime): it verifies payload
// against the delivery's header, claims the event, runs the function and
// records the outcome.
//
// It returns [OutcomeExecuted] (processed) or [OutcomeReplayed] (a
// duplicate) with a nil error. Any other outcome comes with an error:
// [OutcomeRejected] with one wrapping [ErrWebhookSignature],
// [ErrWebhookPayload] or [ErrBodyTooLarge]; [OutcomeInFlight] with
// [ErrKeyInUse]; [OutcomeReleased] with one wrapping [ErrWebhookFailed] and
// the function's error; [OutcomeStoreError] with one wrapping
// [ErrStoreUnavailable] when nothing ran; [OutcomeUnreadable] with one
// wrapping [ErrRecordUnreadable]. When the function succeeded but its
// outcome was not recorded, it returns [OutcomeStoreError] or
// [OutcomeLeaseLost] with an error wrapping [ErrWebhookNotRecorded]: the
// event was processed, tell the sender so. [StatusCode] of the error is
// the status ServeHTTP answers.
//
// If the function panics, Handle releases the event and lets the panic
// continue.
func (h *WebhookHandler) Handle(ctx context.Context, header http.Header, payload []byte) (Outcome, error) {
	rep := Report{Kind: h.kind}
	if int64(len(payload)) > h.s.maxBodyBytes {
		err := newRequestError(ErrBodyTooLarge, fmt.Sprintf("%d bytes, limit %d", len(payload), h.s.maxBodyBytes))
		return OutcomeRejected, h.finish(ctx, &rep, OutcomeRejected, err)
	}
	return h.handle(ctx, &rep, header, payload)
}

func (h *WebhookHandler) handle(ctx context.Context, rep *Report, header http.Header, payload []byte) (Outcome, error) {
	event, err := h.verifier.Verify(header, payload, h.s.now())
	if err == nil {
		err = checkEventID(event.ID)
	}
	if err != nil {
		if kindOf(err) == &internalError {
			// A verifier of the user's own that said nothing of the kind.
			err = signatureError("delivery refused", err)
		}
		return OutcomeRejected, h.finish(ctx, rep, OutcomeRejected, err)
	}
	event.Provider = h.provider
	rep.Scope, rep.Key, rep.EventType, rep.APIVersion = h.s.webhookScope, event.ID, event.Type, event.APIVersion
	h.noteAPIVersion(ctx, rep)
	key := recordKey(h.kind, rep.Scope, event.ID)
	token := rand.Text()
	created := h.s.now()

	got, err := h.engine.acquire(ctx, key, Record{Token: token, CreatedAt: created})
	existing := got.existing
	switch {
	case errors.Is(err, ErrRecordUnreadable):
		rep.Err = err
		h.log(ctx, slog.LevelError, "idempotency: the event's record is unreadable; remove it with WebhookHandler.Remove", rep)
		return OutcomeUnreadable, h.finish(ctx, rep, OutcomeUnreadable, err)
	case err != nil:
		rep.Err = err
		h.log(ctx, slog.LevelWarn, "idempotency: webhook store failed, delivery refused", rep)
		return OutcomeStoreError, h.finish(ctx, rep, OutcomeStoreError, err)
	case existing != nil && existing.Response == nil:
		return OutcomeInFlight, h.finish(ctx, rep, OutcomeInFlight, ErrKeyInUse)
	case existing != nil:
		return OutcomeReplayed, h.finish(ctx, rep, OutcomeReplayed, nil)
	}
	a := &webhookAttempt{h: h, ctx: ctx, event: event, rep: rep}
	a.claim = Claim{Kind: h.kind, Scope: rep.Scope, Key: event.ID, created: created}
	a.key, a.token = key, token
	fnCtx := h.engine.start(&a.attempt, ctx, got, false)
	h.engine.execute(fnCtx, &a.attempt, a)
	return a.outcome, a.err
}

// noteAPIVersion logs, once per version and handler, a Stripe event whose
// API version is not stripe-go's: it is processed all the same, and the
// operator learns that its objects may decode incompletely.
func (h *WebhookHandler) noteAPIVersion(ctx context.Context, rep *Report) {
	if rep.APIVersion == "" || rep.APIVersion == stripe.APIVersion || h.s.logger == nil {
		return
	}
	if _, seen := h.versions.LoadOrStore(rep.APIVersion, true); seen {
		return
	}
	h.s.logger.LogAttrs(ctx, slog.LevelInfo, "idempotency: webhook events in a Stripe API version other than stripe-go's; processed, their objects decoded as far as stripe-go can",
		slog.String("api_version", rep.APIVersion), slog.String("stripe_go_api_version", stripe.APIVersion))
}

// webhookAttempt is one run of the webhook function for an event.
type webhookAttempt struct {
	attempt
	h        *WebhookHandler
	ctx      context.Context
	event    WebhookEvent
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
		resp.Body = slices.Clone(a.event.Payload)
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
		a.h.log(a.ctx, slog.LevelWarn, "idempotency: webhook processed, but its claim lapsed before it was recorded", a.rep)
		err = fmt.Errorf("%w: %w", ErrWebhookNotRecorded, err)
	case processed && outcome == OutcomeStoreError:
		a.h.log(a.ctx, slog.LevelWarn, "idempotency: webhook processed, but recording it failed", a.rep)
		err = fmt.Errorf("%w: %w", ErrWebhookNotRecorded, err)
	}
	if !processed {
		a.rep.Attempts = a.failures
		a.rep.Err = err
		a.h.log(a.ctx, slog.LevelWarn, "idempotency: webhook processing failed; the event is released for the provider's retry", a.rep)
	}
	a.outcome, a.err = outcome, a.h.finish(a.ctx, a.rep, outcome, err)
}

// finish tells the observer the delivery's outcome and returns err.
func (h *WebhookHandler) finish(ctx context.Context, rep *Report, outcome Outcome, err error) error {
	rep.Outcome, rep.Err, rep.Status = outcome, err, webhookStatus(err)
	if outcome == OutcomeRejected {
		h.log(ctx, slog.LevelInfo, "idempotency: webhook delivery rejected", rep)
	}
	if h.s.observer != nil {
		h.s.observer(ctx, *rep)
	}
	return err
}

func (h *WebhookHandler) log(ctx context.Context, level slog.Level, msg string, rep *Report) {
	if h.s.logger == nil {
		return
	}
	attrs := []slog.Attr{slog.String("provider", h.provider), slog.String("scope", rep.Scope), slog.String("event_id", rep.Key)}
	if rep.EventType != "" {
		attrs = append(attrs, slog.String("event_type", rep.EventType))
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
