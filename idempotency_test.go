package idempotency_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// counted is a handler that counts its executions.
type counted struct {
	calls atomic.Int32
	serve func(w http.ResponseWriter, r *http.Request)
}

func (c *counted) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.calls.Add(1)
	c.serve(w, r)
}

// createVenue answers like a typical create endpoint: 201, a Location
// header and a JSON body that differs per execution.
func createVenue() *counted {
	c := &counted{}
	c.serve = func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Location", "/venues/1")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"execution":%d,"request":%s}`, c.calls.Load(), body)
	}
	return c
}

// observed collects the events the middleware reports.
type observed struct {
	mu     sync.Mutex
	events []idempotency.Report
}

func (o *observed) observe(_ context.Context, e idempotency.Report) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.events = append(o.events, e)
}

func (o *observed) outcomes() []idempotency.Outcome {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]idempotency.Outcome, len(o.events))
	for i, e := range o.events {
		out[i] = e.Outcome
	}
	return out
}

func (o *observed) last() idempotency.Report {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.events[len(o.events)-1]
}

func newMiddleware(t testing.TB, store idempotency.Store, opts ...idempotency.Options) *idempotency.Middleware {
	t.Helper()
	m, err := idempotency.New(store, merged(opts...))
	require.NoError(t, err)
	return m
}

func post(key, body string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	if key != "" {
		r.Header.Set("Idempotency-Key", key)
	}
	return r
}

func serve(h http.Handler, r *http.Request) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

type problemBody struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail"`
}

// requireProblem checks an RFC 9457 error answer and returns its body.
func requireProblem(t *testing.T, w *httptest.ResponseRecorder, status int) problemBody {
	t.Helper()
	require.Equal(t, status, w.Code, "body: %s", w.Body)
	assert.Equal(t, "application/problem+json", w.Header().Get("Content-Type"))
	var p problemBody
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &p), "body: %s", w.Body)
	assert.Equal(t, status, p.Status)
	assert.NotEmpty(t, p.Title)
	assert.True(t, strings.HasPrefix(p.Type, "https://"), "type %q is a URI", p.Type)
	assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"))
	return p
}

func TestMiddleware(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind.name, func(t *testing.T) {
			testMiddleware(t, func(t *testing.T) idempotency.Store {
				store, _ := kind.new(t)
				return store
			})
		})
	}
}

