// Package stripefake is an in-process fake of the Stripe API endpoints a
// Connect platform's idempotency tests need, for use in your own tests:
// point a stripe-go client at it ([NewClient]), run the code under test,
// then ask the fake what happened ([Fake.AccountsCreated], [Fake.Replays],
// [Fake.Events]). It is not a Stripe emulator: it keeps everything in
// memory, accepts any API key and implements only what is listed here.
//
// # Endpoints
//
//   - POST /v1/accounts, GET /v1/accounts/{id}: Connect accounts
//     ([Account]);
//   - POST /v1/transfers, GET /v1/transfers/{id}: transfers to a
//     connected account ([Transfer]); the destination must exist;
//   - GET /v1/events, GET /v1/events/{id}: the events the fake emitted
//     ([Event]), newest first, with the type, limit and starting_after
//     parameters, as stripe-go's iterator uses them, and the
//     delivery_success and created[gt|gte|lt|lte] filters (see
//     [Fake.SetDelivered]).
//
// Parameters arrive form-encoded, as stripe-go sends them; unknown
// parameters are accepted and ignored. Every request needs an
// "Authorization: Bearer <key>" header; any non-empty key is accepted.
// Errors have Stripe's shape ({"error":{"type":...,"code":...}}), so
// stripe-go returns them as *stripe.Error.
//
// # Idempotency
//
// POST requests follow Stripe's idempotency rules:
//
//   - a POST with an Idempotency-Key that was seen before, with the same
//     method, path and parameters, gets the first response again, with
//     Idempotent-Replayed: true, and creates nothing;
//   - the same key with other parameters (or another endpoint) gets 400
//     with an error of type "idempotency_error";
//   - the same key while the first request still runs gets 409 with code
//     "idempotency_key_in_use";
//   - a POST without a key creates a new object every time (stripe-go
//     adds a random key to every POST that has none, so each of its calls
//     without a key creates one).
//
// Keys are scoped by API key and Stripe-Account header, like Stripe's, and
// kept for the fake's lifetime (Stripe prunes them after 24 hours). Only
// results of requests that ran are kept: a request that fails validation
// can be retried with the same key, as on Stripe. GET requests ignore the
// key.
//
// # Events
//
// Creating a transfer emits transfer.created; [Fake.UpdateAccount] changes
// an account and emits account.updated, as Stripe does when a connected
// account finishes onboarding. Send [Event.Payload], signed with [Sign],
// to your webhook endpoint to test it.
//
// # Latency and failures
//
// [WithLatency] makes every request slow, which gives tests time to send
// concurrent duplicates. [Fake.Fail] (or [WithFailure]) makes the next
// matching requests fail: before the request runs (nothing created, the
// key stays free), or after it ran ([Failure.AfterCreate]: the object
// exists and the key's result is stored, but the client gets an error or
// a dropped connection), the case idempotency keys exist for.
//
//	fake, srv := stripefake.NewServer(stripefake.WithLatency(20 * time.Millisecond))
//	defer srv.Close()
//	sc := stripefake.NewClient(srv.URL, stripefake.TestAPIKey)
//	acct, err := sc.Accounts.New(&stripe.AccountParams{Type: stripe.String("express")})
package stripefake

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/client"
	"github.com/stripe/stripe-go/v76/webhook"
)

// TestAPIKey is an API key for the fake. The fake accepts any non-empty
// key; this one only looks like a test key.
const TestAPIKey = "sk_test_stripefake"

// maxKeyLength is Stripe's limit on Idempotency-Key.
const maxKeyLength = 255

// Account is a Connect account as the fake stores and returns it. Its
// fields are Stripe's account fields of the same JSON names; the fake
// sets them from the creation parameters (type defaults to "standard")
// and changes them only through [Fake.UpdateAccount].
type Account struct {
	ID               string            `json:"id"`
	Object           string            `json:"object"`
	Type             string            `json:"type,omitempty"`
	Country          string            `json:"country,omitempty"`
	Email            string            `json:"email,omitempty"`
	BusinessType     string            `json:"business_type,omitempty"`
	Created          int64             `json:"created"`
	Metadata         map[string]string `json:"metadata"`
	ChargesEnabled   bool              `json:"charges_enabled"`
	PayoutsEnabled   bool              `json:"payouts_enabled"`
	DetailsSubmitted bool              `json:"details_submitted"`
}

