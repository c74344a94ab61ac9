package inbox_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"log"
	"net/http"
	"os"
	"os/signal"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/client"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
	"github.com/seed70ea8305/idempotency/pgstore/inbox/admin"
)

// The webhook inbox: deliveries are stored and answered at once; a worker
// processes them with retries and a dead-letter state. (It needs a
// database, so it does not run as a test.)
func Example() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	if err := pgstore.Migrate(ctx, pool, pgstore.MigrateOptions{}); err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	if err := receiveStripe(ctx, pool, mux); err != nil {
		log.Fatal(err)
	}
	log.Fatal(http.ListenAndServe(":8080", mux))
}

// receiveStripe is the package documentation's snippet.
func receiveStripe(ctx context.Context, pool *pgxpool.Pool, mux *http.ServeMux) error {
	v, err := idempotency.NewStripeVerifier([]string{os.Getenv("STRIPE_WEBHOOK_SECRET")}, 0)
	if err != nil {
		return err
	}
	in, err := inbox.NewInbox(ctx, pool, v, inbox.Options{})
	if err != nil {
		return err
	}
	mux.Handle("POST /stripe/webhook", in)
	worker, err := inbox.NewWorker(ctx, pool, func(ctx context.Context, ev idempotency.WebhookEvent) error {
		switch ev.Type {
		case "account.updated":
			return syncAccount(ctx, ev.Stripe)
		}
		return nil // acknowledged, not acted on
	}, inbox.WorkerOptions{Concurrency: 4})
	if err != nil {
		return err
	}
	go func() {
		if err := worker.Run(ctx); err != nil {
			log.Print(err) // a setup that cannot work: the tables gone, a privilege missing
		}
	}()
	return nil
}

// syncAccount acts on a Stripe account.updated event.
func syncAccount(ctx context.Context, ev *stripe.Event) error { return nil }

// Two providers into one table, processed by the same workers: Stripe and
// a provider that signs as the Standard Webhooks specification says. The
// function tells them apart by Provider; their event IDs never collide.
// Events of one Stripe account are processed in order; an hourly
// backfill feeds what Stripe failed to deliver; operators get a read-only
// JSON API. (It needs a database, so it does not run as a test.)
func ExampleNewWorker() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	stripeV, err := idempotency.NewStripeVerifier([]string{os.Getenv("STRIPE_WEBHOOK_SECRET")}, 0)
	if err != nil {
		log.Fatal(err)
	}
	svixV, err := idempotency.NewStandardWebhooksVerifier([]string{os.Getenv("SVIX_WEBHOOK_SECRET")}, 0)
	if err != nil {
		log.Fatal(err)
	}
	stripeIn, err := inbox.NewInbox(ctx, pool, stripeV, inbox.Options{})
	if err != nil {
		log.Fatal(err)
	}
	svixIn, err := inbox.NewInbox(ctx, pool, svixV, inbox.Options{})
	if err != nil {
		log.Fatal(err)
	}
	worker, err := inbox.NewWorker(ctx, pool, func(ctx context.Context, ev idempotency.WebhookEvent) error {
		switch {
		case ev.Provider == stripeV.Provider() && ev.Type == "account.updated":
			return syncAccount(ctx, ev.Stripe) // ev.APIVersion may be newer than stripe-go's
		case ev.Provider == svixV.Provider():
			return nil // decode ev.Payload, the raw JSON
		}
		return nil
	}, inbox.WorkerOptions{Concurrency: 4, ObjectOrdering: true})
	if err != nil {
		log.Fatal(err)
	}
	go worker.Run(ctx)

	sc := &client.API{}
	sc.Init(os.Getenv("STRIPE_SECRET_KEY"), nil)
	go func() {
		for ; ctx.Err() == nil; time.Sleep(time.Hour) {
			if _, err := stripeIn.Backfill(ctx, sc, time.Time{}); err != nil {
				log.Print(err)
			}
		}
	}()

	ops, err := admin.New(stripeIn, admin.Options{}) // read-only; Redrive: true enables redrives
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST /stripe/webhook", stripeIn)
	mux.Handle("POST /svix/webhook", svixIn)
	mux.Handle("/ops/webhooks/stripe/", http.StripPrefix("/ops/webhooks/stripe", ops))
	log.Fatal(http.ListenAndServe(":8080", mux))
}

// shopify is a Verifier of another provider, in a few lines: Shopify
// signs the body with HMAC-SHA256 in X-Shopify-Hmac-Sha256 (base64) and
// names the event in X-Shopify-Webhook-Id.
type shopify struct{ secret []byte }

func (shopify) Provider() string { return "shopify" }

func (v shopify) Verify(header http.Header, payload []byte, _ time.Time) (idempotency.WebhookEvent, error) {
	mac := hmac.New(sha256.New, v.secret)
	mac.Write(payload)
	got, err := base64.StdEncoding.DecodeString(header.Get("X-Shopify-Hmac-Sha256"))
	if err != nil || !hmac.Equal(got, mac.Sum(nil)) {
		return idempotency.WebhookEvent{}, idempotency.ErrWebhookSignature
	}
	return idempotency.WebhookEvent{ID: header.Get("X-Shopify-Webhook-Id"), Type: header.Get("X-Shopify-Topic")}, nil
}

// An inbox for a provider of your own, through its Verifier.
func ExampleNewInbox() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	in, err := inbox.NewInbox(ctx, pool, shopify{secret: []byte(os.Getenv("SHOPIFY_SECRET"))}, inbox.Options{Scope: "shop-1"})
	if err != nil {
		log.Fatal(err)
	}
	http.Handle("POST /shopify/webhook", in)
}