func testMiddleware(t *testing.T, newStore func(t *testing.T) idempotency.Store) {
	t.Run("OtherMethodsPassThrough", func(t *testing.T) {
		store := newStore(t)
		handler := createVenue()
		h := newMiddleware(t, store).Handler(handler)
		for _, method := range []string{http.MethodGet, http.MethodHead, http.MethodPut, http.MethodDelete, http.MethodOptions} {
			r := httptest.NewRequest(method, "/venues", nil)
			r.Header.Set("Idempotency-Key", "k") // ignored: not a protected method
			w := serve(h, r)
			assert.Equal(t, http.StatusCreated, w.Code, method)
			assert.Empty(t, w.Header().Get("X-Idempotent-Replayed"), method)
		}
		assert.Equal(t, int32(5), handler.calls.Load(), "every call ran the handler")
	})

	t.Run("FirstRequestRunsAndRetryReplays", func(t *testing.T) {
		handler := createVenue()
		h := newMiddleware(t, newStore(t)).Handler(handler)

		first := serve(h, post("key-1", `{"name":"Hall"}`))
		require.Equal(t, http.StatusCreated, first.Code)
		assert.Empty(t, first.Header().Get("X-Idempotent-Replayed"), "the original is not marked")
		assert.Equal(t, `{"execution":1,"request":{"name":"Hall"}}`, first.Body.String())

		for range 3 {
			retry := serve(h, post("key-1", `{"name":"Hall"}`))
			require.Equal(t, http.StatusCreated, retry.Code)
			assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
			assert.Equal(t, "application/json", retry.Header().Get("Content-Type"))
			assert.Equal(t, "/venues/1", retry.Header().Get("Location"))
			assert.Equal(t, first.Body.String(), retry.Body.String())
		}
		assert.Equal(t, int32(1), handler.calls.Load())
	})

	t.Run("QuotedAndBareKeysAreOneKey", func(t *testing.T) {
		handler := createVenue()
		h := newMiddleware(t, newStore(t)).Handler(handler)
		require.Equal(t, http.StatusCreated, serve(h, post(`"8e03978e-40d5-43e8-bc93-6894a57f9324"`, `{}`)).Code)
		retry := serve(h, post(`8e03978e-40d5-43e8-bc93-6894a57f9324`, `{}`))
		assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, int32(1), handler.calls.Load())
	})

	t.Run("MissingKey", func(t *testing.T) {
		handler := createVenue()
		h := newMiddleware(t, newStore(t)).Handler(handler)
		p := requireProblem(t, serve(h, post("", `{}`)), http.StatusBadRequest)
		assert.Contains(t, p.Type, "ErrKeyMissing")
		assert.Equal(t, int32(0), handler.calls.Load())
	})

	t.Run("OptionalKey", func(t *testing.T) {
		handler := createVenue()
		h := newMiddleware(t, newStore(t), idempotency.Options{KeyOptional: true}).Handler(handler)
		assert.Equal(t, http.StatusCreated, serve(h, post("", `{}`)).Code)
		assert.Equal(t, http.StatusCreated, serve(h, post("", `{}`)).Code)
		assert.Equal(t, int32(2), handler.calls.Load(), "without a key nothing is deduplicated")
	})

	t.Run("MalformedKeys", func(t *testing.T) {
		store := newStore(t)
		handler := createVenue()
		h := newMiddleware(t, store).Handler(handler)
		cases := map[string][]string{
			"empty":           {""},
			"empty quoted":    {`""`},
			"too long":        {strings.Repeat("k", 256)},
			"too long quoted": {`"` + strings.Repeat("k", 256) + `"`},
			"control":         {"abc\x01"},
			"non-ASCII":       {"clé"},
			"several headers": {"a", "b"},
			"list":            {"a, b"},
			"unterminated":    {`"abc`},
			"after quote":     {`"abc"def`},
			"bad escape":      {`"a\b"`},
			"inner space":     {"a b"},
		}
		for name, values := range cases {
			t.Run(name, func(t *testing.T) {
				r := post("", `{}`)
				r.Header["Idempotency-Key"] = values
				p := requireProblem(t, serve(h, r), http.StatusBadRequest)
				assert.Contains(t, p.Type, "ErrKeyInvalid")
				assert.NotEmpty(t, p.Detail, "the client is told what is wrong")
			})
		}
		assert.Equal(t, int32(0), handler.calls.Load())

		// The longest valid key works, and nothing was stored for the bad ones.
		longest := strings.Repeat("k", 255)
		assert.Equal(t, http.StatusCreated, serve(h, post(longest, `{}`)).Code)
		assert.Equal(t, int32(1), handler.calls.Load())
	})

	t.Run("BodyTooLarge", func(t *testing.T) {
		handler := createVenue()
		h := newMiddleware(t, newStore(t), idempotency.Options{MaxBodyBytes: 16}).Handler(handler)
		big := `{"name":"a very long venue name"}`
		p := requireProblem(t, serve(h, post("k", big)), http.StatusRequestEntityTooLarge)
		assert.Contains(t, p.Type, "ErrBodyTooLarge")

		// Also when the length is not announced up front.
		r := post("k", "")
		r.Body = io.NopCloser(strings.NewReader(big))
		r.ContentLength = -1
		requireProblem(t, serve(h, r), http.StatusRequestEntityTooLarge)
		assert.Equal(t, int32(0), handler.calls.Load())

		// Nothing was stored: the key is free for a valid request.
		assert.Equal(t, http.StatusCreated, serve(h, post("k", `{"a":1}`)).Code)
		assert.Equal(t, int32(1), handler.calls.Load())
	})

	t.Run("DifferentPayloadIs422", func(t *testing.T) {
		handler := createVenue()
		obs := &observed{}
		h := newMiddleware(t, newStore(t), idempotency.Options{Observer: obs.observe}).Handler(handler)
		require.Equal(t, http.StatusCreated, serve(h, post("k", `{"name":"Hall"}`)).Code)

		p := requireProblem(t, serve(h, post("k", `{"name":"Other"}`)), http.StatusUnprocessableEntity)
		assert.Contains(t, p.Type, "ErrFingerprintMismatch")
		other := httptest.NewRequest(http.MethodPost, "/other-path", strings.NewReader(`{"name":"Hall"}`))
		other.Header.Set("Idempotency-Key", "k")
		requireProblem(t, serve(h, other), http.StatusUnprocessableEntity)
		assert.Equal(t, int32(1), handler.calls.Load())
		assert.Equal(t, idempotency.OutcomeMismatch, obs.last().Outcome)

		// The original is still replayed.
		assert.Equal(t, "true", serve(h, post("k", `{"name":"Hall"}`)).Header().Get("X-Idempotent-Replayed"))
	})

	t.Run("InFlightIs409AndMismatchWins", func(t *testing.T) {
		entered, release := make(chan struct{}), make(chan struct{})
		handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			close(entered)
			<-release
			w.WriteHeader(http.StatusCreated)
		}}
		h := newMiddleware(t, newStore(t)).Handler(handler)
		done := make(chan *httptest.ResponseRecorder, 1)
		go func() { done <- serve(h, post("k", `{"n":1}`)) }()
		waitFor(t, entered, eventBound, "the handler did not start")

		w := serve(h, post("k", `{"n":1}`))
		p := requireProblem(t, w, http.StatusConflict)
		assert.Contains(t, p.Type, "ErrKeyInUse")
		// The rest of the 30 s default lease, rounded up (issue 15).
		assert.Equal(t, "30", w.Header().Get("Retry-After"))

		// A different payload is told so at once, even while the first runs.
		requireProblem(t, serve(h, post("k", `{"n":2}`)), http.StatusUnprocessableEntity)

		close(release)
		assert.Equal(t, http.StatusCreated, waitFor(t, done, eventBound, "the first request did not end").Code)
		assert.Equal(t, "true", serve(h, post("k", `{"n":1}`)).Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, int32(1), handler.calls.Load())
	})

	t.Run("RetryableFailuresReleaseTheKey", func(t *testing.T) {
		for _, status := range []int{500, 502, 503, 429, 408} {
			t.Run(fmt.Sprint(status), func(t *testing.T) {
				fail := true
				handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
					if fail {
						http.Error(w, "boom", status)
						return
					}
					w.WriteHeader(http.StatusCreated)
				}}
				obs := &observed{}
				h := newMiddleware(t, newStore(t), idempotency.Options{Observer: obs.observe}).Handler(handler)
				assert.Equal(t, status, serve(h, post("k", `{}`)).Code)
				assert.Equal(t, idempotency.OutcomeReleased, obs.last().Outcome)
				fail = false
				retry := serve(h, post("k", `{}`))
				assert.Equal(t, http.StatusCreated, retry.Code)
				assert.Empty(t, retry.Header().Get("X-Idempotent-Replayed"))
				assert.Equal(t, int32(2), handler.calls.Load(), "the retry ran the handler again")
			})
		}
	})

	t.Run("ClientErrorsAreStored", func(t *testing.T) {
		handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "slug taken", http.StatusConflict)
		}}
		h := newMiddleware(t, newStore(t)).Handler(handler)
		assert.Equal(t, http.StatusConflict, serve(h, post("k", `{}`)).Code)
		retry := serve(h, post("k", `{}`))
		assert.Equal(t, http.StatusConflict, retry.Code)
		assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, "slug taken\n", retry.Body.String())
		assert.Equal(t, int32(1), handler.calls.Load())
	})

	t.Run("ServerErrorsStoredWhenAsked", func(t *testing.T) {
		handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "boom", http.StatusInternalServerError)
		}}
		never := func(int) bool { return false }
		h := newMiddleware(t, newStore(t), idempotency.Options{Retryable: never}).Handler(handler)
		serve(h, post("k", `{}`))
		retry := serve(h, post("k", `{}`))
		assert.Equal(t, http.StatusInternalServerError, retry.Code)
		assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, int32(1), handler.calls.Load())
	})

	t.Run("PanicReleasesAndRepanics", func(t *testing.T) {
		shouldPanic := true
		handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			if shouldPanic {
				panic("handler bug")
			}
			w.WriteHeader(http.StatusCreated)
		}}
		obs := &observed{}
		h := newMiddleware(t, newStore(t), idempotency.Options{Observer: obs.observe}).Handler(handler)
		assert.PanicsWithValue(t, "handler bug", func() { serve(h, post("k", `{}`)) })
		assert.Equal(t, idempotency.OutcomeReleased, obs.last().Outcome)
		shouldPanic = false
		assert.Equal(t, http.StatusCreated, serve(h, post("k", `{}`)).Code)
		assert.Equal(t, int32(2), handler.calls.Load())
	})

	// With WithCancelOnDisconnect, a handler that returns without
	// answering after its client hung up was cut short: the key is freed.
	t.Run("CancelledBeforeWritingReleases", func(t *testing.T) {
		entered := make(chan struct{})
		handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("X-Attempt") == "1" {
				close(entered)
				<-r.Context().Done()
				return
			}
			w.WriteHeader(http.StatusCreated)
		}}
		h := newMiddleware(t, newStore(t), idempotency.Options{CancelOnDisconnect: true}).Handler(handler)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		r := post("k", `{}`).WithContext(ctx)
		r.Header.Set("X-Attempt", "1")
		// The client hangs up once the handler runs, not after a timer:
		// on a busy machine a timer could fire before the claim, whose
		// store call it would cut short instead.
		go func() {
			select {
			case <-entered:
				cancel()
			case <-ctx.Done(): // serve returned without running the handler
			}
		}()
		serve(h, r)
		require.Equal(t, int32(1), handler.calls.Load(), "the first attempt ran its handler")

		retry := serve(h, post("k", `{}`))
		assert.Equal(t, http.StatusCreated, retry.Code)
		assert.Empty(t, retry.Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, int32(2), handler.calls.Load())
	})

	t.Run("ScopesAreSeparate", func(t *testing.T) {
		handler := createVenue()
		tenant := func(r *http.Request) string { return r.Header.Get("X-Tenant-ID") }
		h := newMiddleware(t, newStore(t), idempotency.Options{Scope: tenant}).Handler(handler)
		req := func(tenant string) *http.Request {
			r := post("shared-key", `{}`)
			r.Header.Set("X-Tenant-ID", tenant)
			return r
		}
		a := serve(h, req("acme"))
		b := serve(h, req("globex"))
		assert.Empty(t, b.Header().Get("X-Idempotent-Replayed"), "another tenant's response is never replayed")
		assert.NotEqual(t, a.Body.String(), b.Body.String())
		assert.Equal(t, int32(2), handler.calls.Load())
		assert.Equal(t, a.Body.String(), serve(h, req("acme")).Body.String())
		assert.Equal(t, int32(2), handler.calls.Load())
	})

	t.Run("ClaimInContext", func(t *testing.T) {
		var got idempotency.Claim
		handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			got, _ = idempotency.ClaimFromContext(r.Context())
		}}
		tenant := func(r *http.Request) string { return "acme" }
		h := newMiddleware(t, newStore(t), idempotency.Options{Scope: tenant}).Handler(handler)
		serve(h, post(`"the-key"`, `{}`))
		assert.Equal(t, "http", got.Kind)
		assert.Equal(t, "acme", got.Scope)
		assert.Equal(t, "the-key", got.Key)
		assert.Len(t, got.Fingerprint, 64)
	})

	t.Run("ReplayHeaderName", func(t *testing.T) {
		h := newMiddleware(t, newStore(t), idempotency.Options{ReplayHeader: "Idempotent-Replayed"}).Handler(createVenue())
		serve(h, post("k", `{}`))
		retry := serve(h, post("k", `{}`))
		assert.Equal(t, "true", retry.Header().Get("Idempotent-Replayed"))
		assert.Empty(t, retry.Header().Get("X-Idempotent-Replayed"))
	})

	t.Run("ImplicitOKIsStored", func(t *testing.T) {
		handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Done", "yes")
		}}
		h := newMiddleware(t, newStore(t)).Handler(handler)
		assert.Equal(t, http.StatusOK, serve(h, post("k", `{}`)).Code)
		retry := serve(h, post("k", `{}`))
		assert.Equal(t, http.StatusOK, retry.Code)
		assert.Equal(t, "yes", retry.Header().Get("X-Done"))
		assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, int32(1), handler.calls.Load())
	})

	t.Run("HeadersSnapshotAtWriteHeader", func(t *testing.T) {
		h := newMiddleware(t, newStore(t)).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Before", "1")
			w.WriteHeader(http.StatusAccepted)
			w.Header().Set("X-After", "1")   // too late: not sent, so not replayed
			w.WriteHeader(http.StatusTeapot) // superfluous: ignored
			io.WriteString(w, "body")
		}))
		serve(h, post("k", `{}`))
		retry := serve(h, post("k", `{}`))
		assert.Equal(t, http.StatusAccepted, retry.Code)
		assert.Equal(t, "1", retry.Header().Get("X-Before"))
		assert.Empty(t, retry.Header().Get("X-After"))
		assert.Equal(t, "body", retry.Body.String())
	})

	t.Run("IOCopyIsCaptured", func(t *testing.T) {
		payload := strings.Repeat("streamed ", 2000)
		h := newMiddleware(t, newStore(t)).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(w, strings.NewReader(payload))
			io.Copy(w, io.LimitReader(strings.NewReader(payload), 9)) // not a WriterTo
		}))
		assert.Equal(t, payload+"streamed ", serve(h, post("k", `{}`)).Body.String())
		assert.Equal(t, payload+"streamed ", serve(h, post("k", `{}`)).Body.String())
	})

	t.Run("ResponseOverTheCap", func(t *testing.T) {
		large := strings.Repeat("x", 100)
		handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			w.WriteHeader(http.StatusCreated)
			io.WriteString(w, large[:60])
			io.WriteString(w, large[60:])
		}}
		obs := &observed{}
		h := newMiddleware(t, newStore(t), idempotency.Options{MaxStoredBytes: 64, Observer: obs.observe}).Handler(handler)
		first := serve(h, post("k", `{}`))
		assert.Equal(t, large, first.Body.String(), "the first client gets the whole response")
		assert.Equal(t, idempotency.OutcomeExecuted, obs.last().Outcome)

		retry := serve(h, post("k", `{}`))
		assert.Equal(t, int32(1), handler.calls.Load(), "the retry does not run the handler again")
		assert.Equal(t, http.StatusCreated, retry.Code)
		assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
		assert.Equal(t, "text/plain", retry.Header().Get("Content-Type"))
		assert.Equal(t, "0", retry.Header().Get("Content-Length"))
		assert.Empty(t, retry.Body.String())
	})

	t.Run("CanonicalJSON", func(t *testing.T) {
		handler := createVenue()
		fp := idempotency.Fingerprinter{CanonicalJSON: true}
		h := newMiddleware(t, newStore(t), idempotency.Options{Fingerprint: fp.Fingerprint}).Handler(handler)
		require.Equal(t, http.StatusCreated, serve(h, post("k", `{"a":1,"b":[1,2]}`)).Code)
		retry := serve(h, post("k", " {\n \"b\": [1, 2],\n \"a\": 1\n}\n"))
		assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"), "key order and whitespace do not matter")
		requireProblem(t, serve(h, post("k", `{"a":2,"b":[1,2]}`)), http.StatusUnprocessableEntity)

		p := requireProblem(t, serve(h, post("other", `{"a":`)), http.StatusBadRequest)
		assert.Contains(t, p.Type, "ErrInvalidJSON")
		assert.Equal(t, int32(1), handler.calls.Load())
		assert.Equal(t, http.StatusCreated, serve(h, post("other", `{"a":2}`)).Code, "broken JSON stored nothing")
	})

	t.Run("FingerprintHeaders", func(t *testing.T) {
		handler := createVenue()
		fp := idempotency.Fingerprinter{Headers: []string{"stripe-account"}}
		h := newMiddleware(t, newStore(t), idempotency.Options{Fingerprint: fp.Fingerprint}).Handler(handler)
		req := func(account string) *http.Request {
			r := post("k", `{}`)
			r.Header.Set("Stripe-Account", account)
			return r
		}
		serve(h, req("acct_1"))
		assert.Equal(t, "true", serve(h, req("acct_1")).Header().Get("X-Idempotent-Replayed"))
		requireProblem(t, serve(h, req("acct_2")), http.StatusUnprocessableEntity)
	})
}

