package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/client"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemotel"
)

// Venue is what the service stores and returns.
type Venue struct {
	ID              string `json:"id"`
	Tenant          string `json:"tenant"`
	Name            string `json:"name"`
	Slug            string `json:"slug"`
	StripeAccountID string `json:"stripe_account_id"`
	ChargesEnabled  bool   `json:"charges_enabled"`
}

// service holds the venues and the counters behind GET /stats. Venues live
// in memory: the example is about idempotency, not persistence.
type service struct {
	stripe  *client.API
	apiKeys apiKeys
	logger  *slog.Logger
	// failAfterStripe, when set, is asked after each Stripe call whether
	// to fail there (the test switch CHAOS_FAIL_AFTER_STRIPE).
	failAfterStripe func() bool

	mu             sync.Mutex
	venues         []*Venue
	bySlug         map[tenantSlug]*Venue
	stripeAccounts map[string]bool // distinct accounts Stripe returned

	venuesCreated     atomic.Int64
	webhooksProcessed atomic.Int64
	webhookDuplicates atomic.Int64
}

// tenantSlug is a slug within a tenant: each tenant has its own slugs.
type tenantSlug struct{ tenant, slug string }

func newService(stripeClient *client.API, keys apiKeys, logger *slog.Logger) *service {
	return &service{
		stripe:         stripeClient,
		apiKeys:        keys,
		logger:         logger,
		bySlug:         make(map[tenantSlug]*Venue),
		stripeAccounts: make(map[string]bool),
	}
}

// routes wires the handlers, the idempotency middleware and the webhook
// helper onto one mux, with the library's metrics behind GET /metrics.
func (s *service) routes(store idempotency.Store, webhookSecret string, metrics *idemotel.Metrics, metricsHandler http.Handler) (http.Handler, error) {
	// Time every store call. (A wrapped MemoryStore gets the store timeout
	// like any other store: a timer per call, a few hundred nanoseconds.)
	store = metrics.Store(store)
	mw, err := idempotency.New(store,
		// Records belong to the authenticated tenant (s.authenticate runs
		// first), never to a header the client chooses.
		idempotency.WithScope(func(r *http.Request) string { return tenantFrom(r.Context()) }),
		idempotency.WithFingerprint(idempotency.Fingerprinter{CanonicalJSON: true}.Fingerprint),
		idempotency.WithLogger(s.logger),
		// A duplicate that sends "Prefer: wait=N" waits up to N seconds
		// (10 at most) for the first request's outcome instead of a 409.
		idempotency.WithWait(10*time.Second, 1000),
		// One observer: the audit log and the metrics.
		idempotency.WithObserver(func(ctx context.Context, r idempotency.Report) {
			metrics.ObserveRequest(ctx, r)
			s.auditReplay(ctx, r)
		}),
	)
	if err != nil {
		return nil, err
	}
	webhooks, err := idempotency.NewWebhookHandler(store, []string{webhookSecret}, s.handleEvent,
		idempotency.WithLogger(s.logger),
		idempotency.WithObserver(func(ctx context.Context, r idempotency.Report) {
			metrics.ObserveWebhook(ctx, r)
			s.countWebhook(ctx, r)
		}),
	)
	if err != nil {
		return nil, err
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
	mux.Handle("POST /webhooks/stripe", webhooks)
	// Operational endpoints, unauthenticated: keep them off the public
	// network (or put them on another listener).
	mux.HandleFunc("GET /stats", s.stats)
	mux.Handle("GET /metrics", metricsHandler)
	return mux, nil
}

// createVenue creates the venue's Stripe Connect account, then the venue.
// The Stripe call carries a key derived from this request's Idempotency-Key,
// so when a failure after the call makes the client retry, Stripe returns
// the account it created the first time instead of creating another.
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
	tenant := tenantFrom(r.Context())
	if s.slugTaken(tenant, in.Slug) {
		writeProblem(w, http.StatusConflict, "Slug taken", fmt.Sprintf("another venue already uses the slug %q", in.Slug))
		return
	}

	params := &stripe.AccountParams{
		Type:     stripe.String(string(stripe.AccountTypeExpress)),
		Metadata: map[string]string{"venue_slug": in.Slug},
	}
	params.Context = r.Context()
	key, err := idempotency.StripeKey(r.Context(), "accounts.create")
	if err != nil {
		s.logger.ErrorContext(r.Context(), "deriving the Stripe idempotency key", "error", err)
		writeProblem(w, http.StatusInternalServerError, "Internal error", "")
		return
	}
	params.SetIdempotencyKey(key)
	account, err := s.stripe.Accounts.New(params)
	if err != nil {
		// 502: retryable, so the middleware frees the key for the retry.
		s.logger.WarnContext(r.Context(), "creating the Stripe account failed", "error", err)
		writeProblem(w, http.StatusBadGateway, "Stripe unavailable", "creating the payment account failed; retry with the same Idempotency-Key")
		return
	}
	s.mu.Lock()
	s.stripeAccounts[account.ID] = true
	s.mu.Unlock()

	if s.failAfterStripe != nil && s.failAfterStripe() {
		s.logger.WarnContext(r.Context(), "chaos: failing after the Stripe call", "stripe_account_id", account.ID)
		writeProblem(w, http.StatusInternalServerError, "Injected failure", "CHAOS_FAIL_AFTER_STRIPE: the venue was not saved; retry with the same Idempotency-Key")
		return
	}

	venue, err := s.saveVenue(tenant, in.Name, in.Slug, account.ID)
	if err != nil {
		writeProblem(w, http.StatusConflict, "Slug taken", err.Error())
		return
	}
	w.Header().Set("Location", "/venues/"+venue.ID)
	writeJSON(w, http.StatusCreated, venue)
}

