package inbox_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

// figuresEnv runs the measurements below only when set.
const figuresEnv = "PGSTORE_INBOX_FIGURES"

func skipFigures(t *testing.T) {
	if os.Getenv(figuresEnv) == "" {
		t.Skipf("%s not set: skipping the inbox measurements", figuresEnv)
	}
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// TestFiguresAckLatency measures how long a delivery takes to be
// answered: the inbox (verify, one INSERT) of each provider, against the
// root's synchronous WebhookHandler on a pgstore.Store on the same
// database (verify, claim, run the function, complete), with a function
// that does nothing and one that takes 20 ms. The kinds of delivery
// alternate.
func TestFiguresAckLatency(t *testing.T) {
	skipFigures(t)
	const n = 1000
	env := newInboxEnv(t)
	store, err := pgstore.New(context.Background(), env.pool, pgstore.Options{})
	require.NoError(t, err)
	verifier := stripeVerifier(t, whSecret)
	syncNoop, err := idempotency.NewWebhookHandler(store, verifier, func(context.Context, idempotency.WebhookEvent) error { return nil }, idempotency.WebhookOptions{})
	require.NoError(t, err)
	sync20, err := idempotency.NewWebhookHandler(store, verifier, func(context.Context, idempotency.WebhookEvent) error {
		time.Sleep(20 * time.Millisecond)
		return nil
	}, idempotency.WebhookOptions{})
	require.NoError(t, err)
	swIn, ghIn := env.newInbox(t, swVerifier(t)), env.newInbox(t, ghVerifier(t))
	stripeDelivery := func(h http.Handler) func(id string) *httptest.ResponseRecorder {
		return func(id string) *httptest.ResponseRecorder {
			payload := eventPayload(id, "account.updated", "acct_1", time.Now().Unix())
			return deliver(h, payload, sign(payload, whSecret, time.Now()))
		}
	}
	handlers := []struct {
		name string
		send func(id string) *httptest.ResponseRecorder
		n    int
	}{
		{"inbox, Stripe", stripeDelivery(env.in), n},
		{"inbox, Standard Webhooks", func(id string) *httptest.ResponseRecorder {
			payload := []byte(`{"type":"invoice.paid","data":{"id":"` + id + `"}}`)
			return deliverWith(swIn, payload, swHeader(swKey, id, time.Now(), payload))
		}, n},
		{"inbox, GitHub", func(id string) *httptest.ResponseRecorder {
			payload := []byte(`{"action":"opened","id":"` + id + `"}`)
			return deliverWith(ghIn, payload, ghHeader(ghSecret, id, "issues", payload))
		}, n},
		{"sync, no-op function", stripeDelivery(syncNoop), n},
		{"sync, 20 ms function", stripeDelivery(sync20), n / 5},
	}
	lat := make([][]time.Duration, len(handlers))
	for i := range n {
		for j, h := range handlers {
			if i >= h.n {
				continue
			}
			start := time.Now()
			w := h.send(fmt.Sprintf("evt_%d_%d", j, i))
			lat[j] = append(lat[j], time.Since(start))
			require.Equal(t, http.StatusOK, w.Code)
		}
	}
	for j, h := range handlers {
		t.Logf("%-26s n=%4d p50 %8v p99 %8v", h.name, len(lat[j]), percentile(lat[j], 0.5).Round(time.Microsecond), percentile(lat[j], 0.99).Round(time.Microsecond))
	}
}

// TestFiguresThroughput measures events processed per second by 1, 2
// and 4 workers (each its own pool and Run, concurrency 1), for a
// function that does nothing and one that sleeps 5 ms.
func TestFiguresThroughput(t *testing.T) {
	skipFigures(t)
	const n = 2000
	for _, work := range []time.Duration{0, 5 * time.Millisecond} {
		for _, workers := range []int{1, 2, 4} {
			t.Run(fmt.Sprintf("work=%v/workers=%d", work, workers), func(t *testing.T) {
				events := n
				if work > 0 {
					events = 200 * workers
				}
				env := newInboxEnv(t)
				fill(t, env, events)
				fn := func(context.Context, idempotency.WebhookEvent) error {
					if work > 0 {
						time.Sleep(work)
					}
					return nil
				}
				start := time.Now()
				for range workers {
					runWorker(t, newWorker(t, env.newPool(t), fn, inbox.WorkerOptions{PollInterval: time.Millisecond}))
				}
				waitFor(t, time.Minute, "all processed", func() bool { return stats(t, env.in).Processed == int64(events) })
				d := time.Since(start)
				t.Logf("work %v, %d workers: %d events in %v: %.0f events/s", work, workers, events, d.Round(time.Millisecond), float64(events)/d.Seconds())
			})
		}
	}
}

// fill stores n events through the inbox, 8 at a time.
func fill(t *testing.T, env *inboxEnv, n int) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			payload := eventPayload(fmt.Sprintf("evt_%d", i), "account.updated", fmt.Sprintf("acct_%d", i), time.Now().Unix())
			_, err := env.in.Receive(context.Background(), http.Header{"Stripe-Signature": {sign(payload, whSecret, time.Now())}}, payload)
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
}