func TestStoreFailureFailsClosed(t *testing.T) {
	for _, tc := range []struct {
		name  string
		store func(t *testing.T) idempotency.Store
	}{
		{"closed port", func(t *testing.T) idempotency.Store {
			return newRedisStore(t, redistest.ClientFor(t, closedAddr(t)))
		}},
		{"redis error", func(t *testing.T) idempotency.Store {
			mr, client := redistest.Miniredis(t)
			mr.SetError("OOM command not allowed when used memory > 'maxmemory'.")
			return newRedisStore(t, client)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			handler := createVenue()
			obs := &observed{}
			h := newMiddleware(t, tc.store(t), idempotency.Options{Observer: obs.observe, StoreTimeout: time.Second}).Handler(handler)
			start := time.Now()
			w := serve(h, post("k", `{}`))
			p := requireProblem(t, w, http.StatusServiceUnavailable)
			assert.Less(t, time.Since(start), 2*time.Second)
			assert.Equal(t, "1", w.Header().Get("Retry-After"))
			assert.Contains(t, p.Type, "ErrStoreUnavailable")
			assert.Empty(t, p.Detail, "internal errors stay internal")
			assert.NotContains(t, w.Body.String(), "OOM")
			assert.Equal(t, int32(0), handler.calls.Load(), "no handler runs unprotected")
			assert.Equal(t, idempotency.OutcomeStoreError, obs.last().Outcome)
			assert.ErrorIs(t, obs.last().Err, idempotency.ErrStoreUnavailable)
		})
	}

	t.Run("fail open", func(t *testing.T) {
		mr, client := redistest.Miniredis(t)
		mr.SetError("ERR injected")
		handler := createVenue()
		obs := &observed{}
		h := newMiddleware(t, newRedisStore(t, client), idempotency.Options{FailOpen: true, Observer: obs.observe}).Handler(handler)
		w := serve(h, post("k", `{"name":"Hall"}`))
		assert.Equal(t, http.StatusCreated, w.Code)
		assert.Contains(t, w.Body.String(), `"request":{"name":"Hall"}`, "the handler sees the body")
		assert.Equal(t, int32(1), handler.calls.Load())
		ev := obs.last()
		assert.Equal(t, idempotency.OutcomeUnprotected, ev.Outcome)
		assert.Equal(t, http.StatusCreated, ev.Status)
		assert.ErrorContains(t, ev.Err, "injected")

		mr.SetError("")
		serve(h, post("k", `{"name":"Hall"}`))
		assert.Equal(t, int32(2), handler.calls.Load(), "nothing was stored while the store failed")
	})
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestClientDisconnectStillStores(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind.name, func(t *testing.T) {
			store, _ := kind.new(t)
			entered, gone := make(chan struct{}), make(chan struct{})
			handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
				close(entered)
				<-r.Context().Done() // the client hangs up while the work runs...
				close(gone)
				w.WriteHeader(http.StatusCreated) // ...and the work completes anyway
				io.WriteString(w, `{"id":"v_1"}`)
			}}
			// The observer is called once the outcome is stored.
			stored := make(chan idempotency.Report, 8)
			observe := func(_ context.Context, r idempotency.Report) { stored <- r }
			// WithCancelOnDisconnect: the handler learns of the hang-up.
			srv := httptest.NewServer(newMiddleware(t, store, idempotency.Options{CancelOnDisconnect: true, Observer: observe}).Handler(handler))
			defer srv.Close()

			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, strings.NewReader(`{}`))
			require.NoError(t, err)
			req.Header.Set("Idempotency-Key", "k")
			go func() { // the client hangs up once the handler runs
				select {
				case <-entered:
					cancel()
				case <-ctx.Done():
				}
			}()
			_, err = srv.Client().Do(req)
			require.ErrorIs(t, err, context.Canceled)
			waitFor(t, gone, eventBound, "the handler did not learn of the hang-up")
			first := waitFor(t, stored, eventBound, "the first request's outcome was not stored")
			assert.Equal(t, idempotency.OutcomeExecuted, first.Outcome, "err: %v", first.Err)

			req, err = http.NewRequest(http.MethodPost, srv.URL, strings.NewReader(`{}`))
			require.NoError(t, err)
			req.Header.Set("Idempotency-Key", "k")
			retry, err := srv.Client().Do(req)
			require.NoError(t, err)
			body, _ := io.ReadAll(retry.Body)
			retry.Body.Close()
			assert.Equal(t, http.StatusCreated, retry.StatusCode)
			assert.Equal(t, "true", retry.Header.Get("X-Idempotent-Replayed"))
			assert.Equal(t, `{"id":"v_1"}`, string(body))
			assert.Equal(t, int32(1), handler.calls.Load())
		})
	}
}

