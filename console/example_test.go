package console_test

import (
	"context"
	"log"
	"net/http"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/console"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

// ExampleNew mounts the console beside a service that keeps its records
// and its webhook inbox in PostgreSQL, with the activity charts fed by
// the middleware's observer and the inbox worker.
func ExampleNew() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	store, err := pgstore.New(ctx, pool, pgstore.Options{})
	if err != nil {
		log.Fatal(err)
	}
	activity := console.NewActivity()
	mw, err := idempotency.New(store, idempotency.Options{Observer: activity.ObserveRequest})
	if err != nil {
		log.Fatal(err)
	}
	worker, err := inbox.NewWorker(ctx, pool, activity.Worker(func(ctx context.Context, ev idempotency.WebhookEvent) error {
		return nil // the application's processing
	}), inbox.WorkerOptions{})
	if err != nil {
		log.Fatal(err)
	}
	go func() { _ = worker.Run(ctx) }()

	con, err := console.New(ctx, os.Getenv("ADMIN_KEY"), console.Options{
		Pool:      pool,
		Records:   store,
		Activity:  activity,
		ReadWrite: os.Getenv("ADMIN_REDRIVE") == "1",
		Prefix:    "/admin/console",
	})
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST /orders", mw.Handler(http.NotFoundHandler()))
	mux.Handle("/admin/console/", con)
	log.Fatal(http.ListenAndServe("127.0.0.1:8080", mux))
}
