package lincheck_test

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"maps"
	mrand "math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/lincheck"
	"github.com/seed70ea8305/idempotency/internal/overlay"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// TestHTTPReplies checks the middleware's promise end to end: 8 clients
// send POSTs with a few Idempotency-Keys at once to two instances (two
// Middlewares on one store, each behind its own httptest server), whose
// handler answers differently each time it runs (the execution's number
// is in the body), sometimes 503, sometimes for longer than the lease;
// under faults between the middleware and the store. Afterwards every key
// is replayed through both instances. Then every 2xx a client got for a
// key must be the same, and equal every replay of it, and a key's handler
// may have run more than once only if no 2xx of an earlier execution
// reached a client (lincheck.CheckReplies).
func TestHTTPReplies(t *testing.T) {
	t.Run("memory", func(t *testing.T) {
		store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
		httpRun(t, store, store, nil, 100*time.Millisecond, idempotency.Options{Lease: 100 * time.Millisecond})
	})
	t.Run("redis-proxy-faults", func(t *testing.T) {
		opt := redisOptions(t)
		prefix := redistest.Prefix(t)
		settle := redisStore(t, redistest.ClientWith(t, opt), prefix)
		faulty := *opt
		proxy := startProxy(t, opt.Addr)
		faulty.Addr = proxy.Addr()
		store := redisStore(t, redistest.ClientWith(t, &faulty), prefix)
		httpRun(t, store, settle, proxyFaults(proxy, 250*time.Millisecond, 300*time.Millisecond), 300*time.Millisecond, idempotency.Options{Lease: 300 * time.Millisecond, StoreTimeout: 100 * time.Millisecond})
	})
	t.Run("postgres-proxy-faults", func(t *testing.T) {
		pool, proxy, direct := pgProxied(t, 8)
		httpRun(t, pgStore(t, pool), pgStore(t, pgPool(t, direct)), proxyFaults(proxy, 400*time.Millisecond, time.Second), 500*time.Millisecond, idempotency.Options{Lease: 500 * time.Millisecond, StoreTimeout: 300 * time.Millisecond})
	})
}

// executions logs the handler's runs.
type executions struct {
	start time.Time
	fail  atomic.Bool // the handler may answer 503

	mu   sync.Mutex
	n    map[string]int
	runs []lincheck.Execution
}

// handler answers 201 with the key and the execution's number, or now
// and then 503; it takes a few milliseconds, now and then slow.
func (e *executions) handler(slow time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key := r.Header.Get("Idempotency-Key")
		status := http.StatusCreated
		if e.fail.Load() && mrand.IntN(8) == 0 {
			status = http.StatusServiceUnavailable
		}
		e.mu.Lock()
		e.n[key]++
		run := lincheck.Execution{Key: key, N: e.n[key], Started: time.Since(e.start), Status: status}
		run.Body = fmt.Sprintf("%s: execution %d", key, run.N)
		e.runs = append(e.runs, run)
		e.mu.Unlock()
		work := time.Duration(mrand.IntN(40)) * time.Millisecond
		if mrand.IntN(10) == 0 {
			work = slow // past the lease: renewals must keep it, or the lease is lost
		}
		time.Sleep(work) // the handler's work: load, not synchronisation
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(status)
		io.WriteString(w, run.Body)
	})
}

// exchanges logs what the clients got.
type exchanges struct {
	start time.Time
	mu    sync.Mutex
	all   []lincheck.Exchange
}

// post sends key's request to url as client and logs the answer.
func (x *exchanges) post(client *http.Client, id int, url, key string) lincheck.Exchange {
	ex := lincheck.Exchange{Client: id, Key: key, Sent: time.Since(x.start)}
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(`{"order":1}`))
	if err != nil {
		panic(err) // a constant request
	}
	req.Header.Set("Idempotency-Key", key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err == nil {
		var body []byte
		body, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		ex.Status, ex.Body, ex.Replayed = resp.StatusCode, string(body), resp.Header.Get("X-Idempotent-Replayed") == "true"
	}
	ex.Err, ex.Received = err, time.Since(x.start)
	x.mu.Lock()
	x.all = append(x.all, ex)
	x.mu.Unlock()
	return ex
}

