package idempotency_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

// memoryRecord is a completed record laid out as the middleware makes
// them: the Record and its Response in one allocation, a header map
// sized for its names, a body grown by append.
func memoryRecord(fingerprint string, body []byte, headers ...string) *idempotency.Record {
	c := &struct {
		rec  idempotency.Record
		resp idempotency.Response
	}{}
	c.resp = idempotency.Response{StatusCode: http.StatusCreated, Body: append([]byte(nil), body...)}
	if len(headers) > 0 {
		c.resp.Header = make(http.Header, len(headers)/2)
		for i := 0; i < len(headers); i += 2 {
			c.resp.Header[headers[i]] = []string{headers[i+1]}
		}
	}
	c.rec.Fingerprint, c.rec.Response = fingerprint, &c.resp
	return &c.rec
}

func memoryClaim(fingerprint string) idempotency.Record {
	return idempotency.Record{Token: rand.Text(), Fingerprint: fingerprint, CreatedAt: time.Now()}
}

// claimBytes is what the store counts for a claim in flight.
func claimBytes(key string, c idempotency.Record) int64 {
	return int64(idempotency.MemoryEntryOverhead + len(key) + len(c.Token) + len(c.Fingerprint))
}

// TestMemoryStoreLimits: at a limit a new key gets 503, while stored keys
// replay and a claim in flight still stores its response; once records
// expire, new keys are taken again.
func TestMemoryStoreLimits(t *testing.T) {
	handler := func(entered, release chan struct{}) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			key := r.Header.Get("Idempotency-Key")
			if key == "slow" {
				close(entered)
				<-release
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusCreated)
			fmt.Fprintf(w, `{"key":%q,"padding":"%0400d"}`, key, 0)
		})
	}
	// What the store holds with "done" completed and "slow" in flight.
	probe := idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxRecords: 0, MaxBytes: -1})
	entered, release := make(chan struct{}), make(chan struct{})
	h := newMiddleware(t, probe).Handler(handler(entered, release))
	require.Equal(t, http.StatusCreated, serve(h, post("done", `{}`)).Code)
	slowDone := make(chan struct{})
	go func() { defer close(slowDone); serve(h, post("slow", `{}`)) }()
	waitFor(t, entered, eventBound, "the handler did not start")
	held := probe.Bytes() // read while "slow" is in flight, before it may complete
	close(release)
	waitFor(t, slowDone, eventBound, "the request did not end")

	for _, tt := range []struct {
		name       string
		maxRecords int
		maxBytes   int64
	}{
		{"records", 2, 0},
		{"bytes", 0, held + 200}, // too little for a third claim
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			store := idempotency.NewMemoryStoreWithClock(clock.Now, idempotency.MemoryOptions{MaxRecords: tt.maxRecords, MaxBytes: tt.maxBytes})
			entered, release := make(chan struct{}), make(chan struct{})
			h := newMiddleware(t, store).Handler(handler(entered, release))

			require.Equal(t, http.StatusCreated, serve(h, post("done", `{}`)).Code)
			slow := make(chan *http.Response, 1)
			go func() { slow <- serve(h, post("slow", `{}`)).Result() }()
			waitFor(t, entered, eventBound, "the handler did not start")

			requireProblem(t, serve(h, post("new", `{}`)), http.StatusServiceUnavailable)
			replay := serve(h, post("done", `{}`))
			assert.Equal(t, http.StatusCreated, replay.Code, "a stored key still replays")
			assert.Equal(t, "true", replay.Header().Get("X-Idempotent-Replayed"))

			close(release)
			res := waitFor(t, slow, eventBound, "the request did not end")
			assert.Equal(t, http.StatusCreated, res.StatusCode, "a claim in flight completes at the limit")
			replay = serve(h, post("slow", `{}`))
			assert.Equal(t, "true", replay.Header().Get("X-Idempotent-Replayed"), "and its response was stored")
			if tt.maxBytes > 0 {
				assert.Greater(t, store.Bytes(), tt.maxBytes, "completions may take the store past its limit")
			}
			requireProblem(t, serve(h, post("new", `{}`)), http.StatusServiceUnavailable)

			clock.Advance(25 * time.Hour) // the default TTL is 24 h
			assert.Equal(t, http.StatusCreated, serve(h, post("new", `{}`)).Code, "expired records made room")
			store.WaitPurge() // what was not needed for room goes in the background
			assert.Equal(t, 1, store.Len())
		})
	}
}