// TestLeaseExpiryStaleOwnerLoses: the first owner's lease lapses while its
// handler still runs (the clock jumps; no renewal fires in time); a retry
// takes the key and completes; the first owner's late response must not
// overwrite the retry's record, and its client must not get it as a
// success that the replay contradicts (issue 19: it got 200 "attempt 2"
// while the record said otherwise).
func TestLeaseExpiryStaleOwnerLoses(t *testing.T) {
	for _, kind := range storeKinds[:2] { // fake clocks only
		t.Run(kind.name, func(t *testing.T) {
			store, advance := kind.new(t)
			entered, finish := make(chan struct{}), make(chan struct{})
			var n atomic.Int32
			handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if n.Add(1) == 1 {
					close(entered)
					<-finish
				}
				fmt.Fprintf(w, "attempt %d", n.Load())
			})
			obs := &observed{}
			h := newMiddleware(t, store, idempotency.Options{Lease: time.Minute, Observer: obs.observe}).Handler(handler)

			firstDone := make(chan *httptest.ResponseRecorder, 1)
			go func() { firstDone <- serve(h, post("k", `{}`)) }()
			waitFor(t, entered, eventBound, "the handler did not start")
			advance(2 * time.Minute)

			second := serve(h, post("k", `{}`))
			assert.Equal(t, "attempt 2", second.Body.String(), "the lapsed key was taken over")
			close(finish)
			first := waitFor(t, firstDone, eventBound, "the first request did not end")
			p := requireProblem(t, first, http.StatusServiceUnavailable)
			assert.Contains(t, p.Type, "#ErrLeaseLost", "the stale owner's response was held, and not sent")
			assert.Equal(t, "1", first.Header().Get("Retry-After"))
			assert.Equal(t, idempotency.OutcomeLeaseLost, obs.last().Outcome)

			retry := serve(h, post("k", `{}`))
			assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
			assert.Equal(t, "attempt 2", retry.Body.String(), "the second owner's record stands")
		})
	}
}

