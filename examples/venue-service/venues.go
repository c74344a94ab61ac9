package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// venueStore keeps the venues: in memory by default, in PostgreSQL with
// DATABASE_URL (then beside the idempotency records, and they survive a
// restart).
//
// A venue is created in steps, each ending with a recovery point of the
// request's claim (see createVenue): createPending, attachAccount, then
// activate. On PostgreSQL each step's writes commit together with its
// recovery point, and activate's with the stored response.
type venueStore interface {
	// createPending stores v (pending, without its account) and records
	// the recovery point "venue_created" with data. Storing a venue whose
	// ID is already there with the same tenant and slug succeeds, so a
	// step that ran without its recovery point can run again; another
	// venue with the slug fails with errSlugTaken.
	createPending(ctx context.Context, v Venue, data []byte) error
	// attachAccount sets the pending venue's Stripe account and records
	// the recovery point "account_created" with data.
	attachAccount(ctx context.Context, tenant, venueID, accountID string, data []byte) error
	// activate makes the venue active and returns it.
	activate(ctx context.Context, tenant, venueID string) (Venue, error)
	// list returns the tenant's venues, oldest first; with a slug, only
	// the one with that slug.
	list(ctx context.Context, tenant, slug string) ([]Venue, error)
	get(ctx context.Context, tenant, id string) (Venue, bool, error)
	// setChargesEnabled updates the venue whose Stripe account it is and
	// reports whether there was one.
	setChargesEnabled(ctx context.Context, accountID string, enabled bool) (bool, error)
}

// Venue statuses: pending until its creation finished.
const (
	venuePending = "pending"
	venueActive  = "active"
)

var (
	errSlugTaken   = errors.New("slug taken")
	errNoSuchVenue = errors.New("no such venue")
)

// venueID derives the ID of the venue a request creates from its claim:
// the same on every attempt, so a step that is run again finds the venue
// it stored the first time.
func venueID(ctx context.Context) (string, error) {
	key, err := idempotency.StripeKey(ctx, "venues.create")
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256([]byte(key))
	return "ven_" + hex.EncodeToString(sum[:8]), nil
}

// memoryVenues is the venueStore of a service without a database.
type memoryVenues struct {
	mu     sync.Mutex
	venues []*Venue
}

// createPending stores v, then records the recovery point: two steps
// here, so a crash between them leaves a pending venue that the retry
// finds by its ID.
func (m *memoryVenues) createPending(ctx context.Context, v Venue, data []byte) error {
	if err := m.insert(v); err != nil {
		return err
	}
	return checkpoint(ctx, "venue_created", data)
}

func (m *memoryVenues) insert(v Venue) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, o := range m.venues {
		switch {
		case o.ID == v.ID && o.Tenant == v.Tenant && o.Slug == v.Slug:
			return nil
		case o.Tenant == v.Tenant && o.Slug == v.Slug:
			return errSlugTaken
		}
	}
	m.venues = append(m.venues, &v)
	return nil
}

func (m *memoryVenues) attachAccount(ctx context.Context, tenant, venueID, accountID string, data []byte) error {
	if err := m.update(tenant, venueID, func(v *Venue) { v.StripeAccountID = accountID }); err != nil {
		return err
	}
	return checkpoint(ctx, "account_created", data)
}

func (m *memoryVenues) activate(_ context.Context, tenant, venueID string) (Venue, error) {
	var out Venue
	err := m.update(tenant, venueID, func(v *Venue) { v.Status = venueActive; out = *v })
	return out, err
}

func (m *memoryVenues) update(tenant, id string, change func(*Venue)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range m.venues {
		if v.Tenant == tenant && v.ID == id {
			change(v)
			return nil
		}
	}
	return errNoSuchVenue
}

