package pgstore_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
)

// The store behind the middleware: migrate once, clean up in the
// background, protect the handlers. (It needs a database, so it does not
// run as a test.)
func Example() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	if err := pgstore.Migrate(ctx, pool); err != nil {
		log.Fatal(err)
	}
	store, err := pgstore.New(pool)
	if err != nil {
		log.Fatal(err)
	}
	go store.RunCleanup(ctx, time.Minute, 1000)

	m, err := idempotency.New(store)
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST /venues", m.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintln(w, `{"id":"v_1"}`)
	})))
	log.Fatal(http.ListenAndServe(":8080", mux))
}

// Tables in a schema of their own, found whatever the search_path.
func ExampleWithSchema() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS idempotency"); err != nil {
		log.Fatal(err)
	}
	if err := pgstore.Migrate(ctx, pool, pgstore.WithSchema("idempotency")); err != nil {
		log.Fatal(err)
	}
	store, err := pgstore.New(pool, pgstore.WithSchema("idempotency"), pgstore.WithLockTimeout(200*time.Millisecond))
	if err != nil {
		log.Fatal(err)
	}
	_ = store
}