// Transfer is a transfer to a connected account as the fake stores and
// returns it. Its fields are Stripe's transfer fields of the same JSON
// names, set from the creation parameters (currency in lower case).
type Transfer struct {
	ID            string            `json:"id"`
	Object        string            `json:"object"`
	Amount        int64             `json:"amount"`
	Currency      string            `json:"currency"`
	Destination   string            `json:"destination"`
	Description   string            `json:"description,omitempty"`
	TransferGroup string            `json:"transfer_group,omitempty"`
	Created       int64             `json:"created"`
	Metadata      map[string]string `json:"metadata"`
}

// Event is an event as the fake emits it, in Stripe's JSON shape: what
// GET /v1/events returns and what Stripe would deliver to a webhook
// endpoint.
type Event struct {
	ID         string `json:"id"`
	Object     string `json:"object"` // "event"
	APIVersion string `json:"api_version"`
	Created    int64  `json:"created"`
	Type       string `json:"type"` // "account.updated", "transfer.created"
	Livemode   bool   `json:"livemode"`
	// Account is the connected account the event is about, for
	// account.updated (Stripe sets it on Connect events).
	Account string       `json:"account,omitempty"`
	Data    EventData    `json:"data"`
	Request EventRequest `json:"request"`
}

// EventData holds the object an [Event] is about.
type EventData struct {
	// Object is the JSON of the account or transfer, as it was when the
	// event was emitted.
	Object json.RawMessage `json:"object"`
}

// EventRequest names the API request that caused an [Event]; both are
// empty for events not caused by a request (account.updated from
// [Fake.UpdateAccount]).
type EventRequest struct {
	ID             string `json:"id,omitempty"`
	IdempotencyKey string `json:"idempotency_key,omitempty"`
}

// Payload returns the event's JSON, as Stripe delivers it to a webhook
// endpoint. Sign it with [Sign].
func (e Event) Payload() []byte {
	body, _ := json.Marshal(e) // strings, ints and raw JSON always encode
	return body
}

// Sign returns the Stripe-Signature header value for payload, signed with
// the webhook signing secret at the current time, as Stripe signs its
// deliveries (stripe-go's webhook.GenerateTestSignedPayload).
func Sign(payload []byte, secret string) string {
	return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{
		Payload: payload, Secret: secret, Timestamp: time.Now(),
	}).Header
}

// Failure is a fault the fake injects into the requests it matches; see
// [Fake.Fail]. Its zero value makes the next request, whatever it is,
// answer 500 without running.
type Failure struct {
	// Method and Path select the requests that fail, e.g. "POST" and
	// "/v1/accounts"; empty matches any.
	Method, Path string
	// Times is how many matching requests fail; 0 means 1.
	Times int
	// Status is the status of the failure's answer, with a Stripe error
	// body: type "api_error" for 5xx, "rate_limit_error" for 429,
	// "invalid_request_error" otherwise. 0 means 500.
	Status int
	// Drop closes the connection without an answer instead: the client
	// sees a network error. Status is then ignored.
	Drop bool
	// AfterCreate lets the request run first: the object is created (and
	// its event emitted), and an Idempotency-Key's result is stored, then
	// the client gets the failure instead of the result. This is a
	// response lost on its way back: a retry with the same key gets the
	// stored result, with Idempotent-Replayed: true. Without AfterCreate
	// the request fails before it runs: nothing is created and the key
	// stays free.
	AfterCreate bool
}

// Option configures a [Fake].
type Option func(*Fake)

// WithFailure injects fl from the start, as [Fake.Fail] would.
func WithFailure(fl Failure) Option {
	return func(f *Fake) { f.Fail(fl) }
}

// WithLatency makes every request take at least d before it answers, as a
// real API does; the object is created at the end of that time, and also
// when the client gave up before. Default: 0, no delay.
func WithLatency(d time.Duration) Option {
	return func(f *Fake) { f.latency = d }
}

// Fake serves the fake API. It is an [http.Handler], safe for concurrent
// use; create it with [New] or [NewServer].
type Fake struct {
	latency time.Duration
	mux     *http.ServeMux

	mu        sync.Mutex
	accounts  []*Account
	transfers []*Transfer
	events    []*Event
	delivered map[string]bool // event id: its webhook delivery succeeded
	keys      map[string]*keyEntry
	failures  []*Failure
	requests  int
	replays   int
}

// keyEntry is what the fake remembers of one idempotency key.
type keyEntry struct {
	method, path, params string
	done                 bool
	status               int
	body                 []byte
}