// TestConcurrentDuplicates fires 50 requests with one key at once: the
// handler must run exactly once and every other answer be 409 or a replay.
func TestConcurrentDuplicates(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind.name, func(t *testing.T) {
			store, _ := kind.new(t)
			const n = 50
			// The handler runs until every request has read the key, so
			// that all of them overlap it however the machine schedules
			// them (a sleep here only made that likely).
			acquires := newAcquireLog()
			handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
				if !acquires.until(func() bool { return acquires.calls >= n }) {
					t.Errorf("%d of %d requests read the key within %v", acquires.count(), n, eventBound)
				}
				w.WriteHeader(http.StatusCreated)
				io.WriteString(w, "created")
			}}
			h := newMiddleware(t, acquires.wrap(store)).Handler(handler)
			var wg sync.WaitGroup
			var created, replayed, conflicts atomic.Int32
			start := make(chan struct{})
			for range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					w := serve(h, post("same-key", `{"name":"Hall"}`))
					switch {
					case w.Code == http.StatusConflict:
						conflicts.Add(1)
					case w.Code == http.StatusCreated && w.Header().Get("X-Idempotent-Replayed") == "true":
						assert.Equal(t, "created", w.Body.String())
						replayed.Add(1)
					case w.Code == http.StatusCreated:
						created.Add(1)
					default:
						t.Errorf("unexpected answer %d: %s", w.Code, w.Body)
					}
				}()
			}
			close(start)
			wg.Wait()
			assert.Equal(t, int32(1), handler.calls.Load(), "the handler ran exactly once")
			assert.Equal(t, int32(1), created.Load())
			assert.Equal(t, int32(n-1), replayed.Load()+conflicts.Load())
			t.Logf("%d conflicts, %d replays", conflicts.Load(), replayed.Load())
		})
	}
}

