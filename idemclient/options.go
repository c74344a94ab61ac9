package idemclient

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"
)

// Default settings; each has an option that documents it.
const (
	DefaultKeyHeader    = "Idempotency-Key"
	DefaultReplayHeader = "X-Idempotent-Replayed"
	DefaultMaxAttempts  = 5
	DefaultBaseDelay    = 100 * time.Millisecond
	DefaultMaxDelay     = 5 * time.Second
	DefaultBudget       = 30 * time.Second
	DefaultMaxBodyBytes = 1 << 20
)

// MaxKeyLength is the longest key this package sends, the limit of
// Stripe's API and of the idempotency middleware.
const MaxKeyLength = 255

// Option configures a [Transport]. An invalid option makes [New] and
// [NewClient] return an error.
type Option func(*config) error

type config struct {
	methods      map[string]bool
	keyHeader    string
	replayHeader string
	keyFunc      func(*http.Request) (string, error)
	maxAttempts  int
	baseDelay    time.Duration
	maxDelay     time.Duration
	budget       time.Duration
	maxBodyBytes int64
	observer     func(Attempt)

	// Seams for tests (see export_test.go).
	now    func() time.Time
	sleep  func(ctx context.Context, d time.Duration) error
	jitter func(n int64) int64 // uniform in [0, n)
}

func defaultConfig() config {
	return config{
		methods:      map[string]bool{http.MethodPost: true, http.MethodPatch: true},
		keyHeader:    DefaultKeyHeader,
		replayHeader: DefaultReplayHeader,
		maxAttempts:  DefaultMaxAttempts,
		baseDelay:    DefaultBaseDelay,
		maxDelay:     DefaultMaxDelay,
		budget:       DefaultBudget,
		maxBodyBytes: DefaultMaxBodyBytes,
		now:          time.Now,
		sleep:        sleep,
		jitter:       rand.Int64N,
	}
}

// WithMethods sets the methods the transport protects: requests with
// these methods get a key and are retried; every other request passes
// through untouched, without a key and without retries. Default: POST
// and PATCH, the methods that are not idempotent by themselves.
func WithMethods(methods ...string) Option {
	return func(c *config) error {
		if len(methods) == 0 {
			return errors.New("idemclient: no methods given")
		}
		set := make(map[string]bool, len(methods))
		for _, m := range methods {
			if !validToken(m) {
				return fmt.Errorf("idemclient: invalid method %q", m)
			}
			set[m] = true
		}
		c.methods = set
		return nil
	}
}

// WithKeyHeader sets the request header that carries the key. Default:
// [DefaultKeyHeader], "Idempotency-Key". Go's [http.Transport] re-sends a
// request on a broken keep-alive connection by itself only when it carries
// Idempotency-Key or X-Idempotency-Key (see the package documentation).
func WithKeyHeader(name string) Option {
	return func(c *config) error {
		if !validToken(name) {
			return fmt.Errorf("idemclient: invalid key header name %q", name)
		}
		c.keyHeader = http.CanonicalHeaderKey(name)
		return nil
	}
}

// WithReplayHeader sets the response header whose value "true" marks a
// replayed response. A replay is the server's final answer: it is never
// retried. Default: [DefaultReplayHeader], "X-Idempotent-Replayed" (Stripe's
// API sends "Idempotent-Replayed").
func WithReplayHeader(name string) Option {
	return func(c *config) error {
		if !validToken(name) {
			return fmt.Errorf("idemclient: invalid replay header name %q", name)
		}
		c.replayHeader = http.CanonicalHeaderKey(name)
		return nil
	}
}

// WithKeyFunc derives the key of a request that carries none, for example
// from a job ID, so that a request re-sent after a crash or by another
// worker carries the same key. fn is called once per request, before the
// first attempt, possibly from several goroutines at once; it must not
// read the request's body. An error from fn is returned by RoundTrip
// without sending anything; an empty key means the default, a random key.
// A key in the request's context ([ContextWithKey]) takes precedence.
// Default: a random key (a UUID version 4) per request.
func WithKeyFunc(fn func(r *http.Request) (string, error)) Option {
	return func(c *config) error {
		if fn == nil {
			return errors.New("idemclient: key function is nil")
		}
		c.keyFunc = fn
		return nil
	}
}

// WithMaxAttempts bounds the number of attempts per request, the first
// included; 1 turns retries off but keeps the key. Default:
// [DefaultMaxAttempts], 5.
func WithMaxAttempts(n int) Option {
	return func(c *config) error {
		if n < 1 {
			return fmt.Errorf("idemclient: max attempts %d is less than 1", n)
		}
		c.maxAttempts = n
		return nil
	}
}

// WithBackoff sets the exponential backoff between attempts: before
// attempt n+1 the transport waits a uniformly random time between zero and
// min(max, base·2^(n-1)) ("full jitter"), or as long as the response's
// Retry-After asks if that is longer. Default: [DefaultBaseDelay], 100 ms,
// and [DefaultMaxDelay], 5 s.
func WithBackoff(base, max time.Duration) Option {
	return func(c *config) error {
		if base <= 0 {
			return fmt.Errorf("idemclient: backoff base %v is not positive", base)
		}
		if max < base {
			return fmt.Errorf("idemclient: backoff maximum %v is less than its base %v", max, base)
		}
		c.baseDelay, c.maxDelay = base, max
		return nil
	}
}

// WithBudget bounds the time spent on one request: no attempt starts, and
// no wait ends, later than d after the first attempt started. When the wait
// before the next attempt (a long Retry-After, say) would end past the
// budget, the last response or error is returned at once. An attempt
// already under way is bounded only by the request's context: set a
// deadline there (or [http.Client.Timeout]) to bound it. Default:
// [DefaultBudget], 30 s.
func WithBudget(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("idemclient: budget %v is not positive", d)
		}
		c.budget = d
		return nil
	}
}

// WithMaxBodyBytes bounds the body the transport buffers in memory to
// re-send it. Bodies of requests that have GetBody set (as
// [http.NewRequest] does for bytes.Buffer, bytes.Reader and strings.Reader
// bodies) are not buffered. A longer body makes RoundTrip fail with
// [ErrBodyTooLarge] before anything is sent. Default:
// [DefaultMaxBodyBytes], 1 MiB, the middleware's default limit.
func WithMaxBodyBytes(n int64) Option {
	return func(c *config) error {
		if n < 0 {
			return fmt.Errorf("idemclient: max body bytes %d is negative", n)
		}
		c.maxBodyBytes = n
		return nil
	}
}

// WithObserver calls observe after every attempt, with what happened and
// what the transport does next: the hook for metrics and logs. It runs on
// the goroutine that called RoundTrip, before any wait, and is called from
// several goroutines at once when requests run concurrently; it should be
// quick. Default: none.
func WithObserver(observe func(Attempt)) Option {
	return func(c *config) error {
		if observe == nil {
			return errors.New("idemclient: observer is nil")
		}
		c.observer = observe
		return nil
	}
}

// validToken reports whether s is an RFC 9110 token, as method and header
// names must be.
func validToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

// sleep waits for d or until ctx ends, whichever comes first.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
