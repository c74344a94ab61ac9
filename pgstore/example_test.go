package pgstore_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"log"
	"net/http"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// The store behind the middleware: migrate once, clean up in the
// background, protect the handlers. (It needs a database, so it does not
// run as a test.)
func Example() {
	ctx := context.Background()
	mux := http.NewServeMux()
	if err := setUp(ctx, mux); err != nil {
		log.Fatal(err)
	}
	log.Fatal(http.ListenAndServe(":8080", mux))
}

// setUp is the package documentation's snippet.
func setUp(ctx context.Context, mux *http.ServeMux) error {
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		return err
	}
	if err := pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{}); err != nil {
		return err
	}
	store, err := pgstore.New(ctx, pool, pgstore.Options{})
	if err != nil {
		return err
	}
	go store.RunCleanup(ctx, time.Minute, 1000) // deletes expired records
	m, err := idempotency.New(store, idempotency.Options{})
	if err != nil {
		return err
	}
	mux.Handle("POST /venues", m.Handler(http.HandlerFunc(createVenue)))
	return nil
}

// store is the store of the examples.
var store *pgstore.Store

// createVenue writes its row in the claim's transaction, as the package
// documentation shows: the row and the stored response commit together.
func createVenue(w http.ResponseWriter, r *http.Request) {
	tx, err := store.Tx(r.Context()) // the store commits it
	if err != nil {
		http.Error(w, "unavailable", idempotency.StatusCode(err))
		return
	}
	var id int64
	if err := tx.QueryRow(r.Context(), "INSERT INTO venues (name) VALUES ($1) RETURNING id", "Hall").Scan(&id); err != nil {
		http.Error(w, "unavailable", http.StatusServiceUnavailable) // 5xx: rolled back, key freed
		return
	}
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, `{"id":%d}`, id)
}

// Tables in a schema of their own, found whatever the search_path.
func ExampleOptions() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS idempotency"); err != nil {
		log.Fatal(err)
	}
	if err := pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{Schema: "idempotency"}); err != nil {
		log.Fatal(err)
	}
	store, err := pgstore.New(ctx, pool, pgstore.Options{Schema: "idempotency", LockTimeout: 200 * time.Millisecond})
	if err != nil {
		log.Fatal(err)
	}
	_ = store
}

// A handler in two atomic phases, as in Brandur Leach's design: the venue
// is created in a phase of its own, which commits with a recovery point
// naming it; then a foreign call (here a Stripe account, with an
// idempotency key derived from the claim); then the last phase, in the
// claim's transaction, commits the account's row together with the stored
// response. A retry after a crash resumes after the venue: it creates no
// second one. (It needs a database, so it does not run as a test.)
func ExampleStore_Phase() {
	createVenue := func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		claim, _ := idempotency.ClaimFromContext(ctx)
		venueID := string(claim.RecoveryData)
		if claim.RecoveryPoint != "venue_created" {
			venueID = "v_" + rand.Text() // the phase's data: made before it
			err := store.Phase(ctx, "venue_created", []byte(venueID), func(tx pgx.Tx) error {
				_, err := tx.Exec(ctx, "INSERT INTO venues (id, name) VALUES ($1, 'Hall')", venueID)
				return err
			})
			if err != nil {
				http.Error(w, "unavailable", http.StatusServiceUnavailable) // 5xx: the key is freed, kept suspended
				return
			}
		}
		account := "acct_1" // created with idempotency.StripeKey(ctx, "account"): a retry gets the same one

		tx, err := store.Tx(ctx) // the last phase: the store commits it with the response
		if err != nil {
			http.Error(w, "unavailable", idempotency.StatusCode(err))
			return
		}
		if _, err := tx.Exec(ctx, "UPDATE venues SET stripe_account = $1 WHERE id = $2", account, venueID); err != nil {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"id":%q,"stripe_account":%q}`, venueID, account)
	}
	_ = createVenue
}
