package main

import (
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/seed70ea8305/idempotency"
)

// parallelFigures are first requests served by one goroutine per CPU at
// once, through the bare handler and through the middleware on the memory
// store, in alternating rounds: wall time per request of each.
type parallelFigures struct {
	goroutines int
	bare, mw   series // µs per request, one value per round
}

// measureParallel runs rounds rounds of k requests per goroutine on each
// side. The root's BenchmarkMemory/first-parallel has no bare counterpart
// run in parallel; this is that pair, interleaved.
func measureParallel(rounds, k int) (parallelFigures, error) {
	g := runtime.GOMAXPROCS(0)
	out := parallelFigures{goroutines: g}
	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxRecords: 0, MaxBytes: -1})
	mw, err := idempotency.New(store, idempotency.Options{})
	if err != nil {
		return out, err
	}
	h := mw.Handler(app)
	var firstErr error
	var mu sync.Mutex
	side := func(serveOne func(key string) error, tag string) float64 {
		var wg sync.WaitGroup
		start := time.Now()
		for w := range g {
			wg.Add(1)
			go func() {
				defer wg.Done()
				prefix := tag + "-" + strconv.Itoa(w) + "-"
				for i := range k {
					if err := serveOne(prefix + strconv.Itoa(i)); err != nil {
						mu.Lock()
						firstErr = err
						mu.Unlock()
						return
					}
				}
			}()
		}
		wg.Wait()
		return float64(time.Since(start).Microseconds()) / float64(g*k)
	}
	for round := range rounds {
		tag := strconv.Itoa(round)
		out.bare = append(out.bare, side(func(key string) error { return serve(app, key) }, "bare-"+tag))
		out.mw = append(out.mw, side(func(key string) error { return serve(h, key) }, "first-"+tag))
		if firstErr != nil {
			return out, firstErr
		}
	}
	return out, nil
}