// checkpoint records a recovery point of the request's claim.
func checkpoint(ctx context.Context, point string, data []byte) error {
	claim, ok := idempotency.ClaimFromContext(ctx)
	if !ok {
		return idempotency.ErrNoClaim
	}
	return claim.Checkpoint(ctx, point, data)
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
// migrateVenues creates. Each step of a creation runs in a transaction
// that pgstore commits with the step's recovery point (Phase), and the
// last in the claim's own transaction, which commits with the stored
// response (Tx).
//
// Every write to a venue is also fenced: it carries the claim's fence and
// changes the row only if no newer owner of the request has written it
// (fence <= $fence). pgstore already refuses a stale owner's recovery
// point and response; the fence makes the venue row itself refuse an owner
// that was paused past its lease while another attempt went on. Any
// downstream system can do the same with the fence it is handed.
type pgVenues struct {
	pool  *pgxpool.Pool
	store *pgstore.Store
}

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
);
ALTER TABLE venues ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT 'active';
ALTER TABLE venues ADD COLUMN IF NOT EXISTS fence bigint NOT NULL DEFAULT 0`

func migrateVenues(ctx context.Context, pool *pgxpool.Pool) error {
	_, err := pool.Exec(ctx, venuesTable)
	return err
}

const venueColumns = `id, tenant, name, slug, stripe_account_id, charges_enabled, status`

// errFenced: a newer attempt at the same request has written the venue;
// this one, paused past its lease, must not.
var errFenced = errors.New("a newer attempt owns this venue")

// fenceOf is the fence of the claim in ctx, as PostgreSQL's bigint.
func fenceOf(ctx context.Context) int64 {
	claim, _ := idempotency.ClaimFromContext(ctx)
	return int64(claim.Fence)
}

func (p pgVenues) createPending(ctx context.Context, v Venue, data []byte) error {
	err := p.store.Phase(ctx, "venue_created", data, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `INSERT INTO venues (`+venueColumns+`, fence) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (id) DO NOTHING`,
			v.ID, v.Tenant, v.Name, v.Slug, v.StripeAccountID, v.ChargesEnabled, v.Status, fenceOf(ctx))
		if err == nil && tag.RowsAffected() == 0 {
			// Stored by an attempt that stopped before its recovery point.
			var same bool
			err = tx.QueryRow(ctx, `SELECT tenant = $2 AND slug = $3 FROM venues WHERE id = $1`, v.ID, v.Tenant, v.Slug).Scan(&same)
			if err == nil && !same {
				err = errSlugTaken
			}
		}
		return err
	})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" { // unique_violation
		return errSlugTaken
	}
	return err
}

func (p pgVenues) attachAccount(ctx context.Context, tenant, venueID, accountID string, data []byte) error {
	return p.store.Phase(ctx, "account_created", data, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE venues SET stripe_account_id = $3, fence = $4
            WHERE tenant = $1 AND id = $2 AND fence <= $4`, tenant, venueID, accountID, fenceOf(ctx))
		if err == nil && tag.RowsAffected() == 0 {
			err = p.missingOrFenced(ctx, tx, tenant, venueID)
		}
		return err
	})
}

// activate runs in the claim's transaction: the venue turns active if and
// only if the response saying so is stored.
func (p pgVenues) activate(ctx context.Context, tenant, venueID string) (Venue, error) {
	tx, err := p.store.Tx(ctx)
	if err != nil {
		return Venue{}, err
	}
	rows, err := tx.Query(ctx, `UPDATE venues SET status = 'active', fence = $3
        WHERE tenant = $1 AND id = $2 AND fence <= $3
        RETURNING `+venueColumns, tenant, venueID, fenceOf(ctx))
	if err != nil {
		return Venue{}, err
	}
	v, err := pgx.CollectOneRow(rows, scanVenue)
	if errors.Is(err, pgx.ErrNoRows) {
		return Venue{}, p.missingOrFenced(ctx, tx, tenant, venueID)
	}
	return v, err
}

// missingOrFenced tells why a fenced update changed no row.
func (p pgVenues) missingOrFenced(ctx context.Context, tx pgx.Tx, tenant, venueID string) error {
	var exists bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM venues WHERE tenant = $1 AND id = $2)`, tenant, venueID).Scan(&exists); err != nil {
		return err
	}
	if exists {
		return errFenced
	}
	return errNoSuchVenue
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
	err := row.Scan(&v.ID, &v.Tenant, &v.Name, &v.Slug, &v.StripeAccountID, &v.ChargesEnabled, &v.Status)
	if err != nil {
		return v, fmt.Errorf("reading a venue: %w", err)
	}
	return v, nil
}
