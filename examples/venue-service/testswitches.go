package main

// Test switches: settings for demonstrations and tests, which a copy of
// the service does not need. They work only with the fake Stripe
// (loadConfig refuses them with STRIPE_SECRET_KEY). To copy the service,
// delete this file and, in main.go, the test field of config and its uses
// (loadTestSwitches, testSwitchesUsage, apply, enabled, and the latency
// passed to openStripe).

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// testSwitchNames lists the switches' environment variables.
const testSwitchNames = "FAKE_STRIPE_LATENCY, CHAOS_FAIL_AFTER_STRIPE, CHAOS_CRASH_AFTER and CHAOS_FAIL_WEBHOOK"

type testSwitches struct {
	// fakeStripeLatency makes every call to the fake Stripe take this
	// long, so concurrent duplicates can be seen (FAKE_STRIPE_LATENCY).
	fakeStripeLatency time.Duration
	// chaosFailAfterStripe makes the first N venue creations answer 500
	// after the Stripe call, as a crash there would (CHAOS_FAIL_AFTER_STRIPE).
	chaosFailAfterStripe int
	// chaosCrashAfter makes the first venue creation that reaches this
	// recovery point crash there (CHAOS_CRASH_AFTER).
	chaosCrashAfter string
	// chaosFailWebhook makes the webhook function fail its first N calls,
	// so Stripe's redeliveries, or the inbox worker's retries, show
	// (CHAOS_FAIL_WEBHOOK).
	chaosFailWebhook int
}

func testSwitchesUsage(w io.Writer) {
	fmt.Fprint(w, `Test switches (environment only; the fake Stripe only; not for production):
  FAKE_STRIPE_LATENCY (default: 0)
      every call to the fake Stripe takes this long, e.g. 2s: time to send
      concurrent duplicates and see 409
  CHAOS_FAIL_AFTER_STRIPE (default: 0)
      the first N venue creations answer 500 after the Stripe call: a retry
      with the same Idempotency-Key gets the same Stripe account back
  CHAOS_CRASH_AFTER (default: none)
      venue_created or account_created: the first venue creation that
      reaches this step crashes there (its connection is cut, no answer);
      the retry with the same Idempotency-Key resumes after the step
  CHAOS_FAIL_WEBHOOK (default: 0)
      the webhook function fails its first N calls: with DATABASE_URL the
      inbox worker retries them (GET /stats counts the failed attempts)
`)
}

func loadTestSwitches(getenv func(string) string) (testSwitches, error) {
	var ts testSwitches
	if v := getenv("FAKE_STRIPE_LATENCY"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return ts, fmt.Errorf("FAKE_STRIPE_LATENCY=%q: want a non-negative Go duration such as 200ms", v)
		}
		ts.fakeStripeLatency = d
	}
	if v := getenv("CHAOS_FAIL_AFTER_STRIPE"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return ts, fmt.Errorf("CHAOS_FAIL_AFTER_STRIPE=%q: want a non-negative integer", v)
		}
		ts.chaosFailAfterStripe = n
	}
	switch v := getenv("CHAOS_CRASH_AFTER"); v {
	case "", "venue_created", "account_created":
		ts.chaosCrashAfter = v
	default:
		return ts, fmt.Errorf("CHAOS_CRASH_AFTER=%q: want venue_created or account_created", v)
	}
	if v := getenv("CHAOS_FAIL_WEBHOOK"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return ts, fmt.Errorf("CHAOS_FAIL_WEBHOOK=%q: want a non-negative integer", v)
		}
		ts.chaosFailWebhook = n
	}
	return ts, nil
}

func (ts testSwitches) enabled() bool {
	return ts.fakeStripeLatency > 0 || ts.chaosFailAfterStripe > 0 || ts.chaosCrashAfter != "" || ts.chaosFailWebhook > 0
}

// String is how the startup line shows the switches that are on.
func (ts testSwitches) String() string {
	var on []string
	if ts.fakeStripeLatency > 0 {
		on = append(on, "FAKE_STRIPE_LATENCY="+ts.fakeStripeLatency.String())
	}
	if ts.chaosFailAfterStripe > 0 {
		on = append(on, "CHAOS_FAIL_AFTER_STRIPE="+strconv.Itoa(ts.chaosFailAfterStripe))
	}
	if ts.chaosCrashAfter != "" {
		on = append(on, "CHAOS_CRASH_AFTER="+ts.chaosCrashAfter)
	}
	if ts.chaosFailWebhook > 0 {
		on = append(on, "CHAOS_FAIL_WEBHOOK="+strconv.Itoa(ts.chaosFailWebhook))
	}
	return strings.Join(on, " ")
}

// apply arms the chaos switches on the service: the first
// chaosFailAfterStripe creations fail after their Stripe call, the first
// creation to reach chaosCrashAfter crashes there, the first
// chaosFailWebhook webhook function calls fail.
func (ts testSwitches) apply(s *service) {
	s.failAfterStripe = countdown(ts.chaosFailAfterStripe)
	if point := ts.chaosCrashAfter; point != "" {
		once := countdown(1)
		s.crashAfter = func(reached string) bool { return reached == point && once() }
	}
	s.failWebhook = countdown(ts.chaosFailWebhook)
}

// countdown returns a function that answers true n times, then false; nil
// for n = 0.
func countdown(n int) func() bool {
	if n <= 0 {
		return nil
	}
	var left atomic.Int64
	left.Store(int64(n))
	return func() bool {
		for {
			n := left.Load()
			if n <= 0 {
				return false
			}
			if left.CompareAndSwap(n, n-1) {
				return true
			}
		}
	}
}