// TestMemoryStoreLimitError: the store's own error says what refused the
// claim, and a refused claim changes nothing.
func TestMemoryStoreLimitError(t *testing.T) {
	ctx := context.Background()
	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxRecords: 1, MaxBytes: -1})
	c := memoryClaim("fp")
	_, _, err := store.Acquire(ctx, "a", c, time.Minute)
	require.NoError(t, err)
	bytes := store.Bytes()
	_, _, err = store.Acquire(ctx, "b", memoryClaim("fp"), time.Minute)
	require.ErrorContains(t, err, "memory store full")
	require.ErrorContains(t, err, "MemoryOptions")
	assert.Equal(t, 1, store.Len())
	assert.Equal(t, bytes, store.Bytes())
	// The key held is not a new record: its duplicate is answered.
	_, existing, err := store.Acquire(ctx, "a", memoryClaim("fp"), time.Minute)
	require.NoError(t, err)
	require.NotNil(t, existing)
	assert.Equal(t, c.Token, existing.Token)
}

// TestMemoryStorePurgeBatchBound: however many records expire at once, a
// purge holds a shard's lock for one batch at a time, and takes them all.
func TestMemoryStorePurgeBatchBound(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	store := idempotency.NewMemoryStoreWithClock(clock.Now)
	var batches, slots, most int
	store.OnPurge(func(n int, _ time.Duration) { // called under a shard's lock, serialized
		batches++
		slots += n
		most = max(most, n)
	})
	const n = 5*idempotency.MemoryPurgeBatch + 123
	for i := range n {
		key := "k" + strconv.Itoa(i)
		c := memoryClaim("fp")
		_, _, err := store.Acquire(ctx, key, c, time.Second)
		require.NoError(t, err)
		if i%2 == 0 {
			require.NoError(t, store.Complete(ctx, key, c.Token, memoryRecord("fp", []byte("ok"), "Content-Type", "text/plain"), time.Minute))
		}
	}
	require.Zero(t, batches, "nothing expired yet")

	clock.Advance(2 * time.Minute)
	c := memoryClaim("fp")
	_, _, err := store.Acquire(ctx, "trigger", c, time.Second)
	require.NoError(t, err)
	store.WaitPurge()

	assert.LessOrEqual(t, most, idempotency.MemoryPurgeBatch, "slots taken in one hold of the lock")
	assert.GreaterOrEqual(t, batches, n/idempotency.MemoryPurgeBatch)
	assert.Equal(t, n, slots, "one slot per entry: a completion, which ends later than its claim, adds none")
	assert.Equal(t, 1, store.Len(), "only the new claim is left")
	assert.Equal(t, claimBytes("trigger", c), store.Bytes())
}