func TestNewRejectsInvalidOptions(t *testing.T) {
	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
	for name, opts := range map[string]idempotency.Options{
		"lower-case method":      {Methods: []string{"post"}},
		"empty method":           {Methods: []string{""}},
		"negative body limit":    {MaxBodyBytes: -1},
		"tiny lease":             {Lease: time.Microsecond},
		"tiny ttl":               {TTL: time.Millisecond},
		"lease over ttl":         {Lease: 48 * time.Hour},
		"negative store timeout": {StoreTimeout: -time.Second},
		"negative wait":          {Wait: -time.Second},
		"negative max waiters":   {MaxWaiters: -1},
	} {
		_, err := idempotency.New(store, opts)
		assert.Error(t, err, name)
	}
	var typedNil *idempotency.MemoryStore
	_, err := idempotency.New(typedNil, idempotency.Options{})
	assert.ErrorContains(t, err, "store is nil", "a typed nil store fails at construction, not at the first request")
	_, err = idempotency.New(nil, idempotency.Options{})
	assert.Error(t, err)
}

func TestCustomErrorHandler(t *testing.T) {
	var got error
	h := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
		got = err
		w.WriteHeader(idempotency.StatusCode(err))
	}}).Handler(createVenue())
	w := serve(h, post("", `{}`))
	assert.Equal(t, http.StatusBadRequest, w.Code)
	assert.ErrorIs(t, got, idempotency.ErrKeyMissing)
}