// New returns an empty Fake.
func New(opts ...Option) *Fake {
	f := &Fake{keys: make(map[string]*keyEntry), delivered: make(map[string]bool)}
	for _, opt := range opts {
		opt(f)
	}
	f.mux = http.NewServeMux()
	f.mux.HandleFunc("POST /v1/accounts", func(w http.ResponseWriter, r *http.Request) { f.post(w, r, f.createAccount) })
	f.mux.HandleFunc("GET /v1/accounts/{id}", f.getAccount)
	f.mux.HandleFunc("POST /v1/transfers", func(w http.ResponseWriter, r *http.Request) { f.post(w, r, f.createTransfer) })
	f.mux.HandleFunc("GET /v1/transfers/{id}", f.getTransfer)
	f.mux.HandleFunc("GET /v1/events", f.listEvents)
	f.mux.HandleFunc("GET /v1/events/{id}", f.getEvent)
	f.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, apiError{Type: "invalid_request_error",
			Message: fmt.Sprintf("Unrecognized request URL (%s: %s).", r.Method, r.URL.Path)})
	})
	return f
}

// NewServer starts a new Fake on a loopback [httptest.Server]; close the
// server when done.
func NewServer(opts ...Option) (*Fake, *httptest.Server) {
	f := New(opts...)
	return f, httptest.NewServer(f)
}

// NewClient returns a stripe-go client whose API, Connect and Uploads
// backends all talk to baseURL (a fake's server URL) with apiKey. It makes
// no network retries, so every call is one request, and logs nothing.
func NewClient(baseURL, apiKey string) *client.API {
	httpClient := &http.Client{Timeout: 30 * time.Second}
	backend := func(t stripe.SupportedBackend) stripe.Backend {
		return stripe.GetBackendWithConfig(t, &stripe.BackendConfig{
			URL:               stripe.String(baseURL),
			HTTPClient:        httpClient,
			LeveledLogger:     &stripe.LeveledLogger{Level: stripe.LevelNull},
			MaxNetworkRetries: stripe.Int64(0),
		})
	}
	sc := &client.API{}
	sc.Init(apiKey, &stripe.Backends{
		API:     backend(stripe.APIBackend),
		Connect: backend(stripe.ConnectBackend),
		Uploads: backend(stripe.UploadsBackend),
	})
	return sc
}

// ServeHTTP implements [http.Handler].
func (f *Fake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.requests++
	f.mu.Unlock()
	w.Header().Set("Request-Id", "req_"+rand.Text()[:14])
	w.Header().Set("Stripe-Version", stripe.APIVersion)
	if apiKey(r) == "" {
		writeError(w, http.StatusUnauthorized, apiError{Type: "invalid_request_error",
			Message: "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."})
		return
	}
	fl := f.takeFailure(r)
	switch {
	case fl == nil:
		f.mux.ServeHTTP(w, r)
		return
	case fl.AfterCreate:
		// Run the request, then lose its answer.
		f.mux.ServeHTTP(httptest.NewRecorder(), r)
	}
	if fl.Drop {
		panic(http.ErrAbortHandler) // net/http closes the connection and logs nothing
	}
	status := fl.Status
	if status == 0 {
		status = http.StatusInternalServerError
	}
	typ := "invalid_request_error"
	switch {
	case status >= 500:
		typ = "api_error"
	case status == http.StatusTooManyRequests:
		typ = "rate_limit_error"
	}
	writeError(w, status, apiError{Type: typ, Message: fmt.Sprintf("Injected failure (stripefake): %d %s.", status, http.StatusText(status))})
}

// Fail makes the next fl.Times requests that match fl fail as fl says.
// Failures added earlier match first; each is used up by the requests it
// matched.
func (f *Fake) Fail(fl Failure) {
	if fl.Times <= 0 {
		fl.Times = 1
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failures = append(f.failures, &fl)
}

// takeFailure returns the first failure that matches r and uses it once.
func (f *Fake) takeFailure(r *http.Request) *Failure {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, fl := range f.failures {
		if (fl.Method == "" || fl.Method == r.Method) && (fl.Path == "" || fl.Path == r.URL.Path) {
			fl.Times--
			if fl.Times == 0 {
				f.failures = append(f.failures[:i:i], f.failures[i+1:]...)
			}
			c := *fl
			return &c
		}
	}
	return nil
}

// AccountsCreated returns how many accounts the fake has created.
func (f *Fake) AccountsCreated() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.accounts)
}

