package lincheck

import (
	"context"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/seed70ea8305/idempotency"
)

// Workload is what the clients of a recorded history do. Each client
// loops until the context given to [Workload.Run] ends or MaxOps
// operations are recorded: it acquires one of the current round's keys;
// when it claims the key it renews the lease up to twice, works, then
// completes the key with a response of its own (repeating the call once
// if it failed, as a client library re-sends a call whose reply it lost)
// or releases it; when it finds the key taken, it reads it (and waits up
// to Retry before its next iteration). After an Acquire that failed it
// releases the token at once, as the middleware takes back a claim that
// may have landed. A client that lost its lease still tries its Complete
// (which the store must refuse) or Release (which the store must refuse
// when another owner holds the key, and may accept when none does).
//
// Rounds of RoundSize acquires use fresh keys, so that clients keep
// contending instead of finding every key completed, and each key's
// history stays short for the checker.
//
// The zero value is ready: every field has a default.
type Workload struct {
	// Clients is the number of concurrent clients. Default: 8.
	Clients int
	// Keys is the number of keys per round. Default: 3.
	Keys int
	// RoundSize is the number of acquires per round. Default: 40.
	RoundSize int
	// KeyPrefix starts every key. Default: "" (keys are "r<round>/k<i>").
	KeyPrefix string
	// Lease is the lease of each claim and renewal. Default: 1 s.
	Lease time.Duration
	// TTL is the TTL of each completed record. Default: 1 h.
	TTL time.Duration
	// Timeout bounds each store call. Default: 1 s.
	Timeout time.Duration
	// MaxWork is the longest a client works before each renewal and
	// before the outcome, a uniformly random time: with MaxWork beyond
	// Lease/3 leases lapse. Default: Lease/100.
	MaxWork time.Duration
	// MaxOps stops the clients once this many operations are recorded.
	// Default: 20,000.
	MaxOps int
	// Retry is the longest a client that found its key taken waits, a
	// uniformly random time, before its next iteration, as a client
	// answered 409 tries again later. Without it such clients go on at
	// once, and rounds pass as fast as the store answers: keys are then
	// seldom claimed again after a lease lapsed. Default: 0.
	Retry time.Duration
	// Pause, if set, is called by a client after a store call failed
	// (other than with ErrLeaseLost), and the client goes on when it
	// returns: a fault injector's way of keeping the operations of unknown
	// outcome few, which keeps the check fast. Default: none.
	Pause func(ctx context.Context)
}

// fingerprints are the requests the clients claim keys for: two, so that
// a record's fingerprint is checked too.
var fingerprints = [...]string{"fp-a", "fp-b"}

// Run runs the workload's clients against store, recording in rec, until
// ctx ends or MaxOps operations are recorded, and returns when every
// client has finished its iteration. Store calls get their own deadline
// (Timeout) and are not cancelled when ctx ends.
func (w Workload) Run(ctx context.Context, store idempotency.Store, rec *Recorder) {
	w.defaults()
	var iterations atomic.Int64
	var wg sync.WaitGroup
	for id := range w.Clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := worker{w: &w, c: rec.Client(id, store), id: id}
			for ctx.Err() == nil && rec.Len() < w.MaxOps {
				round := (iterations.Add(1) - 1) / int64(w.RoundSize)
				key := fmt.Sprintf("%sr%d/k%d", w.KeyPrefix, round, mrand.IntN(w.Keys))
				c.iteration(ctx, key)
			}
		}()
	}
	wg.Wait()
}

func (w *Workload) defaults() {
	if w.Clients <= 0 {
		w.Clients = 8
	}
	if w.Keys <= 0 {
		w.Keys = 3
	}
	if w.RoundSize <= 0 {
		w.RoundSize = 40
	}
	if w.Lease <= 0 {
		w.Lease = time.Second
	}
	if w.TTL <= 0 {
		w.TTL = time.Hour
	}
	if w.Timeout <= 0 {
		w.Timeout = time.Second
	}
	if w.MaxWork <= 0 {
		w.MaxWork = w.Lease / 100
	}
	if w.MaxOps <= 0 {
		w.MaxOps = 20000
	}
}

// worker is one client of a workload.
type worker struct {
	w      *Workload
	c      *Client
	id     int
	failed bool // a call of this iteration failed: pause after it
	n      int  // responses made, to name each
}

// iteration claims key and completes or releases it, or reads it.
func (k *worker) iteration(ctx context.Context, key string) {
	k.failed = false
	defer func() {
		if k.failed && k.w.Pause != nil {
			k.w.Pause(ctx)
		}
	}()
	claim := idempotency.Record{Token: rand.Text(), Fingerprint: fingerprints[mrand.IntN(len(fingerprints))], CreatedAt: time.Now()}
	var fence uint64
	err := k.call(ctx, func(ctx context.Context) error {
		var err error
		fence, _, err = k.c.Acquire(ctx, key, claim, k.w.Lease)
		return err
	})
	switch {
	case err != nil:
		k.call(ctx, func(ctx context.Context) error { return k.c.Release(ctx, key, claim.Token) })
		return
	case fence == 0:
		if k.c.CanRead() {
			k.call(ctx, func(ctx context.Context) error { _, err := k.c.Get(ctx, key); return err })
		}
		k.sleep(ctx, k.w.Retry)
		return
	}
	for range mrand.IntN(3) {
		k.work(ctx)
		if k.call(ctx, func(ctx context.Context) error { return k.c.Extend(ctx, key, claim.Token, k.w.Lease) }) != nil {
			break
		}
	}
	k.work(ctx)
	if mrand.IntN(10) < 4 {
		k.call(ctx, func(ctx context.Context) error { return k.c.Release(ctx, key, claim.Token) })
		return
	}
	k.n++
	done := &idempotency.Record{Fingerprint: claim.Fingerprint, CreatedAt: claim.CreatedAt, Response: &idempotency.Response{
		StatusCode: 200 + mrand.IntN(2),
		Body:       fmt.Appendf(nil, "client %d response %d (fence %d)", k.id, k.n, fence),
	}}
	complete := func(ctx context.Context) error { return k.c.Complete(ctx, key, claim.Token, done, k.w.TTL) }
	if err := k.call(ctx, complete); err != nil && outcome(err) == Unknown {
		k.call(ctx, complete) // re-sent: must succeed if the first landed
	}
}

// call runs a store call with its own deadline, not cancelled with ctx,
// and notes a failure other than a lost lease.
func (k *worker) call(ctx context.Context, op func(ctx context.Context) error) error {
	callCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), k.w.Timeout)
	defer cancel()
	err := op(callCtx)
	if err != nil && outcome(err) == Unknown {
		k.failed = true
	}
	return err
}

// work stands for the work a claim protects: load, not synchronisation.
func (k *worker) work(ctx context.Context) { k.sleep(ctx, k.w.MaxWork) }

// sleep waits a uniformly random time up to most, or until ctx ends.
func (k *worker) sleep(ctx context.Context, most time.Duration) {
	if most <= 0 {
		return
	}
	d := time.Duration(mrand.Int64N(int64(most) + 1))
	if d == 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}
