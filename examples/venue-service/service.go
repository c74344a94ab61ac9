package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/client"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/console"
	"github.com/seed70ea8305/idempotency/idemotel"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
	"github.com/seed70ea8305/idempotency/pgstore/inbox/admin"
)

// Venue is what the service stores and returns.
type Venue struct {
	ID              string `json:"id"`
	Tenant          string `json:"tenant"`
	Name            string `json:"name"`
	Slug            string `json:"slug"`
	StripeAccountID string `json:"stripe_account_id"`
	ChargesEnabled  bool   `json:"charges_enabled"`
	// Status is "pending" while the venue is being created, then "active".
	Status string `json:"status"`
}

// service holds the venues and the counters behind GET /stats. Venues live
// in memory, or in PostgreSQL with DATABASE_URL.
type service struct {
	stripe  *client.API
	apiKeys apiKeys
	logger  *slog.Logger
	// failAfterStripe, when set, is asked after each Stripe call whether
	// to fail there (the test switch CHAOS_FAIL_AFTER_STRIPE).
	failAfterStripe func() bool
	// failWebhook, when set, is asked at each webhook function call
	// whether to fail it (the test switch CHAOS_FAIL_WEBHOOK).
	failWebhook func() bool
	// crashAfter, when set, is asked at each recovery point of a venue
	// creation whether to crash there (the test switch CHAOS_CRASH_AFTER).
	crashAfter func(point string) bool

	venues venueStore
	// activity counts request outcomes and webhook attempts per minute
	// for the operator console's charts.
	activity *console.Activity

	mu             sync.Mutex
	stripeAccounts map[string]bool // distinct accounts Stripe returned

	venuesCreated     atomic.Int64
	webhooksProcessed atomic.Int64
	// partnerEventsProcessed counts the partner's events processed.
	partnerEventsProcessed atomic.Int64
	webhookDuplicates      atomic.Int64
	webhookFailures        atomic.Int64
}

func newService(stripeClient *client.API, venues venueStore, keys apiKeys, logger *slog.Logger) *service {
	return &service{
		stripe:         stripeClient,
		venues:         venues,
		activity:       console.NewActivity(),
		apiKeys:        keys,
		logger:         logger,
		stripeAccounts: make(map[string]bool),
	}
}

