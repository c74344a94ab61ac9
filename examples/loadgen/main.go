// Command loadgen creates venues through injected faults with the
// idemclient transport, and checks that every logical request was executed
// exactly once.
//
// It starts its own venue API on 127.0.0.1 (a random port), behind the
// idempotency middleware and a fault injector that, for a share of the
// HTTP requests reaching the server, answers 503 or resets the connection
// before anything runs, makes the handler fail with 500 before its side
// effect, or drops the connection after the venue was created and the
// response stored. Workers then create venues through an [http.Client]
// built by idemclient.NewClient, and the program prints what each side
// saw:
//
//	$ go run ./examples/loadgen -requests 200
//	requests=200 succeeded=200 failed=0 attempts=252 replays=16 executions=200 server_requests=289
//	faults: 503=28 reset=24 fail500=18 drop_after=19
//	exactly-once: ok (200 executions for 200 successful requests, no duplicate venue)
//
// (Counts vary from run to run: the workers run concurrently.) attempts
// counts calls to the wrapped http.Transport; server_requests is higher
// because http.Transport itself re-sends a request that carries an
// Idempotency-Key when a reused keep-alive connection breaks under it.
//
// Flags: -requests (200), -concurrency (8), -fault-rate (0.25), -seed
// (1; the faults' random source), -duration (10s; no request starts
// later). It exits with status 1 when a request executed twice, a
// successful request was not executed, or a request failed (ran out of
// attempts, budget or time).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemclient"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

type config struct {
	requests    int
	concurrency int
	faultRate   float64
	seed        uint64
	duration    time.Duration
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var cfg config
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&cfg.requests, "requests", 200, "logical requests (venues) to create")
	fs.IntVar(&cfg.concurrency, "concurrency", 8, "requests in flight at once")
	fs.Float64Var(&cfg.faultRate, "fault-rate", 0.25, "share of HTTP requests that meet a fault, 0 to 0.9")
	fs.Uint64Var(&cfg.seed, "seed", 1, "seed of the faults' random source")
	fs.DurationVar(&cfg.duration, "duration", 10*time.Second, "no request starts later than this")
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	switch {
	case cfg.requests < 1 || cfg.requests > 100000:
		return config{}, fmt.Errorf("-requests %d: want 1 to 100000", cfg.requests)
	case cfg.concurrency < 1 || cfg.concurrency > 256:
		return config{}, fmt.Errorf("-concurrency %d: want 1 to 256", cfg.concurrency)
	case cfg.faultRate < 0 || cfg.faultRate > 0.9:
		return config{}, fmt.Errorf("-fault-rate %v: want 0 to 0.9", cfg.faultRate)
	case cfg.duration <= 0:
		return config{}, fmt.Errorf("-duration %v: want a positive duration", cfg.duration)
	}
	return cfg, nil
}

// report is what loadgen prints.
type report struct {
	requests, succeeded, failed int64
	attempts, replays           atomic.Int64
	executions, serverRequests  int64
	duplicates                  int64
	faults                      map[string]int64
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	api := newVenueAPI(cfg.faultRate, cfg.seed)
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Lease: 5 * time.Second})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("POST /venues", api.faulty(mw.Handler(http.HandlerFunc(api.create))))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(shutdownCtx)
		<-served
	}()

	var rep report
	base := &http.Transport{MaxIdleConnsPerHost: cfg.concurrency}
	defer base.CloseIdleConnections()
	client, err := idemclient.NewClient(base,
		idemclient.WithBackoff(2*time.Millisecond, 50*time.Millisecond),
		idemclient.WithMaxAttempts(10),
		idemclient.WithBudget(5*time.Second),
		idemclient.WithObserver(func(idemclient.Attempt) { rep.attempts.Add(1) }),
	)
	if err != nil {
		return err
	}
	client.Timeout = 10 * time.Second

	deadline, cancel := context.WithTimeout(ctx, cfg.duration)
	defer cancel()
	url := "http://" + ln.Addr().String() + "/venues"
	var (
		next                         atomic.Int64
		succeeded, failed, attempted atomic.Int64
		firstErr                     error
		errOnce                      sync.Once
		wg                           sync.WaitGroup
	)
	for range cfg.concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > int64(cfg.requests) || deadline.Err() != nil {
					return
				}
				attempted.Add(1)
				replayed, err := createVenue(deadline, client, url, i)
				if err != nil {
					failed.Add(1)
					errOnce.Do(func() { firstErr = err })
					continue
				}
				succeeded.Add(1)
				if replayed {
					rep.replays.Add(1)
				}
			}
		}()
	}
	wg.Wait()

	rep.requests, rep.succeeded, rep.failed = attempted.Load(), succeeded.Load(), failed.Load()
	rep.executions, rep.duplicates, rep.serverRequests, rep.faults = api.counts()
	fmt.Fprintf(stdout, "requests=%d succeeded=%d failed=%d attempts=%d replays=%d executions=%d server_requests=%d\n",
		rep.requests, rep.succeeded, rep.failed, rep.attempts.Load(), rep.replays.Load(), rep.executions, rep.serverRequests)
	fmt.Fprintf(stdout, "faults: 503=%d reset=%d fail500=%d drop_after=%d\n",
		rep.faults["503"], rep.faults["reset"], rep.faults["fail500"], rep.faults["drop_after"])
	if firstErr != nil {
		fmt.Fprintln(stdout, "first failure:", firstErr)
	}
	// A failed request may or may not have executed; every successful one
	// must have executed exactly once, and nothing may execute twice.
	if rep.duplicates > 0 || rep.executions < rep.succeeded || rep.executions > rep.requests {
		fmt.Fprintln(stdout, "exactly-once: VIOLATED")
		return errors.New("exactly-once violated")
	}
	fmt.Fprintf(stdout, "exactly-once: ok (%d executions for %d successful requests, no duplicate venue)\n", rep.executions, rep.succeeded)
	if rep.failed > 0 {
		return fmt.Errorf("%d requests failed", rep.failed)
	}
	return nil
}