// Accounts returns copies of the accounts created, oldest first.
func (f *Fake) Accounts() []Account {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]Account, len(f.accounts))
	for i, a := range f.accounts {
		out[i] = *a
		out[i].Metadata = maps.Clone(a.Metadata)
	}
	return out
}

// TransfersCreated returns how many transfers the fake has created.
func (f *Fake) TransfersCreated() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.transfers)
}

// Transfers returns copies of the transfers created, oldest first.
func (f *Fake) Transfers() []Transfer {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]Transfer, len(f.transfers))
	for i, t := range f.transfers {
		out[i] = *t
		out[i].Metadata = maps.Clone(t.Metadata)
	}
	return out
}

// Events returns copies of the events emitted, oldest first.
func (f *Fake) Events() []Event {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]Event, len(f.events))
	for i, e := range f.events {
		out[i] = *e
	}
	return out
}

// ErrNoSuchAccount is returned by [Fake.UpdateAccount] for an account the
// fake did not create.
var ErrNoSuchAccount = errors.New("stripefake: no such account")

// UpdateAccount changes the account with the given ID with update, as
// Stripe does while a connected account onboards (for example setting
// ChargesEnabled), and emits an account.updated event, which it returns.
// update must not change the ID.
func (f *Fake) UpdateAccount(id string, update func(*Account)) (Event, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a := f.account(id)
	if a == nil {
		return Event{}, fmt.Errorf("%w: %q", ErrNoSuchAccount, id)
	}
	update(a)
	a.ID = id
	return *f.emit("account.updated", a, id, ""), nil
}

// SetDelivered records whether the webhook delivery of the event with the
// given ID succeeded, for the events list's delivery_success filter: with
// delivery_success=true it lists the events marked delivered; with
// delivery_success=false the others (as on Stripe, where an event whose
// delivery is still pending or failed counts as not delivered). Events
// start not delivered. It returns false when the fake has no such event.
func (f *Fake) SetDelivered(eventID string, delivered bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, e := range f.events {
		if e.ID == eventID {
			f.delivered[eventID] = delivered
			return true
		}
	}
	return false
}

// emit records an event about obj; f.mu must be held.
func (f *Fake) emit(typ string, obj any, account, idempotencyKey string) *Event {
	data, _ := json.Marshal(obj)
	e := &Event{
		ID:         "evt_" + rand.Text()[:16],
		Object:     "event",
		APIVersion: stripe.APIVersion,
		Created:    time.Now().Unix(),
		Type:       typ,
		Account:    account,
		Data:       EventData{Object: data},
	}
	if idempotencyKey != "" {
		e.Request = EventRequest{ID: "req_" + rand.Text()[:14], IdempotencyKey: idempotencyKey}
	}
	f.events = append(f.events, e)
	return e
}

// Replays returns how many responses were replayed for a known
// idempotency key.
func (f *Fake) Replays() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.replays
}

// Requests returns how many requests the fake has received.
func (f *Fake) Requests() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requests
}

// apiError is the "error" object of Stripe's error responses.
type apiError struct {
	Type    string `json:"type"`
	Code    string `json:"code,omitempty"`
	Message string `json:"message"`
	Param   string `json:"param,omitempty"`
}

// createFunc creates an object from a request's parameters while f.mu is
// held. It returns the object, or an error with its status.
type createFunc func(params url.Values, idempotencyKey string) (obj any, status int, apiErr *apiError)