// TestMemoryStoreBytesReturnToZero: every kind of record counts bytes
// while held and gives them back when it expires or is freed.
func TestMemoryStoreBytesReturnToZero(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	store := idempotency.NewMemoryStoreWithClock(clock.Now)
	acquire := func(key, fingerprint string) idempotency.Record {
		t.Helper()
		c := memoryClaim(fingerprint)
		fence, _, err := store.Acquire(ctx, key, c, time.Second)
		require.NoError(t, err)
		require.NotZero(t, fence)
		return c
	}

	c := acquire("released", "fp")
	assert.Equal(t, claimBytes("released", c), store.Bytes(), "a claim counts its key, token and fingerprint")
	require.NoError(t, store.Release(ctx, "released", c.Token))
	assert.Zero(t, store.Bytes(), "a released claim gives its bytes back")

	c = acquire("completed", "fp")
	require.NoError(t, store.Complete(ctx, "completed", c.Token, memoryRecord("fp", make([]byte, 1000), "Content-Type", "application/json"), time.Hour))
	assert.Greater(t, store.Bytes(), int64(1000+idempotency.MemoryEntryOverhead+idempotency.MemoryHeaderMapOverhead))
	acquire("lapsing", "fp")
	c = acquire("suspended", "fp")
	require.NoError(t, store.Checkpoint(ctx, "suspended", c.Token, "half", make([]byte, 500), 2*time.Hour))
	require.NoError(t, store.Release(ctx, "suspended", c.Token))
	c = acquire("failed", "fp")
	_, err := store.Fail(ctx, "failed", c.Token, "boom", 3*time.Hour)
	require.NoError(t, err)
	c = acquire("resumed", "fp")
	require.NoError(t, store.Checkpoint(ctx, "resumed", c.Token, "one", []byte("1"), time.Hour))
	clock.Advance(2 * time.Second)
	fence, resumed, err := store.Acquire(ctx, "resumed", memoryClaim("fp"), time.Minute)
	require.NoError(t, err)
	require.NotZero(t, fence)
	require.Equal(t, "one", resumed.RecoveryPoint)
	c = acquire("failed", "fp") // a failure history and a new claim
	require.NoError(t, store.Complete(ctx, "failed", c.Token, memoryRecord("fp", []byte("ok")), 4*time.Hour))
	store.WaitPurge()
	assert.Equal(t, 4, store.Len(), "the lapsed claim was purged, the others are held")

	for _, d := range []time.Duration{time.Minute, time.Hour, time.Hour, time.Hour, time.Hour} {
		clock.Advance(d)
		c = acquire("tick", "fp") // each claim purges what expired
		require.NoError(t, store.Release(ctx, "tick", c.Token))
		store.WaitPurge()
	}
	assert.Zero(t, store.Len())
	assert.Zero(t, store.Bytes())
}

// TestMemoryStoreGet: Get reads a record in every state without claiming
// it, and never an expired one.
func TestMemoryStoreGet(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	store := idempotency.NewMemoryStoreWithClock(clock.Now)
	get := func(key string) *idempotency.Record {
		t.Helper()
		rec, err := store.Get(ctx, key)
		require.NoError(t, err)
		return rec
	}
	assert.Nil(t, get("missing"))

	c := memoryClaim("fp")
	_, _, err := store.Acquire(ctx, "k", c, time.Minute)
	require.NoError(t, err)
	rec := get("k")
	require.NotNil(t, rec)
	assert.Equal(t, c.Token, rec.Token, "in flight")
	assert.Equal(t, "fp", rec.Fingerprint)
	assert.Equal(t, time.Minute, rec.LeaseLeft)
	assert.True(t, c.CreatedAt.Equal(rec.CreatedAt))
	assert.Nil(t, rec.Response)

	data := []byte("ch_1")
	require.NoError(t, store.Checkpoint(ctx, "k", c.Token, "charged", data, time.Hour))
	data[0] = 'X' // the store kept a copy
	clock.Advance(2 * time.Minute)
	rec = get("k")
	require.NotNil(t, rec, "suspended once its lease lapsed")
	assert.Empty(t, rec.Token, "a suspended record has no owner")
	assert.Zero(t, rec.LeaseLeft)
	assert.Equal(t, "charged", rec.RecoveryPoint)
	assert.Equal(t, []byte("ch_1"), rec.RecoveryData)
	assert.ErrorIs(t, store.Extend(ctx, "k", c.Token, time.Minute), idempotency.ErrLeaseLost, "the lapsed owner")

	c = memoryClaim("fp")
	fence, _, err := store.Acquire(ctx, "k", c, time.Minute)
	require.NoError(t, err)
	require.NotZero(t, fence)
	done := memoryRecord("fp", []byte("ok"))
	require.NoError(t, store.Complete(ctx, "k", c.Token, done, time.Hour))
	assert.Same(t, done, get("k"), "completed, as stored")
	assert.Empty(t, done.RecoveryPoint, "completion drops the recovery point")
	assert.NoError(t, store.Complete(ctx, "k", c.Token, memoryRecord("fp", []byte("again")), time.Hour), "a repeated completion")
	assert.ErrorIs(t, store.Complete(ctx, "k", "other", memoryRecord("fp", []byte("x")), time.Hour), idempotency.ErrLeaseLost)
	assert.Same(t, done, get("k"))

	clock.Advance(time.Hour)
	assert.Nil(t, get("k"), "expired")
}