// createVenue sends one logical request and reports whether its answer
// was a replay.
func createVenue(ctx context.Context, client *http.Client, url string, i int64) (replayed bool, err error) {
	body := fmt.Sprintf(`{"name":"Venue %d","slug":"venue-%d"}`, i, i)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return false, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	var v struct {
		Slug string `json:"slug"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return false, fmt.Errorf("venue %d: status %d, decoding: %w", i, resp.StatusCode, err)
	}
	if resp.StatusCode != http.StatusCreated || v.Slug != fmt.Sprintf("venue-%d", i) {
		return false, fmt.Errorf("venue %d: status %d, slug %q", i, resp.StatusCode, v.Slug)
	}
	res, _ := idemclient.ResultOf(resp)
	return res.Replayed, nil
}

// venueAPI is the server side: venues by slug, and the fault injector.
type venueAPI struct {
	mu             sync.Mutex
	rng            *rand.Rand
	faultRate      float64
	venues         map[string]int
	executions     int64
	duplicates     int64
	serverRequests int64
	faults         map[string]int64
}

func newVenueAPI(faultRate float64, seed uint64) *venueAPI {
	return &venueAPI{
		rng:       rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		faultRate: faultRate,
		venues:    map[string]int{},
		faults:    map[string]int64{},
	}
}

type failKey struct{}

// faulty injects faults around next, the middleware.
func (a *venueAPI) faulty(next http.Handler) http.Handler {
	kinds := []string{"503", "reset", "fail500", "drop_after"}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.serverRequests++
		kind := ""
		if a.rng.Float64() < a.faultRate {
			kind = kinds[a.rng.IntN(len(kinds))]
			a.faults[kind]++
		}
		a.mu.Unlock()
		switch kind {
		case "503":
			http.Error(w, "injected: overloaded", http.StatusServiceUnavailable)
		case "reset":
			if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
				if tcp, ok := conn.(*net.TCPConn); ok {
					tcp.SetLinger(0)
				}
				conn.Close()
			}
		case "fail500":
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), failKey{}, true)))
		case "drop_after":
			// The middleware cannot be hijacked through: it answers into a
			// sink, then the connection is closed unanswered.
			next.ServeHTTP(&sink{header: http.Header{}}, r)
			if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
				conn.Close()
			}
		default:
			next.ServeHTTP(w, r)
		}
	})
}

// create is the handler: one venue per slug.
func (a *venueAPI) create(w http.ResponseWriter, r *http.Request) {
	var in struct {
		Name string `json:"name"`
		Slug string `json:"slug"`
	}
	if err := json.NewDecoder(r.Body).Decode(&in); err != nil || in.Slug == "" {
		http.Error(w, "bad venue", http.StatusBadRequest)
		return
	}
	if r.Context().Value(failKey{}) != nil {
		http.Error(w, "injected: failed before creating", http.StatusInternalServerError)
		return
	}
	a.mu.Lock()
	a.executions++
	a.venues[in.Slug]++
	dup := a.venues[in.Slug] > 1
	if dup {
		a.duplicates++
	}
	a.mu.Unlock()
	if dup {
		http.Error(w, "slug taken", http.StatusConflict)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	json.NewEncoder(w).Encode(in)
}

func (a *venueAPI) counts() (executions, duplicates, serverRequests int64, faults map[string]int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	faults = make(map[string]int64, len(a.faults))
	for k, v := range a.faults {
		faults[k] = v
	}
	return a.executions, a.duplicates, a.serverRequests, faults
}

type sink struct{ header http.Header }

func (s *sink) Header() http.Header         { return s.header }
func (s *sink) WriteHeader(int)             {}
func (s *sink) Write(p []byte) (int, error) { return len(p), nil }
