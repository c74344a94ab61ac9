package lincheck

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/seed70ea8305/idempotency"
)

// Recorder records the calls clients make to a store as a history for
// [Check]: each call's input and answer, and the times, on one monotonic
// clock, at which it was made and answered. It is safe for concurrent use;
// create it with [NewRecorder].
type Recorder struct {
	origin time.Time

	mu  sync.Mutex
	ops []porcupine.Operation
}

// NewRecorder returns a Recorder whose clock starts now.
func NewRecorder() *Recorder {
	return &Recorder{origin: time.Now()}
}

// Time returns t on the history's clock: nanoseconds since the Recorder
// was made, by the monotonic clock.
func (r *Recorder) Time(t time.Time) int64 { return int64(t.Sub(r.origin)) }

func (r *Recorder) now() int64 { return int64(time.Since(r.origin)) }

// Len returns the number of operations recorded so far.
func (r *Recorder) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.ops)
}

// Add records an operation of client made at in.Call and answered with
// out at out.Return. The [Client]'s methods call it; a test records a
// hand-written history with it.
func (r *Recorder) Add(client int, in Input, out Output) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ops = append(r.ops, porcupine.Operation{ClientId: client, Input: in, Call: in.Call, Output: out, Return: out.Return})
}

// History returns the operations recorded so far, in the order they were
// recorded. Those whose outcome is unknown return at the end of the
// history, after every other answer, as porcupine treats an operation that
// may or may not have taken effect: the checker may place it anywhere
// after its call, or nowhere that matters.
func (r *Recorder) History() []porcupine.Operation {
	r.mu.Lock()
	ops := append([]porcupine.Operation(nil), r.ops...)
	r.mu.Unlock()
	var end int64
	for _, op := range ops {
		end = max(end, op.Return+1)
	}
	for i := range ops {
		if ops[i].Output.(Output).Outcome == Unknown {
			ops[i].Return = end
		}
	}
	return ops
}

// Client calls a store and records each call in its Recorder. It is as
// safe for concurrent use as its store, but a client is one sequence of
// calls in the visualization: give each goroutine its own.
type Client struct {
	rec    *Recorder
	id     int
	store  idempotency.Store
	reader idempotency.Inspector // nil when the store cannot read
}

// Client returns a client, numbered id (from 0), that calls store.
func (r *Recorder) Client(id int, store idempotency.Store) *Client {
	reader, _ := store.(idempotency.Inspector)
	return &Client{rec: r, id: id, store: store, reader: reader}
}

// CanRead reports whether the store implements [idempotency.Inspector].
func (c *Client) CanRead() bool { return c.reader != nil }

// Acquire calls the store's Acquire and records it, with ctx's deadline.
// A record returned with a claim (a resumed recovery point) is not
// recorded: the model has none.
func (c *Client) Acquire(ctx context.Context, key string, claim idempotency.Record, lease time.Duration) (uint64, *idempotency.Record, error) {
	in := Input{Op: Acquire, Key: key, Token: claim.Token, Fingerprint: claim.Fingerprint, Lease: lease}
	if deadline, ok := ctx.Deadline(); ok {
		in.Deadline = c.rec.Time(deadline)
	}
	in.Call = c.rec.now()
	fence, existing, err := c.store.Acquire(ctx, key, claim, lease)
	out := Output{Outcome: outcome(err), Return: c.rec.now()}
	if err == nil {
		out.Fence = fence
		if fence == 0 {
			out.Found = recordOf(existing)
		}
	}
	c.rec.Add(c.id, in, out)
	return fence, existing, err
}

// Extend calls the store's Extend and records it.
func (c *Client) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	in := Input{Op: Extend, Key: key, Token: token, Lease: lease, Call: c.rec.now()}
	err := c.store.Extend(ctx, key, token, lease)
	c.rec.Add(c.id, in, Output{Outcome: outcome(err), Return: c.rec.now()})
	return err
}

// Complete calls the store's Complete and records it. The model compares
// the response's status and body.
func (c *Client) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	in := Input{Op: Complete, Key: key, Token: token, Fingerprint: rec.Fingerprint, TTL: ttl, Call: c.rec.now()}
	if rec.Response != nil {
		in.Response = Response{Status: rec.Response.StatusCode, Body: string(rec.Response.Body)}
	}
	err := c.store.Complete(ctx, key, token, rec, ttl)
	c.rec.Add(c.id, in, Output{Outcome: outcome(err), Return: c.rec.now()})
	return err
}

// Release calls the store's Release and records it.
func (c *Client) Release(ctx context.Context, key, token string) error {
	in := Input{Op: Release, Key: key, Token: token, Call: c.rec.now()}
	err := c.store.Release(ctx, key, token)
	c.rec.Add(c.id, in, Output{Outcome: outcome(err), Return: c.rec.now()})
	return err
}

// Get calls the store's Get ([idempotency.Inspector]) and records it; it
// returns an error wrapping [errors.ErrUnsupported] when the store cannot
// read. A Get that failed is not recorded: a read whose answer is unknown
// tells the checker nothing, and only widens its search.
func (c *Client) Get(ctx context.Context, key string) (*idempotency.Record, error) {
	if c.reader == nil {
		return nil, errors.ErrUnsupported
	}
	in := Input{Op: Get, Key: key, Call: c.rec.now()}
	rec, err := c.reader.Get(ctx, key)
	if err == nil {
		c.rec.Add(c.id, in, Output{Outcome: OK, Found: recordOf(rec), Return: c.rec.now()})
	}
	return rec, err
}

// outcome classifies a store call's error: ErrLeaseLost changed nothing,
// any other error may or may not have taken effect.
func outcome(err error) Outcome {
	switch {
	case err == nil:
		return OK
	case errors.Is(err, idempotency.ErrLeaseLost):
		return LeaseLost
	}
	return Unknown
}

// recordOf returns the part of rec the model compares.
func recordOf(rec *idempotency.Record) Record {
	switch {
	case rec == nil:
		return Record{}
	case rec.Response != nil:
		return Record{State: Completed, Fingerprint: rec.Fingerprint,
			Response: Response{Status: rec.Response.StatusCode, Body: string(rec.Response.Body)}}
	case rec.Token != "":
		return Record{State: InFlight, Token: rec.Token, Fingerprint: rec.Fingerprint}
	}
	return Record{State: Suspended, Fingerprint: rec.Fingerprint}
}