// post runs create under Stripe's idempotency rules.
func (f *Fake) post(w http.ResponseWriter, r *http.Request, create createFunc) {
	if err := r.ParseForm(); err != nil {
		writeError(w, http.StatusBadRequest, apiError{Type: "invalid_request_error", Message: "Invalid request body."})
		return
	}
	params := r.PostForm.Encode() // sorted by name: the order of parameters does not matter
	key := strings.TrimSpace(r.Header.Get("Idempotency-Key"))
	if len(key) > maxKeyLength {
		writeError(w, http.StatusBadRequest, apiError{Type: "invalid_request_error",
			Message: fmt.Sprintf("Invalid idempotency key: it must be at most %d characters long.", maxKeyLength)})
		return
	}

	var entry *keyEntry
	var scoped string
	if key != "" {
		scoped = apiKey(r) + "\x00" + r.Header.Get("Stripe-Account") + "\x00" + key
		f.mu.Lock()
		prev, ok := f.keys[scoped]
		switch {
		case ok && (prev.method != r.Method || prev.path != r.URL.Path || prev.params != params):
			f.mu.Unlock()
			writeError(w, http.StatusBadRequest, apiError{Type: "idempotency_error",
				Message: fmt.Sprintf("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '%s' if you meant to execute a different request.", key)})
			return
		case ok && !prev.done:
			f.mu.Unlock()
			writeError(w, http.StatusConflict, apiError{Type: "invalid_request_error", Code: "idempotency_key_in_use",
				Message: "There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): " + key + ". Please try again later."})
			return
		case ok:
			f.replays++
			status, body := prev.status, prev.body
			f.mu.Unlock()
			w.Header().Set("Idempotency-Key", key)
			w.Header().Set("Idempotent-Replayed", "true")
			writeBody(w, status, body)
			return
		}
		entry = &keyEntry{method: r.Method, path: r.URL.Path, params: params}
		f.keys[scoped] = entry
		f.mu.Unlock()
	}

	f.pause(r)

	f.mu.Lock()
	obj, status, apiErr := create(r.PostForm, key)
	var body []byte
	if apiErr != nil {
		body = errorBody(*apiErr)
	} else {
		body, _ = json.Marshal(obj) // plain structs of strings, ints and maps always encode
	}
	if entry != nil {
		if apiErr != nil {
			// Stripe keeps no result for a request that failed validation.
			delete(f.keys, scoped)
		} else {
			entry.done, entry.status, entry.body = true, status, body
		}
	}
	f.mu.Unlock()

	if key != "" {
		w.Header().Set("Idempotency-Key", key)
	}
	writeBody(w, status, body)
}

func (f *Fake) createAccount(p url.Values, _ string) (any, int, *apiError) {
	a := &Account{
		ID:           "acct_" + rand.Text()[:16],
		Object:       "account",
		Type:         p.Get("type"),
		Country:      p.Get("country"),
		Email:        p.Get("email"),
		BusinessType: p.Get("business_type"),
		Created:      time.Now().Unix(),
		Metadata:     metadata(p),
	}
	if a.Type == "" {
		a.Type = "standard"
	}
	f.accounts = append(f.accounts, a)
	return a, http.StatusOK, nil
}

func (f *Fake) createTransfer(p url.Values, key string) (any, int, *apiError) {
	amount, err := strconv.ParseInt(p.Get("amount"), 10, 64)
	switch {
	case p.Get("amount") == "":
		return nil, http.StatusBadRequest, missingParam("amount")
	case err != nil || amount <= 0:
		return nil, http.StatusBadRequest, &apiError{Type: "invalid_request_error", Param: "amount", Message: "Invalid positive integer"}
	case p.Get("currency") == "":
		return nil, http.StatusBadRequest, missingParam("currency")
	case p.Get("destination") == "":
		return nil, http.StatusBadRequest, missingParam("destination")
	case f.account(p.Get("destination")) == nil:
		return nil, http.StatusBadRequest, &apiError{Type: "invalid_request_error", Code: "resource_missing", Param: "destination",
			Message: fmt.Sprintf("No such destination: '%s'", p.Get("destination"))}
	}
	t := &Transfer{
		ID:            "tr_" + rand.Text()[:16],
		Object:        "transfer",
		Amount:        amount,
		Currency:      strings.ToLower(p.Get("currency")),
		Destination:   p.Get("destination"),
		Description:   p.Get("description"),
		TransferGroup: p.Get("transfer_group"),
		Created:       time.Now().Unix(),
		Metadata:      metadata(p),
	}
	f.transfers = append(f.transfers, t)
	f.emit("transfer.created", t, "", key)
	return t, http.StatusOK, nil
}

func (f *Fake) getAccount(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	f.mu.Lock()
	var body []byte
	if a := f.account(id); a != nil {
		body, _ = json.Marshal(a)
	}
	f.mu.Unlock()
	if body == nil {
		writeError(w, http.StatusNotFound, apiError{Type: "invalid_request_error", Code: "resource_missing", Param: "account",
			Message: fmt.Sprintf("No such account: '%s'", id)})
		return
	}
	writeBody(w, http.StatusOK, body)
}

func (f *Fake) getTransfer(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	f.mu.Lock()
	var body []byte
	for _, t := range f.transfers {
		if t.ID == id {
			body, _ = json.Marshal(t)
		}
	}
	f.mu.Unlock()
	if body == nil {
		writeError(w, http.StatusNotFound, apiError{Type: "invalid_request_error", Code: "resource_missing", Param: "id",
			Message: fmt.Sprintf("No such transfer: '%s'", id)})
		return
	}
	writeBody(w, http.StatusOK, body)
}