func TestResponseControllerThroughRecorder(t *testing.T) {
	var flushErr, hijackErr, deadlineErr error
	h := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{})).Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		io.WriteString(w, "part 1;")
		flushErr = rc.Flush()
		_, _, hijackErr = rc.Hijack()
		deadlineErr = rc.SetWriteDeadline(time.Now().Add(time.Minute))
		io.WriteString(w, "part 2")
	}))
	srv := httptest.NewServer(h)
	defer srv.Close()
	req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader(`{}`))
	req.Header.Set("Idempotency-Key", "k")
	resp, err := srv.Client().Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, "part 1;part 2", string(body))
	assert.NoError(t, flushErr, "Flush writes through")
	assert.ErrorIs(t, hijackErr, http.ErrNotSupported, "Hijack is refused: it cannot be recorded")
	assert.NoError(t, deadlineErr, "deadlines reach the connection through Unwrap")

	req, _ = http.NewRequest(http.MethodPost, srv.URL, strings.NewReader(`{}`))
	req.Header.Set("Idempotency-Key", "k")
	resp, err = srv.Client().Do(req)
	require.NoError(t, err)
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, "part 1;part 2", string(body), "a flushed response replays whole")
	assert.Equal(t, "true", resp.Header.Get("X-Idempotent-Replayed"))
}

func TestParseKey(t *testing.T) {
	for in, want := range map[string]string{
		`abc`:             "abc",
		`"abc"`:           "abc",
		` "abc" `:         "abc",
		`"a b,c"`:         "a b,c",
		`"a\"b\\c"`:       `a"b\c`,
		`8e03978e-40d5`:   "8e03978e-40d5",
		`key;with=params`: "key;with=params",
	} {
		got, err := idempotency.ParseKey(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"", `""`, `"`, `"abc`, `"ab"c`, `a,b`, `a"b`, "a\x7f", "ab\x00"} {
		_, err := idempotency.ParseKey(in)
		assert.ErrorIs(t, err, idempotency.ErrKeyInvalid, "%q", in)
	}
}

func TestWriteErrorHidesInternalErrors(t *testing.T) {
	w := httptest.NewRecorder()
	idempotency.WriteError(w, httptest.NewRequest(http.MethodPost, "/", nil), errors.New("dial tcp 10.0.0.7:6379: secret detail"))
	assert.Equal(t, http.StatusInternalServerError, w.Code)
	assert.NotContains(t, w.Body.String(), "secret")
	assert.True(t, bytes.HasPrefix(w.Body.Bytes(), []byte(`{"type":`)))
}

// TestLeaseRenewedWhileHandlerRuns: a handler that runs for several leases
// keeps its key; no duplicate gets in meanwhile.
func TestLeaseRenewedWhileHandlerRuns(t *testing.T) {
	stores := map[string]func(t *testing.T) idempotency.Store{
		"memory": func(*testing.T) idempotency.Store { return idempotency.NewMemoryStore(idempotency.MemoryOptions{}) }, // real clock
		"redis": func(t *testing.T) idempotency.Store { // miniredis expires keys only when told to
			return newRedisStore(t, redistest.Client(t))
		},
	}
	for name, newStore := range stores {
		t.Run(name, func(t *testing.T) {
			store := newStore(t)
			// Renewals run every lease/3; the margin absorbs a loaded
			// machine running the race detector.
			const lease = 600 * time.Millisecond
			entered, finish := make(chan struct{}), make(chan struct{})
			finished := sync.OnceFunc(func() { close(finish) })
			defer finished()
			var once sync.Once
			handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
				once.Do(func() { close(entered) })
				// Runs until the duplicates below are done, not for a
				// fixed time that a slow loop could outlast.
				<-finish
				assert.NoError(t, r.Context().Err(), "the handler's context stays live")
				w.WriteHeader(http.StatusCreated)
			}}
			h := newMiddleware(t, store, idempotency.Options{Lease: lease}).Handler(handler)
			done := make(chan int, 1)
			go func() { done <- serve(h, post("k", `{}`)).Code }()
			waitFor(t, entered, eventBound, "the handler did not start")
			// Duplicates for two leases: the key outlives its first
			// lease only if it was renewed.
			deadline := time.Now().Add(2 * lease)
			for time.Now().Before(deadline) {
				w := serve(h, post("k", `{}`))
				require.Equal(t, http.StatusConflict, w.Code, "the key stays claimed while the handler runs")
				time.Sleep(lease / 5) // the pace of the duplicates, not a synchronisation
			}
			finished()
			assert.Equal(t, http.StatusCreated, waitFor(t, done, eventBound, "the first request did not end"))
			assert.Equal(t, int32(1), handler.calls.Load())
		})
	}
}

// TestLeaseLostCancelsHandler: when renewal finds the key taken over, the
// handler's context is cancelled with ErrLeaseLost and nothing is stored
// over the new owner's record.
func TestLeaseLostCancelsHandler(t *testing.T) {
	clock := newFakeClock()
	store := idempotency.NewMemoryStoreWithClock(clock.Now)
	entered := make(chan struct{})
	var cause error
	var n atomic.Int32
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 1 {
			close(entered)
			<-r.Context().Done()
			cause = context.Cause(r.Context())
			return
		}
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "second owner")
	})
	obs := &observed{}
	h := newMiddleware(t, store, idempotency.Options{Lease: 60 * time.Millisecond, Observer: obs.observe}).Handler(handler)
	firstDone := make(chan *httptest.ResponseRecorder, 1)
	go func() { firstDone <- serve(h, post("k", `{}`)) }()
	waitFor(t, entered, eventBound, "the handler did not start")
	clock.Advance(time.Minute) // the first lease lapses...
	second := serve(h, post("k", `{}`))
	require.Equal(t, http.StatusCreated, second.Code) // ...and a retry takes the key

	first := waitFor(t, firstDone, eventBound, "the first request did not end")
	assert.ErrorIs(t, cause, idempotency.ErrLeaseLost, "the first handler learned why it was stopped")
	requireProblem(t, first, http.StatusServiceUnavailable)

	retry := serve(h, post("k", `{}`))
	assert.Equal(t, "second owner", retry.Body.String(), "the new owner's record stands")
	assert.Equal(t, "true", retry.Header().Get("X-Idempotent-Replayed"))
}

