package console

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// storeResponse stores a response under key through the middleware.
func storeResponse(t *testing.T, store idempotency.Store, scope, key string) {
	t.Helper()
	mw, err := idempotency.New(store, idempotency.Options{Scope: func(*http.Request) string { return scope }})
	require.NoError(t, err)
	h := mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Location", "/venues/v_1")
		w.Header().Set("X-Note", `<b>bold</b>`)
		w.WriteHeader(http.StatusCreated)
		fmt.Fprint(w, `{"id":"v_1"}`)
	}))
	req := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(`{}`))
	req.Header.Set("Idempotency-Key", key)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	require.Equal(t, http.StatusCreated, rec.Code)
}

var keyHashShown = regexp.MustCompile(`id="key-hash">([0-9a-f]{16})<`)

// TestRecordsLookup: a completed record shows its state, stored status,
// headers (escaped) and body size, named by its key_hash; the key itself
// is never in the page; a key with nothing under it is absent.
func TestRecordsLookup(t *testing.T) {
	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
	const key = "secret-key-7f3a9c"
	storeResponse(t, store, "tenant-a", key)
	c := newConsole(t, Options{Records: store})
	b := loggedIn(t, c)

	r := b.post(testPrefix+"/records", url.Values{"kind": {"http"}, "scope": {"tenant-a"}, "key": {key}})
	require.Equal(t, http.StatusOK, r.status, r.body)
	assert.NotContains(t, r.body, key, "the key is never echoed")
	m := keyHashShown.FindStringSubmatch(r.body)
	require.NotNil(t, m)
	assert.Equal(t, keyHash(key), m[1])
	assert.Contains(t, r.body, `id="state">completed<`)
	assert.Contains(t, r.body, "201 Created")
	assert.Contains(t, r.body, "12 B", "the stored body's size")
	assert.Contains(t, r.body, "/venues/v_1")
	assert.Contains(t, r.body, "&lt;b&gt;bold&lt;/b&gt;", "a stored header is text")
	assert.NotContains(t, r.body, "<b>bold</b>")
	assert.NotContains(t, r.body, `name="handle"`, "a readable record offers no removal")

	r = b.post(testPrefix+"/records", url.Values{"kind": {"http"}, "scope": {"tenant-b"}, "key": {key}})
	assert.Contains(t, r.body, `id="state">absent<`, "records are per scope")
	assert.NotContains(t, r.body, key)

	r = b.post(testPrefix+"/records", url.Values{"kind": {"HTTP!"}, "key": {key}})
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.NotContains(t, r.body, key)

	r = b.get(testPrefix + "/records?key=" + key)
	assert.NotContains(t, r.body, key, "a key in the URL is ignored, not echoed")
}

// unreadableStore is an Inspector whose record under one key cannot be
// decoded, as a record a newer version wrote; it records removals.
type unreadableStore struct {
	unreadable string

	mu      sync.Mutex
	removed []string
}

func (s *unreadableStore) Get(_ context.Context, key string) (*idempotency.Record, error) {
	if key == s.unreadable {
		return nil, fmt.Errorf("%w: unknown version", idempotency.ErrRecordUnreadable)
	}
	return nil, nil
}

func (s *unreadableStore) Remove(_ context.Context, key string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.removed = append(s.removed, key)
	return nil
}

var handleField = regexp.MustCompile(`name="handle" value="([^"]+)"`)

