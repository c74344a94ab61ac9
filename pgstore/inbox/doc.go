// Package inbox is the webhook inbox: it stores each delivery in
// PostgreSQL as it arrives, answers at once, and processes the events
// afterwards, each once. It is the other way to receive webhooks than the
// root's synchronous [idempotency.WebhookHandler]: pick it when processing
// is slow, or when an operator must see and replay what failed.
//
// An [Inbox] is one endpoint: it verifies deliveries with an
// [idempotency.Verifier] (Stripe, of any API version; Standard Webhooks;
// GitHub; or one of your own), stores the event in pgstore's
// webhook_events table in one statement and answers 200. [Worker]s, any
// number in any number of processes, then run a function for each stored
// event of every provider, with retries, a dead-letter state, leases and
// optional per-object ordering. The inbox's read API ([Inbox.List],
// [Inbox.Event], [Inbox.Stats]) and redrives show and replay them,
// package [github.com/seed70ea8305/idempotency/pgstore/inbox/admin] over
// HTTP; [Inbox.Backfill] feeds the events Stripe failed to deliver, and
// [Inbox.DeleteExpired] deletes processed events after their retention.
//
// The tables are pgstore's: run pgstore.Migrate first. [NewInbox] and
// [NewWorker] check that they are there, at the migration this version
// needs, and otherwise fail with an error wrapping pgstore.ErrNotMigrated.
//
//	v, err := idempotency.NewStripeVerifier([]string{os.Getenv("STRIPE_WEBHOOK_SECRET")}, 0)
//	if err != nil {
//		return err
//	}
//	in, err := inbox.NewInbox(ctx, pool, v, inbox.Options{})
//	if err != nil {
//		return err
//	}
//	mux.Handle("POST /stripe/webhook", in)
//	worker, err := inbox.NewWorker(ctx, pool, func(ctx context.Context, ev idempotency.WebhookEvent) error {
//		switch ev.Type {
//		case "account.updated":
//			return syncAccount(ctx, ev.Stripe)
//		}
//		return nil // acknowledged, not acted on
//	}, inbox.WorkerOptions{Concurrency: 4})
//	if err != nil {
//		return err
//	}
//	go func() {
//		if err := worker.Run(ctx); err != nil {
//			log.Print(err) // a setup that cannot work: the tables gone, a privilege missing
//		}
//	}()
//
// Events are keyed by the inbox's scope, their provider and their ID, so
// a Standard Webhooks endpoint and a GitHub one feed the same table, and
// the same workers, without their IDs ever colliding. The function gets
// each event as its verifier read it ([idempotency.WebhookEvent]), decoded
// from the stored payload without verifying anything again.
package inbox