// TestShutdownCancelsHandlers: when the context given to WithShutdown
// ends, running handlers' contexts are cancelled with ErrShutdown; one
// that then answers nothing is cut short (503, key freed), and a handler
// that starts afterwards starts cancelled.
func TestShutdownCancelsHandlers(t *testing.T) {
	shutdown, stop := context.WithCancel(context.Background())
	entered := make(chan struct{})
	causes := make(chan error, 2)
	handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Wait") != "" {
			close(entered)
		}
		<-r.Context().Done()
		causes <- context.Cause(r.Context())
	}}
	obs := &observed{}
	h := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Shutdown: shutdown, Observer: obs.observe}).Handler(handler)

	done := make(chan *httptest.ResponseRecorder, 1)
	go func() {
		r := post("k", `{}`)
		r.Header.Set("X-Wait", "1")
		done <- serve(h, r)
	}()
	waitFor(t, entered, eventBound, "the handler did not start")
	stop()
	first := waitFor(t, done, eventBound, "the first request did not end")
	p := requireProblem(t, first, http.StatusServiceUnavailable)
	assert.Contains(t, p.Type, "ErrShutdown")
	assert.ErrorIs(t, waitFor(t, causes, eventBound, "the handler did not end"), idempotency.ErrShutdown)
	assert.Equal(t, idempotency.OutcomeReleased, obs.last().Outcome, "cut short: the key is freed")

	late := serve(h, post("k", `{}`))
	requireProblem(t, late, http.StatusServiceUnavailable)
	assert.ErrorIs(t, waitFor(t, causes, eventBound, "the late handler did not end"), idempotency.ErrShutdown, "a handler started after shutdown starts cancelled")
	assert.Equal(t, int32(2), handler.calls.Load(), "the freed key ran again")
}

// TestStoredHeadersOption: WithStoredHeaders chooses what is replayed;
// hop-by-hop headers are never stored.
func TestStoredHeadersOption(t *testing.T) {
	handler := &counted{serve: func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Set-Cookie", "cart=1")
		w.Header().Set("X-Debug", "internal")
		w.Header().Set("Connection", "close")
		w.WriteHeader(http.StatusCreated)
	}}
	keep := func(name string) bool { return name != "X-Debug" }
	h := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{StoredHeader: keep}).Handler(handler)
	serve(h, post("k", `{}`))
	replay := serve(h, post("k", `{}`))
	require.Equal(t, "true", replay.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, "cart=1", replay.Header().Get("Set-Cookie"), "kept when the filter says so")
	assert.Empty(t, replay.Header().Get("X-Debug"), "left out by the filter")
	assert.Empty(t, replay.Header().Get("Connection"), "hop-by-hop headers are never stored")
}

// TestLoggerNeverWritesTheKey: whoever reads the logs must not learn a key,
// which would let them fetch the stored response; the log names its hash.
func TestLoggerNeverWritesTheKey(t *testing.T) {
	var buf bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&buf, nil))
	down := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
	failing := &failingStore{Store: down}
	h := newMiddleware(t, failing, idempotency.Options{Logger: logger}).Handler(createVenue())
	requireProblem(t, serve(h, post("secret-key-123", `{}`)), http.StatusServiceUnavailable)
	require.NotEmpty(t, buf.String(), "the store failure was logged")
	assert.NotContains(t, buf.String(), "secret-key-123")
	sum := sha256.Sum256([]byte("secret-key-123"))
	assert.Contains(t, buf.String(), `"key_hash":"`+hex.EncodeToString(sum[:8])+`"`)
}

// TestReportRoute: the observer gets the ServeMux pattern, a label of low
// cardinality, beside the raw path.
func TestReportRoute(t *testing.T) {
	obs := &observed{}
	mux := http.NewServeMux()
	mux.Handle("POST /venues/{id}/payouts", newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Observer: obs.observe}).Handler(createVenue()))
	r := httptest.NewRequest(http.MethodPost, "/venues/42/payouts", strings.NewReader(`{}`))
	r.Header.Set("Idempotency-Key", "k")
	serve(mux, r)
	assert.Equal(t, "POST /venues/{id}/payouts", obs.last().Route)
	assert.Equal(t, "/venues/42/payouts", obs.last().Path)
}

// failingStore fails every claim, as a store that is down does.
type failingStore struct{ idempotency.Store }

func (s *failingStore) Acquire(context.Context, string, idempotency.Record, time.Duration) (uint64, *idempotency.Record, error) {
	return 0, nil, errors.New("connection refused")
}
