package pgstore_test

import (
	"context"
	"log"
	"net/http"
	"os"
	"os/signal"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/client"

	"github.com/seed70ea8305/idempotency/pgstore"
)

// The webhook inbox: deliveries are stored and answered at once; workers
// process them with retries, per-object ordering and a dead-letter state;
// an hourly backfill feeds what Stripe failed to deliver; operators get a
// read-only JSON API. (It needs a database, so it does not run as a
// test.)
func ExampleNewInbox() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	if err := pgstore.Migrate(ctx, pool); err != nil {
		log.Fatal(err)
	}
	inbox, err := pgstore.NewInbox(pool, []string{os.Getenv("STRIPE_WEBHOOK_SECRET")})
	if err != nil {
		log.Fatal(err)
	}
	worker, err := pgstore.NewWorker(pool, func(ctx context.Context, ev stripe.Event) error {
		switch ev.Type {
		case stripe.EventTypeAccountUpdated:
			return nil // sync the account
		}
		return nil // acknowledged, not acted on
	}, pgstore.WithConcurrency(4), pgstore.WithObjectOrdering())
	if err != nil {
		log.Fatal(err)
	}
	go worker.Run(ctx)

	sc := &client.API{}
	sc.Init(os.Getenv("STRIPE_SECRET_KEY"), nil)
	go func() {
		for ; ctx.Err() == nil; time.Sleep(time.Hour) {
			if _, err := inbox.Backfill(ctx, sc, time.Time{}); err != nil {
				log.Print(err)
			}
		}
	}()

	admin, err := inbox.AdminHandler() // read-only; pgstore.WithAdminRedrive() enables redrives
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST /stripe/webhook", inbox)
	mux.Handle("/ops/webhooks/", http.StripPrefix("/ops/webhooks", requireOperator(admin)))
	log.Fatal(http.ListenAndServe(":8080", mux))
}

// requireOperator stands for the application's own authentication.
func requireOperator(h http.Handler) http.Handler { return h }
