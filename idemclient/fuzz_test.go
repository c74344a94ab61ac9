package idemclient_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency/idemclient"
)

// maxFaults bounds a fault schedule; the client may make one attempt more.
const maxFaults = 8

// expect models the server: what the caller must see after the schedule
// of faults, as the attempt that answers, and whether it is a replay.
func expect(faults []fault) (attempts int, replayed bool) {
	executed := false
	for i, f := range faults {
		switch f {
		case faultNone:
			return i + 1, executed
		case faultFail:
			if executed { // the middleware replays before the handler runs
				return i + 1, true
			}
		case faultDropAfter:
			executed = true
		}
	}
	return len(faults) + 1, executed
}

// faultTable holds one schedule per key, for servers shared by many
// logical requests.
type faultTable struct {
	mu sync.Mutex
	m  map[string][]fault
}

func (ft *faultTable) lookup(key string, n int) fault {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	if f := ft.m[key]; n < len(f) {
		return f[n]
	}
	return faultNone
}

func (ft *faultTable) set(key string, faults []fault) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	ft.m[key] = faults
}

// exactlyOnceServer starts a server whose faults come from a table keyed
// by idempotency key, and a client for it that never waits.
func exactlyOnceServer(t testing.TB) (*server, *faultTable, *http.Client) {
	s := newServer(t, nil)
	table := &faultTable{m: map[string][]fault{}}
	s.schedule = table.lookup
	c, err := idemclient.NewClient(freshConns(),
		idemclient.WithMaxAttempts(maxFaults+1),
		idemclient.WithClock(time.Now, noSleep),
	)
	require.NoError(t, err)
	t.Cleanup(c.CloseIdleConnections)
	return s, table, c
}

func noSleep(ctx context.Context, _ time.Duration) error { return ctx.Err() }

// runSchedule sends one logical request under a fresh key through faults.
func runSchedule(t *testing.T, s *server, table *faultTable, c *http.Client, id uint64, faults []fault) {
	t.Helper()
	key := fmt.Sprintf("req-%d", id)
	table.set(key, faults)
	ctx := idemclient.ContextWithKey(context.Background(), key)
	status, body, res := create(t, ctx, c, s.URL, fmt.Sprintf(`{"name":"Venue %d"}`, id))
	assertOnce(t, s, status, body, res)
	attempts, replayed := expect(faults)
	require.Equal(t, attempts, res.Attempts, "faults %v", faults)
	require.Equal(t, replayed, res.Replayed, "faults %v", faults)
}

// TestExactlyOnceUnderRandomFaults runs logical requests in parallel,
// each through a random schedule of faults drawn from a fixed seed.
func TestExactlyOnceUnderRandomFaults(t *testing.T) {
	s, table, c := exactlyOnceServer(t)
	rng := rand.New(rand.NewPCG(13, 42))
	schedules := make([][]fault, 120)
	for i := range schedules {
		faults := make([]fault, rng.IntN(maxFaults+1))
		for j := range faults {
			faults[j] = fault(1 + rng.IntN(int(numFaults)-1))
		}
		schedules[i] = faults
	}
	t.Run("requests", func(t *testing.T) {
		for i, faults := range schedules {
			t.Run(fmt.Sprint(i), func(t *testing.T) {
				t.Parallel()
				runSchedule(t, s, table, c, uint64(i), faults)
			})
		}
	})
	require.EqualValues(t, len(schedules), s.runs.Load(), "one execution per logical request")
}

// FuzzExactlyOnce: whatever the faults, one execution and the original
// response. Each byte of the input is one fault.
func FuzzExactlyOnce(f *testing.F) {
	for _, seed := range [][]byte{
		{}, {1}, {2, 2}, {3}, {4}, {3, 2}, {1, 3, 4, 2}, {2, 3, 1, 4, 3, 2, 1, 4},
	} {
		f.Add(seed)
	}
	s, table, c := exactlyOnceServer(f)
	var id uint64
	var mu sync.Mutex
	f.Fuzz(func(t *testing.T, schedule []byte) {
		if len(schedule) > maxFaults {
			schedule = schedule[:maxFaults]
		}
		faults := make([]fault, len(schedule))
		for i, b := range schedule {
			faults[i] = fault(b % byte(numFaults))
		}
		mu.Lock()
		id++
		n := id
		mu.Unlock()
		runSchedule(t, s, table, c, n, faults)
	})
}