// TestMemoryStoreScale measures the store at 1,000,000 records (or as
// many as IDEMPOTENCY_MEMORY_SCALE says, when more than 1): live heap per
// record, then the purge of all of them at once: the longest hold of the
// store's lock and the longest wait of a claim made meanwhile.
//
//	IDEMPOTENCY_MEMORY_SCALE=1 go test -run TestMemoryStoreScale -v .
func TestMemoryStoreScale(t *testing.T) {
	scale := os.Getenv("IDEMPOTENCY_MEMORY_SCALE")
	if scale == "" {
		t.Skip("set IDEMPOTENCY_MEMORY_SCALE=1 to measure 1,000,000 records")
	}
	if raceEnabled {
		t.Skip("the race detector changes what is measured")
	}
	n := 1_000_000
	if v, err := strconv.Atoi(scale); err == nil && v > 1 {
		n = v
	}
	for _, headers := range [][]string{nil, {"Content-Type", "application/json"}} {
		t.Run(fmt.Sprintf("headers=%d", len(headers)/2), func(t *testing.T) {
			ctx := context.Background()
			clock := newFakeClock()
			store := idempotency.NewMemoryStoreWithClock(clock.Now, idempotency.MemoryOptions{MaxRecords: 0, MaxBytes: -1})
			body := make([]byte, 100)
			before := liveHeap()
			start := time.Now()
			for i := range n {
				clock.Advance(time.Millisecond)        // 1,000 a second: leases end as they would
				key := fmt.Sprintf(`http:"":%036d`, i) // as long as the middleware's for a UUID
				c := idempotency.Record{Token: rand.Text(), Fingerprint: fmt.Sprintf("%064x", i), CreatedAt: clock.Now()}
				_, _, err := store.Acquire(ctx, key, c, 30*time.Second)
				require.NoError(t, err)
				require.NoError(t, store.Complete(ctx, key, c.Token, memoryRecord(c.Fingerprint, body, headers...), 24*time.Hour))
			}
			took := time.Since(start)
			live := liveHeap() - before
			t.Logf("%d records (Acquire+Complete) in %v: live heap %.1f B/record (%.0f MiB), counted %.1f B/record",
				n, took.Round(time.Millisecond), float64(live)/float64(n), float64(live)/(1<<20), float64(store.Bytes())/float64(n))
			require.Equal(t, n, store.Len())

			var mu sync.Mutex
			var holds []time.Duration
			most := 0
			store.OnPurge(func(slots int, held time.Duration) {
				mu.Lock()
				holds = append(holds, held)
				most = max(most, slots)
				mu.Unlock()
			})
			clock.Advance(24*time.Hour + time.Second)
			stop := make(chan struct{})
			type claims struct {
				made    int
				longest time.Duration
			}
			waited := make(chan claims)
			go func() { // a client making claims meanwhile
				var longest time.Duration
				for i := 0; ; i++ {
					select {
					case <-stop:
						waited <- claims{i, longest}
						return
					default:
					}
					c := memoryClaim("fp")
					start := time.Now()
					_, _, err := store.Acquire(ctx, "new-"+strconv.Itoa(i), c, 30*time.Second)
					longest = max(longest, time.Since(start))
					assert.NoError(t, err)
					time.Sleep(50 * time.Microsecond)
				}
			}()
			start = time.Now()
			_, _, err := store.Acquire(ctx, "trigger", memoryClaim("fp"), 30*time.Second)
			require.NoError(t, err)
			store.WaitPurge()
			took = time.Since(start)
			close(stop)
			meanwhile := <-waited

			mu.Lock()
			var longest, total time.Duration
			for _, d := range holds {
				longest = max(longest, d)
				total += d
			}
			mu.Unlock()
			t.Logf("purge of %d expired records: %v, %d lock holds of at most %d slots, longest hold %v, %v held in all; longest concurrent Acquire %v",
				n, took.Round(time.Millisecond), len(holds), most, longest, total.Round(time.Millisecond), meanwhile.longest)
			t.Logf("left: %d records (the claims made meanwhile), %d bytes counted, live heap %.1f MiB over the start",
				store.Len(), store.Bytes(), float64(liveHeap()-before)/(1<<20))
			assert.LessOrEqual(t, most, idempotency.MemoryPurgeBatch)
			assert.Equal(t, meanwhile.made+1, store.Len(), "only the claims made meanwhile are left")
			left := claimBytes("trigger", memoryClaim("fp"))
			for i := range meanwhile.made {
				left += claimBytes("new-"+strconv.Itoa(i), memoryClaim("fp"))
			}
			assert.Equal(t, left, store.Bytes(), "the expired records gave back their bytes")
		})
	}
}