// httpRun runs the clients against two instances on store for 3 s under
// faults, replays every key through settle (the same records, reached
// without the faults) and through both instances, and checks the
// answers. The handler is slow (1 request in 10) for slow.
func httpRun(t *testing.T, store, settle idempotency.Store, faults func(ctx context.Context, healed func()), slow time.Duration, opts ...idempotency.Options) {
	start := time.Now()
	execs := &executions{start: start, n: make(map[string]int)}
	execs.fail.Store(true)
	log := &exchanges{start: start}
	base := overlay.Merge(append([]idempotency.Options{{TTL: time.Hour}}, opts...)...)
	var urls []string
	for range 2 {
		m, err := idempotency.New(store, base)
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(m.Handler(execs.handler(slow)))
		t.Cleanup(srv.Close)
		urls = append(urls, srv.URL)
	}
	client := &http.Client{Timeout: 30 * time.Second}

	// The clients, on keys that change every round, so that each key sees
	// a few executions' worth of contention.
	const clients, keys, round = 8, 6, 100 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	var wg sync.WaitGroup
	for id := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				key := fmt.Sprintf("r%d-k%d", time.Since(start)/round, mrand.IntN(keys))
				log.post(client, id, urls[mrand.IntN(len(urls))], key)
			}
		}()
	}
	func() {
		defer func() { cancel(); wg.Wait() }()
		if faults != nil {
			faults(ctx, func() {})
		}
		<-ctx.Done()
	}()

	// Replays, once the faults are healed: through a middleware that waits
	// for a key still held by a request that is gone, then through both
	// instances.
	execs.fail.Store(false)
	verifier, err := idempotency.New(settle, overlay.Merge(base, idempotency.Options{Wait: 10 * time.Second, MaxWaiters: 100}))
	if err != nil {
		t.Fatal(err)
	}
	settled := httptest.NewServer(verifier.Handler(execs.handler(0)))
	defer settled.Close()
	seen := make(map[string]bool)
	for _, x := range log.all {
		seen[x.Key] = true
	}
	for _, key := range slices.Sorted(maps.Keys(seen)) {
		if x := log.post(client, clients, settled.URL, key); x.Status/100 != 2 {
			t.Errorf("key %s did not settle: its replay got %d %q (error %v)", key, x.Status, x.Body, x.Err)
		}
		for i, url := range urls {
			log.post(client, clients+1+i, url, key)
		}
	}

	execs.mu.Lock()
	runs := slices.Clone(execs.runs)
	execs.mu.Unlock()
	violations := lincheck.CheckReplies(runs, log.all)
	counts := make(map[string]int)
	for _, x := range log.all {
		switch {
		case x.Err != nil:
			counts["errors"]++
		case x.Replayed:
			counts["replays"]++
		default:
			counts[fmt.Sprint(x.Status)]++
		}
	}
	t.Logf("%d requests on %d keys (%v), %d executions; %d violations", len(log.all), len(seen), counts, len(runs), len(violations))
	if len(violations) == 0 {
		return
	}
	path, note := artifact(t, "replies.txt")
	report := strings.Join(violations, "\n") + "\n\n" + timeline(runs, log.all, violations)
	if err := os.WriteFile(path, []byte(report), 0o644); err != nil {
		t.Errorf("writing the report: %v", err)
	}
	shown := violations[:min(len(violations), 10)]
	t.Errorf("%d violations of the middleware's promise:\n%s\nevery request and execution of those keys: %s%s",
		len(violations), strings.Join(shown, "\n"), path, note)
}

// timeline lists, by time, the executions and requests of the keys the
// violations name.
func timeline(runs []lincheck.Execution, all []lincheck.Exchange, violations []string) string {
	var b strings.Builder
	keys := make(map[string]bool)
	for _, v := range violations {
		if key, _, ok := strings.Cut(strings.TrimPrefix(v, `key "`), `"`); ok {
			keys[key] = true
		}
	}
	type line struct {
		at   time.Duration
		text string
	}
	var lines []line
	for _, e := range runs {
		if keys[e.Key] {
			lines = append(lines, line{e.Started, fmt.Sprintf("%v %s: execution %d started, answers %d", e.Started, e.Key, e.N, e.Status)})
		}
	}
	for _, x := range all {
		if keys[x.Key] {
			body := x.Body
			if x.Status/100 != 2 {
				body = "" // a problem document
			}
			lines = append(lines, line{x.Received, fmt.Sprintf("%v %s: client %d got %d %q (replayed %t, error %v), sent at %v",
				x.Received, x.Key, x.Client, x.Status, body, x.Replayed, x.Err, x.Sent)})
		}
	}
	slices.SortStableFunc(lines, func(a, b line) int { return cmp.Compare(a.at, b.at) })
	for _, l := range lines {
		b.WriteString(l.text)
		b.WriteByte('\n')
	}
	return b.String()
}
