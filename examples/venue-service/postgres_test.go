package main

import (
	"net/http"
	"net/url"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency/internal/pgtest"
)

// TestPostgresSurvivesARestart: with DATABASE_URL the venues and the
// idempotency records live in PostgreSQL (tables created at start), so a
// restarted service still replays a request it answered before, and lists
// the venue that replay describes.
func TestPostgresSurvivesARestart(t *testing.T) {
	schema := pgtest.Schema(pgtest.Config(t)) // skips without a database
	u, err := url.Parse(os.Getenv(pgtest.URLEnv))
	require.NoError(t, err)
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	databaseURL := "DATABASE_URL=" + u.String()

	p := start(t, databaseURL)
	key := uniqueKey()
	body := `{"name":"Concert Hall","slug":"concert-hall"}`
	first := p.createVenue(key, body)
	require.Equal(t, http.StatusCreated, first.status, "%s", first.body)
	var created Venue
	first.json(t, &created)
	p.stop()

	p = start(t, databaseURL)
	retry := p.createVenue(key, body)
	assert.Equal(t, http.StatusCreated, retry.status)
	assert.Equal(t, "true", retry.header.Get("X-Idempotent-Replayed"), "the record outlived the process")
	assert.Equal(t, string(first.body), string(retry.body))

	list := do(t, http.MethodGet, p.url+"/venues", "")
	require.Equal(t, http.StatusOK, list.status)
	var venues []Venue
	list.json(t, &venues)
	assert.Equal(t, []Venue{created}, venues, "the venue the replay describes is there, once")
	assert.Equal(t, stats{}, p.stats(), "this process did no work: it replayed")
	p.stop()
}

// TestPostgresAndRedisExclude: the records live in one place.
func TestPostgresAndRedisExclude(t *testing.T) {
	_, err := loadConfig(nil, func(name string) string {
		switch name {
		case "REDIS_URL":
			return "redis://127.0.0.1:6379/0"
		case "DATABASE_URL":
			return "postgres://postgres@127.0.0.1:5432/test"
		}
		return ""
	})
	assert.ErrorContains(t, err, "choose where the records live")
}
