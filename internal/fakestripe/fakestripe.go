// Package fakestripe is an in-process fake of the few Stripe API endpoints
// this module's tests and example service call, with Stripe's idempotency
// behaviour:
//
//   - a POST with an Idempotency-Key that was seen before, with the same
//     method, path and parameters, gets the first response again, with
//     Idempotent-Replayed: true, and creates nothing;
//   - the same key with other parameters (or another endpoint) gets 400
//     with an error of type "idempotency_error";
//   - the same key while the first request still runs gets 409 with code
//     "idempotency_key_in_use";
//   - a POST without a key creates a new object every time.
//
// Keys are scoped by API key and Stripe-Account header, like Stripe's, and
// kept for the fake's lifetime (Stripe prunes them after 24 hours). Only
// successful results are kept: a request that fails validation can be
// retried with the same key, as on Stripe. GET requests ignore the key.
//
// Endpoints: POST /v1/accounts, GET /v1/accounts/{id}, POST /v1/transfers,
// GET /v1/transfers/{id}. Parameters arrive form-encoded, as stripe-go
// sends them; unknown parameters are accepted and ignored. Every request
// needs an "Authorization: Bearer <key>" header; any key is accepted.
//
//	fake, srv := fakestripe.NewServer(fakestripe.WithLatency(20 * time.Millisecond))
//	defer srv.Close()
//	sc := fakestripe.NewClient(srv.URL, fakestripe.TestAPIKey)
//	acct, err := sc.Accounts.New(&stripe.AccountParams{Type: stripe.String("express")})
package fakestripe

import (
	"crypto/rand"
	"encoding/json"
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
)

// TestAPIKey is an API key for the fake; it accepts any non-empty key.
const TestAPIKey = "sk_test_fakestripe"

// maxKeyLength is Stripe's limit on Idempotency-Key.
const maxKeyLength = 255

// Account is a Connect account as the fake stores and returns it.
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
// returns it.
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

// Option configures a [Fake].
type Option func(*Fake)

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
	keys      map[string]*keyEntry
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
	f := &Fake{keys: make(map[string]*keyEntry)}
	for _, opt := range opts {
		opt(f)
	}
	f.mux = http.NewServeMux()
	f.mux.HandleFunc("POST /v1/accounts", func(w http.ResponseWriter, r *http.Request) { f.post(w, r, f.createAccount) })
	f.mux.HandleFunc("GET /v1/accounts/{id}", f.getAccount)
	f.mux.HandleFunc("POST /v1/transfers", func(w http.ResponseWriter, r *http.Request) { f.post(w, r, f.createTransfer) })
	f.mux.HandleFunc("GET /v1/transfers/{id}", f.getTransfer)
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
	f.mux.ServeHTTP(w, r)
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
type createFunc func(params url.Values) (obj any, status int, apiErr *apiError)

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
	obj, status, apiErr := create(r.PostForm)
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

func (f *Fake) createAccount(p url.Values) (any, int, *apiError) {
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

func (f *Fake) createTransfer(p url.Values) (any, int, *apiError) {
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