// listEvents answers GET /v1/events: newest first, optionally of one type,
// of one delivery outcome and in a created range, at most limit (default
// 10, at most 100), after the event starting_after.
func (f *Fake) listEvents(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := 10
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 100 {
			writeError(w, http.StatusBadRequest, apiError{Type: "invalid_request_error", Param: "limit",
				Message: "Invalid limit: must be an integer between 1 and 100."})
			return
		}
		limit = n
	}
	typ, after := q.Get("type"), q.Get("starting_after")
	var delivery *bool
	switch v := q.Get("delivery_success"); v {
	case "":
	case "true", "false":
		b := v == "true"
		delivery = &b
	default:
		writeError(w, http.StatusBadRequest, apiError{Type: "invalid_request_error", Param: "delivery_success",
			Message: "Invalid boolean: " + v})
		return
	}
	var bounds [4]*int64 // gt, gte, lt, lte
	for i, op := range []string{"gt", "gte", "lt", "lte"} {
		v := q.Get("created[" + op + "]")
		if v == "" {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			writeError(w, http.StatusBadRequest, apiError{Type: "invalid_request_error", Param: "created[" + op + "]",
				Message: "Invalid integer: " + v})
			return
		}
		bounds[i] = &n
	}
	inRange := func(c int64) bool {
		return (bounds[0] == nil || c > *bounds[0]) && (bounds[1] == nil || c >= *bounds[1]) &&
			(bounds[2] == nil || c < *bounds[2]) && (bounds[3] == nil || c <= *bounds[3])
	}
	f.mu.Lock()
	data := []json.RawMessage{}
	hasMore, started := false, after == ""
	for i := len(f.events) - 1; i >= 0; i-- {
		e := f.events[i]
		if !started {
			started = e.ID == after
			continue
		}
		if (typ != "" && e.Type != typ) || !inRange(e.Created) || (delivery != nil && f.delivered[e.ID] != *delivery) {
			continue
		}
		if len(data) == limit {
			hasMore = true
			break
		}
		data = append(data, e.Payload())
	}
	f.mu.Unlock()
	body, _ := json.Marshal(map[string]any{"object": "list", "url": "/v1/events", "has_more": hasMore, "data": data})
	writeBody(w, http.StatusOK, body)
}

func (f *Fake) getEvent(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	f.mu.Lock()
	var body []byte
	for _, e := range f.events {
		if e.ID == id {
			body = e.Payload()
		}
	}
	f.mu.Unlock()
	if body == nil {
		writeError(w, http.StatusNotFound, apiError{Type: "invalid_request_error", Code: "resource_missing", Param: "id",
			Message: fmt.Sprintf("No such event: '%s'", id)})
		return
	}
	writeBody(w, http.StatusOK, body)
}

// account finds an account by id; f.mu must be held.
func (f *Fake) account(id string) *Account {
	for _, a := range f.accounts {
		if a.ID == id {
			return a
		}
	}
	return nil
}

// pause waits for the configured latency, or until the client gives up.
func (f *Fake) pause(r *http.Request) {
	if f.latency <= 0 {
		return
	}
	t := time.NewTimer(f.latency)
	defer t.Stop()
	select {
	case <-t.C:
	case <-r.Context().Done():
	}
}

func apiKey(r *http.Request) string {
	key, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return ""
	}
	return strings.TrimSpace(key)
}

// metadata collects the metadata[name]=value parameters.
func metadata(p url.Values) map[string]string {
	m := map[string]string{}
	for name, values := range p {
		if k, ok := strings.CutPrefix(name, "metadata["); ok && strings.HasSuffix(k, "]") && len(values) > 0 {
			m[strings.TrimSuffix(k, "]")] = values[len(values)-1]
		}
	}
	return m
}

func missingParam(name string) *apiError {
	return &apiError{Type: "invalid_request_error", Code: "parameter_missing", Param: name,
		Message: "Missing required param: " + name + "."}
}

func errorBody(e apiError) []byte {
	body, _ := json.Marshal(struct {
		Error apiError `json:"error"`
	}{e})
	return body
}

func writeError(w http.ResponseWriter, status int, e apiError) {
	writeBody(w, status, errorBody(e))
}

func writeBody(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write(body)
}