// TestRecordsRemove: an unreadable record is offered for removal on a
// read-write console, after a confirmation, through a handle only this
// session can use; a read-only console refuses.
func TestRecordsRemove(t *testing.T) {
	const key = "unreadable-key-51c2"
	storeKey := `http:"t":` + key
	store := &unreadableStore{unreadable: storeKey}
	lookup := url.Values{"kind": {"http"}, "scope": {"t"}, "key": {key}}

	t.Run("read-write", func(t *testing.T) {
		c := newConsole(t, Options{Records: store, ReadWrite: true})
		b := loggedIn(t, c)
		r := b.post(testPrefix+"/records", lookup)
		require.Equal(t, http.StatusOK, r.status)
		assert.Contains(t, r.body, `id="state">unreadable<`)
		assert.Contains(t, r.body, "unknown version")
		assert.NotContains(t, r.body, key)
		m := handleField.FindStringSubmatch(r.body)
		require.NotNil(t, m, "an unreadable record can be removed")
		handle := m[1]

		other := loggedIn(t, c)
		assert.Equal(t, http.StatusBadRequest, other.post(testPrefix+"/records/remove", url.Values{"handle": {handle}}).status,
			"another session cannot use the handle")

		confirm := b.post(testPrefix+"/records/remove", url.Values{"handle": {handle}})
		require.Equal(t, http.StatusOK, confirm.status)
		assert.Contains(t, confirm.body, keyHash(key))
		assert.NotContains(t, confirm.body, key)
		assert.Empty(t, store.removed, "nothing removed before the confirmation")

		done := b.post(testPrefix+"/records/remove", url.Values{"handle": {handle}, "confirm": {"yes"}})
		require.Equal(t, http.StatusOK, done.status)
		assert.Contains(t, done.body, `id="removed"`)
		assert.NotContains(t, done.body, key)
		assert.Equal(t, []string{storeKey}, store.removed)
	})

	t.Run("read-only", func(t *testing.T) {
		store.removed = nil
		c := newConsole(t, Options{Records: store})
		b := loggedIn(t, c)
		r := b.post(testPrefix+"/records", lookup)
		assert.Contains(t, r.body, `id="state">unreadable<`)
		assert.NotContains(t, r.body, `name="handle"`)
		assert.Contains(t, r.body, "read-only")

		rw := newConsole(t, Options{Records: store, ReadWrite: true})
		rwb := loggedIn(t, rw)
		handle := handleField.FindStringSubmatch(rwb.post(testPrefix+"/records", lookup).body)[1]
		// The same key, so the same session secret: only the mode differs.
		b.cookie, b.csrf = rwb.cookie, rwb.csrf
		r = b.post(testPrefix+"/records/remove", url.Values{"handle": {handle}, "confirm": {"yes"}})
		assert.Equal(t, http.StatusForbidden, r.status)
		assert.Contains(t, r.body, "read-only")
		assert.Empty(t, store.removed)
	})
}

// TestRecordsPgstore: on pgstore the page shows an in-flight record's
// lease left and its fence.
func TestRecordsPgstore(t *testing.T) {
	pool := newPool(t)
	ctx := context.Background()
	store, err := pgstore.New(ctx, pool, pgstore.Options{})
	require.NoError(t, err)
	const key = "pg-key-0c1d"
	storeKey := `http:"s":` + key
	fence, existing, err := store.Acquire(ctx, storeKey, idempotency.Record{Token: "owner-1", Fingerprint: "fp", CreatedAt: time.Now()}, time.Minute)
	require.NoError(t, err)
	require.Nil(t, existing)
	require.NoError(t, store.Checkpoint(ctx, storeKey, "owner-1", "venue_created", []byte(`{"id":"v_1"}`), time.Hour))
	c := newConsole(t, Options{Pool: pool, Records: store})
	b := loggedIn(t, c)
	r := b.post(testPrefix+"/records", url.Values{"kind": {"http"}, "scope": {"s"}, "key": {key}})
	require.Equal(t, http.StatusOK, r.status, r.body)
	assert.Contains(t, r.body, `id="state">in flight<`)
	assert.Contains(t, r.body, "<code>venue_created</code> with 12 B of data", "the recovery point")
	assert.Contains(t, r.body, fmt.Sprintf("<dt>Fence</dt><dd>%d</dd>", fence))
	assert.Contains(t, r.body, "Lease left")
	assert.NotContains(t, r.body, key)

	require.NoError(t, store.Release(ctx, storeKey, "owner-1"))
	r = b.post(testPrefix+"/records", url.Values{"kind": {"http"}, "scope": {"s"}, "key": {key}})
	assert.Contains(t, r.body, `id="state">suspended<`, "released with a recovery point: suspended")
	assert.Contains(t, r.body, "venue_created")
}
