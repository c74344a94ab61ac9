package storetest

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

// RunMiddleware runs what a client of the middleware relies on against the
// stores newStore returns, one per subtest: a first request and its
// replay, a reused key with another request (422), a duplicate while the
// first runs (409), a 5xx and a panic that free the key, and scopes that
// keep tenants apart. Run it beside [Run]: it checks through HTTP what Run
// checks call by call.
func RunMiddleware(t *testing.T, newStore func(t *testing.T) idempotency.Store) {
	tests := []struct {
		name string
		run  func(t *testing.T, store idempotency.Store)
	}{
		{"FirstThenReplay", testFirstThenReplay},
		{"ReusedKeyIs422", testReusedKey},
		{"DuplicateWhileRunningIs409", testDuplicateWhileRunning},
		{"ServerErrorFreesKey", testServerErrorFreesKey},
		{"PanicFreesKey", testPanicFreesKey},
		{"ScopesKeepTenantsApart", testScopes},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.run(t, newStore(t)) })
	}
}

// venues answers like a create endpoint: 201, a Location header and a
// body that names its execution.
type venues struct{ calls atomic.Int32 }

func (v *venues) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := v.calls.Add(1)
	body, _ := io.ReadAll(r.Body)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Location", fmt.Sprintf("/venues/%d", n))
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, `{"execution":%d,"request":%s}`, n, body)
}

func middleware(t *testing.T, store idempotency.Store, opts idempotency.Options, h http.Handler) http.Handler {
	t.Helper()
	mw, err := idempotency.New(store, opts)
	require.NoError(t, err)
	return mw.Handler(h)
}

func send(h http.Handler, key, body string, header ...string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("Idempotency-Key", key)
	for i := 0; i+1 < len(header); i += 2 {
		r.Header.Set(header[i], header[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func testFirstThenReplay(t *testing.T, store idempotency.Store) {
	v := &venues{}
	h := middleware(t, store, idempotency.Options{}, v)
	k := key(t)
	first := send(h, k, `{"name":"Hall"}`)
	require.Equal(t, http.StatusCreated, first.Code, first.Body.String())
	assert.Empty(t, first.Header().Get("X-Idempotent-Replayed"))
	replay := send(h, k, `{"name":"Hall"}`)
	assert.Equal(t, http.StatusCreated, replay.Code)
	assert.Equal(t, "true", replay.Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, first.Header().Get("Location"), replay.Header().Get("Location"))
	assert.Equal(t, first.Body.String(), replay.Body.String())
	assert.Equal(t, int32(1), v.calls.Load())
}

func testReusedKey(t *testing.T, store idempotency.Store) {
	v := &venues{}
	h := middleware(t, store, idempotency.Options{}, v)
	k := key(t)
	require.Equal(t, http.StatusCreated, send(h, k, `{"name":"Hall"}`).Code)
	w := send(h, k, `{"name":"Other"}`)
	assert.Equal(t, http.StatusUnprocessableEntity, w.Code)
	assert.Equal(t, "application/problem+json", w.Header().Get("Content-Type"))
	assert.Equal(t, int32(1), v.calls.Load())
}

func testDuplicateWhileRunning(t *testing.T, store idempotency.Store) {
	entered, finish := make(chan struct{}), make(chan struct{})
	v := &venues{}
	h := middleware(t, store, idempotency.Options{}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if v.calls.Load() == 0 {
			close(entered)
			<-finish
		}
		v.ServeHTTP(w, r)
	}))
	k := key(t)
	done := make(chan *httptest.ResponseRecorder)
	go func() { done <- send(h, k, `{}`) }()
	<-entered
	dup := send(h, k, `{}`)
	assert.Equal(t, http.StatusConflict, dup.Code)
	assert.NotEmpty(t, dup.Header().Get("Retry-After"))
	close(finish)
	assert.Equal(t, http.StatusCreated, (<-done).Code)
	assert.Equal(t, "true", send(h, k, `{}`).Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, int32(1), v.calls.Load())
}

func testServerErrorFreesKey(t *testing.T, store idempotency.Store) {
	var calls atomic.Int32
	h := middleware(t, store, idempotency.Options{}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			http.Error(w, "database unavailable", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusCreated)
	}))
	k := key(t)
	assert.Equal(t, http.StatusServiceUnavailable, send(h, k, `{}`).Code)
	assert.Equal(t, http.StatusCreated, send(h, k, `{}`).Code, "the retry ran the handler again")
	assert.Equal(t, "true", send(h, k, `{}`).Header().Get("X-Idempotent-Replayed"))
	assert.Equal(t, int32(2), calls.Load())
}

func testPanicFreesKey(t *testing.T, store idempotency.Store) {
	var calls atomic.Int32
	h := middleware(t, store, idempotency.Options{}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			panic("boom")
		}
		w.WriteHeader(http.StatusCreated)
	}))
	k := key(t)
	assert.Panics(t, func() { send(h, k, `{}`) }, "the panic goes on")
	assert.Equal(t, http.StatusCreated, send(h, k, `{}`).Code, "the key was freed")
	assert.Equal(t, int32(2), calls.Load())
}

func testScopes(t *testing.T, store idempotency.Store) {
	v := &venues{}
	h := middleware(t, store, idempotency.Options{Scope: func(r *http.Request) string { return r.Header.Get("X-Tenant") }}, v)
	k := key(t)
	a := send(h, k, `{}`, "X-Tenant", "a")
	b := send(h, k, `{}`, "X-Tenant", "b")
	assert.Equal(t, http.StatusCreated, a.Code)
	assert.Equal(t, http.StatusCreated, b.Code)
	assert.Empty(t, b.Header().Get("X-Idempotent-Replayed"), "another tenant's key is another record")
	assert.NotEqual(t, a.Body.String(), b.Body.String())
	assert.Equal(t, "true", send(h, k, `{}`, "X-Tenant", "a").Header().Get("X-Idempotent-Replayed"))
}