func (s *service) slugTaken(tenant, slug string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bySlug[tenantSlug{tenant, slug}] != nil
}

func (s *service) saveVenue(tenant, name, slug, accountID string) (Venue, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bySlug[tenantSlug{tenant, slug}] != nil {
		return Venue{}, fmt.Errorf("another venue already uses the slug %q", slug)
	}
	v := &Venue{ID: "ven_" + strings.ToLower(rand.Text()[:16]), Tenant: tenant, Name: name, Slug: slug, StripeAccountID: accountID}
	s.venues = append(s.venues, v)
	s.bySlug[tenantSlug{tenant, slug}] = v
	s.venuesCreated.Add(1)
	return *v, nil
}

// listVenues answers GET /venues: the tenant's venues, oldest first; with
// ?slug=, only the venue with that slug.
func (s *service) listVenues(w http.ResponseWriter, r *http.Request) {
	tenant, slug := tenantFrom(r.Context()), r.URL.Query().Get("slug")
	s.mu.Lock()
	out := make([]Venue, 0, len(s.venues))
	for _, v := range s.venues {
		if v.Tenant == tenant && (slug == "" || v.Slug == slug) {
			out = append(out, *v)
		}
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

// getVenue answers GET /venues/{id}, the Location of a created venue.
func (s *service) getVenue(w http.ResponseWriter, r *http.Request) {
	tenant, id := tenantFrom(r.Context()), r.PathValue("id")
	s.mu.Lock()
	var found *Venue
	for _, v := range s.venues {
		if v.Tenant == tenant && v.ID == id {
			c := *v
			found = &c
		}
	}
	s.mu.Unlock()
	if found == nil {
		writeProblem(w, http.StatusNotFound, "No such venue", "")
		return
	}
	writeJSON(w, http.StatusOK, found)
}

// handleEvent is the webhook function: the library has verified the
// signature and guarantees it runs once per event ID.
func (s *service) handleEvent(ctx context.Context, event stripe.Event) error {
	s.webhooksProcessed.Add(1)
	if event.Type != stripe.EventTypeAccountUpdated {
		return nil // acknowledged: not an event this service acts on
	}
	var account stripe.Account
	if err := json.Unmarshal(event.Data.Raw, &account); err != nil {
		return fmt.Errorf("account.updated %s: %w", event.ID, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range s.venues {
		if v.StripeAccountID == account.ID {
			v.ChargesEnabled = account.ChargesEnabled
			return nil
		}
	}
	s.logger.InfoContext(ctx, "account.updated for an account no venue uses", "event", event.ID, "stripe_account_id", account.ID)
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
		"webhook_events_duplicate": s.webhookDuplicates.Load(),
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
