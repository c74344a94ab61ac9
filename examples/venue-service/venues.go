package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// venueStore keeps the venues: in memory by default, in PostgreSQL with
// DATABASE_URL (then beside the idempotency records, and they survive a
// restart).
type venueStore interface {
	// save stores a new venue, or fails with errSlugTaken.
	save(ctx context.Context, v Venue) error
	// list returns the tenant's venues, oldest first; with a slug, only
	// the one with that slug.
	list(ctx context.Context, tenant, slug string) ([]Venue, error)
	get(ctx context.Context, tenant, id string) (Venue, bool, error)
	// setChargesEnabled updates the venue whose Stripe account it is and
	// reports whether there was one.
	setChargesEnabled(ctx context.Context, accountID string, enabled bool) (bool, error)
}

var errSlugTaken = errors.New("slug taken")

func newVenueID() string { return "ven_" + strings.ToLower(rand.Text()[:16]) }

// memoryVenues is the venueStore of a service without a database.
type memoryVenues struct {
	mu     sync.Mutex
	venues []*Venue
}

func (m *memoryVenues) save(_ context.Context, v Venue) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, o := range m.venues {
		if o.Tenant == v.Tenant && o.Slug == v.Slug {
			return errSlugTaken
		}
	}
	m.venues = append(m.venues, &v)
	return nil
}

func (m *memoryVenues) list(_ context.Context, tenant, slug string) ([]Venue, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Venue, 0, len(m.venues))
	for _, v := range m.venues {
		if v.Tenant == tenant && (slug == "" || v.Slug == slug) {
			out = append(out, *v)
		}
	}
	return out, nil
}

func (m *memoryVenues) get(_ context.Context, tenant, id string) (Venue, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range m.venues {
		if v.Tenant == tenant && v.ID == id {
			return *v, true, nil
		}
	}
	return Venue{}, false, nil
}

func (m *memoryVenues) setChargesEnabled(_ context.Context, accountID string, enabled bool) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range m.venues {
		if v.StripeAccountID == accountID {
			v.ChargesEnabled = enabled
			return true, nil
		}
	}
	return false, nil
}

// pgVenues keeps the venues in PostgreSQL, in the venues table that
// migrateVenues creates.
type pgVenues struct{ pool *pgxpool.Pool }

// venuesTable is the service's own schema, created at start.
const venuesTable = `
CREATE TABLE IF NOT EXISTS venues (
    id                text PRIMARY KEY,
    tenant            text NOT NULL,
    name              text NOT NULL,
    slug              text NOT NULL,
    stripe_account_id text NOT NULL,
    charges_enabled   boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (tenant, slug)
)`

func migrateVenues(ctx context.Context, pool *pgxpool.Pool) error {
	_, err := pool.Exec(ctx, venuesTable)
	return err
}

const venueColumns = `id, tenant, name, slug, stripe_account_id, charges_enabled`

func (p pgVenues) save(ctx context.Context, v Venue) error {
	_, err := p.pool.Exec(ctx, `INSERT INTO venues (`+venueColumns+`) VALUES ($1, $2, $3, $4, $5, $6)`,
		v.ID, v.Tenant, v.Name, v.Slug, v.StripeAccountID, v.ChargesEnabled)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" { // unique_violation
		return errSlugTaken
	}
	return err
}

func (p pgVenues) list(ctx context.Context, tenant, slug string) ([]Venue, error) {
	rows, err := p.pool.Query(ctx, `SELECT `+venueColumns+` FROM venues
        WHERE tenant = $1 AND ($2 = '' OR slug = $2) ORDER BY created_at, id`, tenant, slug)
	if err != nil {
		return nil, err
	}
	out, err := pgx.CollectRows(rows, scanVenue)
	if out == nil {
		out = []Venue{}
	}
	return out, err
}

func (p pgVenues) get(ctx context.Context, tenant, id string) (Venue, bool, error) {
	rows, err := p.pool.Query(ctx, `SELECT `+venueColumns+` FROM venues WHERE tenant = $1 AND id = $2`, tenant, id)
	if err != nil {
		return Venue{}, false, err
	}
	v, err := pgx.CollectOneRow(rows, scanVenue)
	if errors.Is(err, pgx.ErrNoRows) {
		return Venue{}, false, nil
	}
	return v, err == nil, err
}

func (p pgVenues) setChargesEnabled(ctx context.Context, accountID string, enabled bool) (bool, error) {
	tag, err := p.pool.Exec(ctx, `UPDATE venues SET charges_enabled = $2 WHERE stripe_account_id = $1`, accountID, enabled)
	return tag.RowsAffected() > 0, err
}

func scanVenue(row pgx.CollectableRow) (Venue, error) {
	var v Venue
	err := row.Scan(&v.ID, &v.Tenant, &v.Name, &v.Slug, &v.StripeAccountID, &v.ChargesEnabled)
	if err != nil {
		return v, fmt.Errorf("reading a venue: %w", err)
	}
	return v, nil
}