func liveHeap() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// TestMemoryStoreExpiredMakeRoomAnywhere: at a limit, what has expired in
// any shard makes room before a claim is refused, within the claim: every
// new key is taken at once, whichever shard holds it, with no background
// purge waited for.
func TestMemoryStoreExpiredMakeRoomAnywhere(t *testing.T) {
	ctx := context.Background()
	for _, tt := range []struct {
		name string
		opts idempotency.MemoryOptions
	}{
		{"records", idempotency.MemoryOptions{MaxRecords: 200, MaxBytes: -1}},
		{"bytes", idempotency.MemoryOptions{MaxBytes: 200 * claimBytes("old-000", memoryClaim("fp"))}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			store := idempotency.NewMemoryStoreWithClock(clock.Now, tt.opts)
			for i := range 200 {
				_, _, err := store.Acquire(ctx, fmt.Sprintf("old-%03d", i), memoryClaim("fp"), time.Second)
				require.NoError(t, err)
			}
			_, _, err := store.Acquire(ctx, "new-000", memoryClaim("fp"), time.Second)
			require.ErrorContains(t, err, "memory store full", "nothing has expired yet")

			clock.Advance(2 * time.Second)
			for i := range 200 {
				_, _, err := store.Acquire(ctx, fmt.Sprintf("new-%03d", i), memoryClaim("fp"), time.Minute)
				require.NoError(t, err, "claim %d", i)
			}
			_, _, err = store.Acquire(ctx, "new-200", memoryClaim("fp"), time.Minute)
			require.ErrorContains(t, err, "memory store full", "nothing more has expired")
			store.WaitPurge()
			assert.Equal(t, 200, store.Len())
		})
	}
}

// TestMemoryStoreLimitsUnderConcurrency: claims racing in every shard
// together take no more than the limit: exactly MaxRecords of them win.
func TestMemoryStoreLimitsUnderConcurrency(t *testing.T) {
	ctx := context.Background()
	const limit, claims = 100, 400
	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{MaxRecords: limit, MaxBytes: -1})
	var wg sync.WaitGroup
	var mu sync.Mutex
	won := 0
	start := make(chan struct{})
	for i := range claims {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			_, _, err := store.Acquire(ctx, "k"+strconv.Itoa(i), memoryClaim("fp"), time.Minute)
			if err == nil {
				mu.Lock()
				won++
				mu.Unlock()
			}
		}()
	}
	close(start)
	wg.Wait()
	assert.Equal(t, limit, won)
	assert.Equal(t, limit, store.Len())
}
