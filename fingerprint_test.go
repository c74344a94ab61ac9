package idempotency_test

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

// TestFingerprintIncludesContentType: the same bytes sent as text/plain
// and then as JSON under one key are two requests (422), where before
// issue 19 the second got the first's replay; spellings of one media type
// are one request; a fingerprint of one's own may leave it out.
func TestFingerprintIncludesContentType(t *testing.T) {
	send := func(h http.Handler, contentType string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(`{"name":"Hall"}`))
		r.Header.Set("Idempotency-Key", "k")
		if contentType != "" {
			r.Header.Set("Content-Type", contentType)
		}
		return serve(h, r)
	}
	h := newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{})).Handler(createVenue())
	require.Equal(t, http.StatusCreated, send(h, "text/plain").Code)
	requireProblem(t, send(h, "application/json"), http.StatusUnprocessableEntity)
	requireProblem(t, send(h, ""), http.StatusUnprocessableEntity)

	h = newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{})).Handler(createVenue())
	require.Equal(t, http.StatusCreated, send(h, "application/json; charset=UTF-8").Code)
	for _, same := range []string{"Application/JSON;charset=utf-8", "application/json;  CHARSET=utf-8"} {
		assert.Equal(t, "true", send(h, same).Header().Get("X-Idempotent-Replayed"), same)
	}

	ignoring := func(r *http.Request, body []byte) (string, error) {
		r = r.Clone(r.Context())
		r.Header.Del("Content-Type")
		return idempotency.Fingerprinter{}.Fingerprint(r, body)
	}
	h = newMiddleware(t, idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Fingerprint: ignoring}).Handler(createVenue())
	require.Equal(t, http.StatusCreated, send(h, "text/plain").Code)
	assert.Equal(t, "true", send(h, "application/json").Header().Get("X-Idempotent-Replayed"))
}