// routes wires the handlers, the idempotency middleware and the webhook
// helper onto one mux, with the library's metrics behind GET /metrics.
//
// With a pool (DATABASE_URL), Stripe's deliveries go to the webhook inbox:
// verified, stored and answered 200 at once, then processed by the worker
// that run starts. Without one, the webhook helper processes each delivery
// before answering.
func (s *service) routes(ctx context.Context, store idempotency.Store, pool *pgxpool.Pool, cfg config, metrics *idemotel.Metrics, metricsHandler http.Handler) (http.Handler, error) {
	// The console reads records through the store itself (every store of
	// the library is an Inspector), not through the metrics' wrapper.
	records, _ := store.(idempotency.Inspector)
	// Time every store call.
	store = metrics.Store(store)
	mw, err := idempotency.New(store, idempotency.Options{
		// Records belong to the authenticated tenant (s.authenticate runs
		// first), never to a header the client chooses.
		Scope:       func(r *http.Request) string { return tenantFrom(r.Context()) },
		Fingerprint: idempotency.Fingerprinter{CanonicalJSON: true}.Fingerprint,
		Logger:      s.logger,
		// A duplicate that sends "Prefer: wait=N" waits up to N seconds
		// (10 at most) for the first request's outcome instead of a 409.
		Wait: 10 * time.Second,
		// One observer: the audit log and the metrics.
		Observer: func(ctx context.Context, r idempotency.Report) {
			metrics.ObserveRequest(ctx, r)
			s.activity.ObserveRequest(ctx, r)
			s.auditReplay(ctx, r)
		},
	})
	if err != nil {
		return nil, err
	}
	// Two webhook endpoints: Stripe's, and a ticketing partner's that
	// signs its deliveries as the Standard Webhooks specification says.
	stripeVerifier, err := idempotency.NewStripeVerifier([]string{cfg.webhookSecret}, 0)
	if err != nil {
		return nil, err
	}
	partnerVerifier, err := idempotency.NewStandardWebhooksVerifier([]string{cfg.partnerSecret}, 0)
	if err != nil {
		return nil, err
	}
	var stripeWebhooks, partnerWebhooks, adminAPI, adminConsole http.Handler
	if pool != nil {
		// With PostgreSQL, deliveries go to the inbox: stored and
		// answered at once, processed by the worker (startWorker) with
		// retries and dead letters.
		stripeInbox, err := inbox.NewInbox(ctx, pool, stripeVerifier, inbox.Options{})
		if err != nil {
			return nil, err
		}
		partnerInbox, err := inbox.NewInbox(ctx, pool, partnerVerifier, inbox.Options{})
		if err != nil {
			return nil, err
		}
		stripeWebhooks, partnerWebhooks = s.countDuplicates(stripeInbox), s.countDuplicates(partnerInbox)
		if cfg.adminKey != "" {
			api, err := admin.New(stripeInbox, admin.Options{Redrive: cfg.adminRedrive})
			if err != nil {
				return nil, err
			}
			adminAPI = requireKey(cfg.adminKey, http.StripPrefix("/admin/webhooks", api))
			// The operator console in the browser: a login with the same
			// key; redrives and removals with ADMIN_REDRIVE=1 only.
			if adminConsole, err = console.New(ctx, cfg.adminKey, console.Options{
				Pool: pool, Records: records, Activity: s.activity, ReadWrite: cfg.adminRedrive,
				Prefix: "/admin/console", Logger: s.logger,
			}); err != nil {
				return nil, err
			}
		}
	} else {
		opts := idempotency.WebhookOptions{
			Logger: s.logger,
			Observer: func(ctx context.Context, r idempotency.Report) {
				metrics.ObserveWebhook(ctx, r)
				s.countWebhook(ctx, r)
			},
		}
		if stripeWebhooks, err = idempotency.NewWebhookHandler(store, stripeVerifier, s.handleWebhook, opts); err != nil {
			return nil, err
		}
		if partnerWebhooks, err = idempotency.NewWebhookHandler(store, partnerVerifier, s.handleWebhook, opts); err != nil {
			return nil, err
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	// Authentication comes before the middleware: a request without valid
	// credentials gets 401 and claims and stores nothing.
	mux.Handle("POST /venues", s.authenticate(mw.Handler(http.HandlerFunc(s.createVenue))))
	mux.Handle("GET /venues", s.authenticate(http.HandlerFunc(s.listVenues)))
	mux.Handle("GET /venues/{id}", s.authenticate(http.HandlerFunc(s.getVenue)))
	// Stripe authenticates its deliveries with the Stripe-Signature header,
	// which the webhook handler verifies before anything else.
	mux.Handle("POST /webhooks/stripe", stripeWebhooks)
	// The partner signs with webhook-id, webhook-timestamp and
	// webhook-signature (Standard Webhooks).
	mux.Handle("POST /webhooks/partner", partnerWebhooks)
	if adminAPI != nil {
		// The inbox's operator API: events across tenants, for operators
		// with ADMIN_KEY only.
		mux.Handle("/admin/webhooks/", adminAPI)
		mux.Handle("/admin/console/", adminConsole)
	}
	// Operational endpoints, unauthenticated: keep them off the public
	// network (or put them on another listener).
	mux.HandleFunc("GET /stats", s.stats)
	mux.Handle("GET /metrics", metricsHandler)
	return mux, nil
}

// createVenue creates a venue in three steps, each ending with a recovery
// point of the request's claim, so that a retry after a crash or a failure
// resumes where the last attempt stopped instead of starting over:
//
//  1. the venue, pending ("venue_created");
//  2. its Stripe Connect account ("account_created"): the Stripe call
//     carries a key derived from this request's Idempotency-Key, so even
//     a retry that repeats it gets the account created the first time;
//  3. the venue, active: the response.
//
// The venue's ID is derived from the claim too, so a step run again finds
// what it stored before.
func (s *service) createVenue(w http.ResponseWriter, r *http.Request) {
	var in struct {
		Name string `json:"name"`
		Slug string `json:"slug"`
	}
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		writeProblem(w, http.StatusBadRequest, "Malformed JSON body", "the body must be a JSON object with name and slug")
		return
	}
	in.Name, in.Slug = strings.TrimSpace(in.Name), strings.TrimSpace(in.Slug)
	if in.Name == "" || in.Slug == "" {
		writeProblem(w, http.StatusBadRequest, "Missing field", "name and slug are required")
		return
	}
	ctx := r.Context()
	tenant := tenantFrom(ctx)
	claim, _ := idempotency.ClaimFromContext(ctx)
	var progress venueProgress
	if claim.RecoveryPoint != "" {
		if err := json.Unmarshal(claim.RecoveryData, &progress); err != nil {
			s.internalError(w, r, "reading the recovery point", err)
			return
		}
		s.logger.InfoContext(ctx, "resuming a venue creation", "recovery_point", claim.RecoveryPoint, "venue_id", progress.VenueID)
	}

	switch claim.RecoveryPoint {
	case "":
		id, err := venueID(ctx)
		if err != nil {
			s.internalError(w, r, "deriving the venue ID", err)
			return
		}
		progress.VenueID = id
		venue := Venue{ID: id, Tenant: tenant, Name: in.Name, Slug: in.Slug, Status: venuePending}
		switch err := s.venues.createPending(ctx, venue, progress.encode()); {
		case errors.Is(err, errSlugTaken):
			writeProblem(w, http.StatusConflict, "Slug taken", fmt.Sprintf("another venue already uses the slug %q", in.Slug))
			return
		case err != nil:
			s.stepFailed(w, r, "saving the venue", err)
			return
		}
		s.chaos("venue_created")
		fallthrough

	case "venue_created":
		params := &stripe.AccountParams{
			Type:     stripe.String(string(stripe.AccountTypeExpress)),
			Metadata: map[string]string{"venue_id": progress.VenueID, "venue_slug": in.Slug},
		}
		params.Context = ctx
		key, err := idempotency.StripeKey(ctx, "accounts.create")
		if err != nil {
			s.internalError(w, r, "deriving the Stripe idempotency key", err)
			return
		}
		params.SetIdempotencyKey(key)
		account, err := s.stripe.Accounts.New(params)
		if err != nil {
			// 502: retryable; the retry resumes after the venue.
			s.logger.WarnContext(ctx, "creating the Stripe account failed", "error", err)
			writeProblem(w, http.StatusBadGateway, "Stripe unavailable", "creating the payment account failed; retry with the same Idempotency-Key")
			return
		}
		s.mu.Lock()
		s.stripeAccounts[account.ID] = true
		s.mu.Unlock()
		if s.failAfterStripe != nil && s.failAfterStripe() {
			s.logger.WarnContext(ctx, "chaos: failing after the Stripe call", "stripe_account_id", account.ID)
			writeProblem(w, http.StatusInternalServerError, "Injected failure", "CHAOS_FAIL_AFTER_STRIPE: the account was not saved with the venue; retry with the same Idempotency-Key")
			return
		}
		progress.AccountID = account.ID
		if err := s.venues.attachAccount(ctx, tenant, progress.VenueID, account.ID, progress.encode()); err != nil {
			s.stepFailed(w, r, "saving the venue's account", err)
			return
		}
		s.chaos("account_created")
		fallthrough

	case "account_created":
		venue, err := s.venues.activate(ctx, tenant, progress.VenueID)
		if err != nil {
			s.stepFailed(w, r, "activating the venue", err)
			return
		}
		s.venuesCreated.Add(1)
		w.Header().Set("Location", "/venues/"+venue.ID)
		writeJSON(w, http.StatusCreated, venue)

	default:
		s.internalError(w, r, "resuming", fmt.Errorf("unknown recovery point %q", claim.RecoveryPoint))
	}
}

// venueProgress is the data of createVenue's recovery points.
type venueProgress struct {
	VenueID   string `json:"venue_id"`
	AccountID string `json:"account_id,omitempty"`
}

func (p venueProgress) encode() []byte {
	b, _ := json.Marshal(p) // two strings cannot fail to encode
	return b
}

// chaos crashes the request after point when the test switch
// CHAOS_CRASH_AFTER names it: the handler panics with
// http.ErrAbortHandler, so the client's connection is cut without an
// answer, as when a process dies.
func (s *service) chaos(point string) {
	if s.crashAfter != nil && s.crashAfter(point) {
		s.logger.Warn("chaos: crashing the request", "after", point)
		panic(http.ErrAbortHandler)
	}
}

// stepFailed answers a failed step of a venue creation: the library's own
// status for its errors (503 for a lost claim or a failing store), else
// 500. Both are retryable, so the middleware frees the key, and the retry
// resumes after the last step that recorded its recovery point.
func (s *service) stepFailed(w http.ResponseWriter, r *http.Request, what string, err error) {
	if status := idempotency.StatusCode(err); status != http.StatusInternalServerError {
		s.logger.WarnContext(r.Context(), what, "error", err)
		idempotency.WriteError(w, r, err)
		return
	}
	s.internalError(w, r, what, err)
}

// internalError answers 500 and logs why.
func (s *service) internalError(w http.ResponseWriter, r *http.Request, what string, err error) {
	s.logger.ErrorContext(r.Context(), what, "error", err)
	writeProblem(w, http.StatusInternalServerError, "Internal error", "")
}

// listVenues answers GET /venues: the tenant's venues, oldest first; with
// ?slug=, only the venue with that slug.
func (s *service) listVenues(w http.ResponseWriter, r *http.Request) {
	out, err := s.venues.list(r.Context(), tenantFrom(r.Context()), r.URL.Query().Get("slug"))
	if err != nil {
		s.internalError(w, r, "listing the venues", err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// getVenue answers GET /venues/{id}, the Location of a created venue.
func (s *service) getVenue(w http.ResponseWriter, r *http.Request) {
	v, found, err := s.venues.get(r.Context(), tenantFrom(r.Context()), r.PathValue("id"))
	switch {
	case err != nil:
		s.internalError(w, r, "reading the venue", err)
	case !found:
		writeProblem(w, http.StatusNotFound, "No such venue", "")
	default:
		writeJSON(w, http.StatusOK, v)
	}
}

// handleEvent is the webhook function: the library has verified the
// signature and guarantees it runs once per event ID.
// handleWebhook processes one event from either endpoint, Stripe's or the
// partner's, exactly once.
func (s *service) handleWebhook(ctx context.Context, ev idempotency.WebhookEvent) error {
	if ev.Stripe != nil {
		return s.handleEvent(ctx, *ev.Stripe)
	}
	// The partner's events only need acknowledging here: a real service
	// would record the ticket sale.
	s.logger.InfoContext(ctx, "partner event", "provider", ev.Provider, "event", ev.ID, "type", ev.Type)
	s.partnerEventsProcessed.Add(1)
	return nil
}

func (s *service) handleEvent(ctx context.Context, event stripe.Event) error {
	if s.failWebhook != nil && s.failWebhook() {
		s.webhookFailures.Add(1)
		return fmt.Errorf("CHAOS_FAIL_WEBHOOK: event %s", event.ID)
	}
	if err := s.applyEvent(ctx, event); err != nil {
		s.webhookFailures.Add(1)
		return err
	}
	s.webhooksProcessed.Add(1)
	return nil
}

func (s *service) applyEvent(ctx context.Context, event stripe.Event) error {
	if event.Type != stripe.EventTypeAccountUpdated {
		return nil // acknowledged: not an event this service acts on
	}
	var account stripe.Account
	if err := json.Unmarshal(event.Data.Raw, &account); err != nil {
		return fmt.Errorf("account.updated %s: %w", event.ID, err)
	}
	found, err := s.venues.setChargesEnabled(ctx, account.ID, account.ChargesEnabled)
	if err != nil {
		return fmt.Errorf("account.updated %s: %w", event.ID, err)
	}
	if !found {
		s.logger.InfoContext(ctx, "account.updated for an account no venue uses", "event", event.ID, "stripe_account_id", account.ID)
	}
	return nil
}

func (s *service) stats(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	accounts := len(s.stripeAccounts)
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]int64{
		"venues_created":           s.venuesCreated.Load(),
		"stripe_accounts_created":  int64(accounts),
		"webhook_events_processed": s.webhooksProcessed.Load(),
		"partner_events_processed": s.partnerEventsProcessed.Load(),
		"webhook_events_duplicate": s.webhookDuplicates.Load(),
		"webhook_attempts_failed":  s.webhookFailures.Load(),
	})
}

// auditReplay is the middleware's observer: an audit log of replays and of
// requests turned away. It logs a hash of the key, never the key: a
// reader of the log could fetch the stored response with it.
func (s *service) auditReplay(ctx context.Context, e idempotency.Report) {
	switch e.Outcome {
	case idempotency.OutcomeReplayed, idempotency.OutcomeInFlight, idempotency.OutcomeMismatch:
		sum := sha256.Sum256([]byte(e.Key))
		s.logger.InfoContext(ctx, "idempotency", "outcome", e.Outcome, "tenant", e.Scope,
			"key_hash", hex.EncodeToString(sum[:8]), "method", e.Method, "path", e.Path, "status", e.Status)
	}
}

// countDuplicates counts the deliveries the inbox answers as duplicates.
func (s *service) countDuplicates(inbox http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inbox.ServeHTTP(w, r)
		if w.Header().Get("X-Idempotent-Replayed") == "true" {
			s.webhookDuplicates.Add(1)
		}
	})
}

func (s *service) countWebhook(ctx context.Context, e idempotency.Report) {
	if e.Outcome == idempotency.OutcomeReplayed {
		s.webhookDuplicates.Add(1)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "encoding the response failed", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}

func writeProblem(w http.ResponseWriter, status int, title, detail string) {
	p := map[string]any{"type": "about:blank", "title": title, "status": status}
	if detail != "" {
		p["detail"] = detail
	}
	body, _ := json.Marshal(p)
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}
