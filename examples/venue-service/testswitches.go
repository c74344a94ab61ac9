package main

// Test switches: settings for demonstrations and tests, which a copy of
// the service does not need. They work only with the fake Stripe
// (loadConfig refuses them with STRIPE_SECRET_KEY). To copy the service,
// delete this file and, in main.go, the test field of config and its uses
// (loadTestSwitches, testSwitchesUsage, apply, enabled, and the latency
// passed to openStripe).

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// testSwitchNames lists the switches' environment variables.
const testSwitchNames = "FAKE_STRIPE_LATENCY, CHAOS_FAIL_AFTER_STRIPE, CHAOS_CRASH_AFTER, CHAOS_FAIL_WEBHOOK and CHAOS_HOLD"

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
	// chaosHold lets whoever runs the service hold a venue creation just
	// before its Stripe call, over standard input, so that a test acts
	// while a request is known to be in flight instead of sleeping and
	// hoping it is (CHAOS_HOLD).
	chaosHold bool
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
  CHAOS_HOLD (default: 0)
      1: after the line "hold" on standard input (logged "chaos: hold
      armed"), the next venue creation to reach its Stripe call waits
      there (logged "chaos: holding the request") until the line "release"
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
	switch v := getenv("CHAOS_HOLD"); v {
	case "", "0":
	case "1":
		ts.chaosHold = true
	default:
		return ts, fmt.Errorf("CHAOS_HOLD=%q: want 0 or 1", v)
	}
	return ts, nil
}

func (ts testSwitches) enabled() bool {
	return ts.fakeStripeLatency > 0 || ts.chaosFailAfterStripe > 0 || ts.chaosCrashAfter != "" || ts.chaosFailWebhook > 0 || ts.chaosHold
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
	if ts.chaosHold {
		on = append(on, "CHAOS_HOLD=1")
	}
	return strings.Join(on, " ")
}

// apply arms the chaos switches on the service: the first
// chaosFailAfterStripe creations fail after their Stripe call, the first
// creation to reach chaosCrashAfter crashes there, the first
// chaosFailWebhook webhook function calls fail, and with chaosHold the
// lines read from standard input hold creations before their Stripe call.
func (ts testSwitches) apply(s *service) {
	s.failAfterStripe = countdown(ts.chaosFailAfterStripe)
	if point := ts.chaosCrashAfter; point != "" {
		once := countdown(1)
		s.crashAfter = func(reached string) bool { return reached == point && once() }
	}
	if ts.chaosHold {
		// venue_created is the step just before the Stripe call.
		h := &hold{logger: s.logger}
		go h.read(os.Stdin)
		crash := s.crashAfter
		s.crashAfter = func(reached string) bool {
			if reached == "venue_created" {
				h.wait()
			}
			return crash != nil && crash(reached)
		}
	}
	s.failWebhook = countdown(ts.chaosFailWebhook)
}

// hold is CHAOS_HOLD's state: the line "hold" arms it for the next
// creation to get there, "release" lets that creation go on.
type hold struct {
	logger  *slog.Logger
	mu      sync.Mutex
	armed   bool
	release chan struct{} // closed by "release"
}

// read applies the lines of r; at its end nothing is held any more.
func (h *hold) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		switch line := strings.TrimSpace(sc.Text()); line {
		case "hold":
			h.mu.Lock()
			h.armed, h.release = true, make(chan struct{})
			h.mu.Unlock()
			h.logger.Info("chaos: hold armed")
		case "release":
			h.free()
		default:
			h.logger.Warn("chaos: CHAOS_HOLD reads hold or release", "line", line)
		}
	}
	h.free()
}

func (h *hold) free() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.release != nil {
		close(h.release)
	}
	h.armed, h.release = false, nil
}

// wait holds the creation that reaches it while the hold is armed,
// until it is released.
func (h *hold) wait() {
	h.mu.Lock()
	armed, release := h.armed, h.release
	h.armed = false
	h.mu.Unlock()
	if !armed {
		return
	}
	h.logger.Warn("chaos: holding the request")
	<-release
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
