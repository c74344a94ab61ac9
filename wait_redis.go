package idempotency

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// watch implements waker with pub/sub: the write scripts publish on the
// record's channel (named as its key, so it hashes to the key's slot),
// and the store's hub delivers the message to the waiters on it.
func (s *RedisStore) watch(ctx context.Context, key string) (<-chan struct{}, func(), error) {
	if s.publish == "" {
		return nil, nil, errors.ErrUnsupported
	}
	channel := s.redisKey(key)
	var client *redis.Client
	var addr string
	switch c := s.client.(type) {
	case *redis.Client:
		client = c
	case *redis.ClusterClient:
		// Sharded pub/sub: the subscription goes to the master of the
		// channel's slot, where SPUBLISH delivers it.
		node, err := c.MasterForKey(ctx, channel)
		if err != nil {
			return nil, nil, err
		}
		client, addr = node, node.Options().Addr
	default:
		return nil, nil, errors.ErrUnsupported
	}
	return s.hub.watch(ctx, client, addr, channel)
}

// redisHub shares pub/sub connections among the waiters of one
// [RedisStore]: one connection per server (per master node on a Cluster)
// and one goroutine reading it, opened when the first waiter comes and
// closed when the last leaves, so an idle store holds neither. Channels
// are subscribed while someone waits on them.
type redisHub struct {
	store *RedisStore
	mu    sync.Mutex
	conns map[string]*hubConn // by node address; "" for a single server
}

// hubConn is one pub/sub connection and the waiters it serves. Its fields
// are guarded by the hub's mutex, except ps, which is safe on its own.
type hubConn struct {
	hub     *redisHub
	addr    string
	ps      *redis.PubSub
	sharded bool
	waiting waiters                  // by channel
	ready   map[string]chan struct{} // closed once the channel's subscription is confirmed
	n       int                      // waiters
	done    chan struct{}            // closed when the last waiter left
}

func (h *redisHub) watch(ctx context.Context, client *redis.Client, addr, channel string) (<-chan struct{}, func(), error) {
	h.mu.Lock()
	hc := h.conns[addr]
	if hc == nil {
		hc = &hubConn{hub: h, addr: addr, sharded: h.store.publish == "spublish", ready: make(map[string]chan struct{}), done: make(chan struct{})}
		// Neither call connects; the first subscription does.
		if hc.sharded {
			hc.ps = client.SSubscribe(context.WithoutCancel(ctx))
		} else {
			hc.ps = client.Subscribe(context.WithoutCancel(ctx))
		}
		if h.conns == nil {
			h.conns = make(map[string]*hubConn)
		}
		h.conns[addr] = hc
		go hc.receive()
	}
	hc.n++
	ch := hc.waiting.add(channel)
	ready, subscribed := hc.ready[channel]
	if !subscribed {
		ready = make(chan struct{})
		hc.ready[channel] = ready
	}
	h.mu.Unlock()

	stop := func() { h.leave(hc, channel, ch) }
	if !subscribed {
		if err := hc.subscribe(ctx, channel); err != nil {
			stop()
			return nil, nil, err
		}
	}
	// Only a confirmed subscription is sure to see a later publish.
	select {
	case <-ready:
		return ch, stop, nil
	case <-ctx.Done():
		stop()
		return nil, nil, context.Cause(ctx)
	}
}

// leave unregisters a waiter; the last one on a channel unsubscribes it,
// the last one on the connection closes it (which ends its goroutine).
func (h *redisHub) leave(hc *hubConn, channel string, ch chan struct{}) {
	h.mu.Lock()
	hc.n--
	last := hc.waiting.remove(channel, ch)
	if last {
		delete(hc.ready, channel)
	}
	idle := hc.n == 0
	if idle {
		delete(h.conns, hc.addr)
		close(hc.done)
	}
	h.mu.Unlock()
	switch {
	case idle:
		_ = hc.ps.Close()
	case last:
		// It may race with a new waiter's subscription to the same
		// channel; receive repairs that (see confirmed).
		if hc.sharded {
			_ = hc.ps.SUnsubscribe(context.Background(), channel)
		} else {
			_ = hc.ps.Unsubscribe(context.Background(), channel)
		}
	}
}

func (hc *hubConn) subscribe(ctx context.Context, channel string) error {
	if hc.sharded {
		return hc.ps.SSubscribe(ctx, channel)
	}
	return hc.ps.Subscribe(ctx, channel)
}

// Backoff of the receive loop while the connection fails; go-redis
// reconnects and subscribes again on the next receive.
const (
	hubMinBackoff = 10 * time.Millisecond
	hubMaxBackoff = time.Second
)

// receive reads the connection until the hub closes it, waking the
// waiters of each channel that a message arrives on.
func (hc *hubConn) receive() {
	ctx := context.Background()
	backoff := hubMinBackoff
	for {
		msg, err := hc.ps.Receive(ctx)
		if err != nil {
			select {
			case <-hc.done:
				return
			default:
			}
			t := time.NewTimer(backoff)
			select {
			case <-hc.done:
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(2*backoff, hubMaxBackoff)
			continue
		}
		backoff = hubMinBackoff
		switch m := msg.(type) {
		case *redis.Message:
			hc.hub.mu.Lock()
			hc.waiting.wake(m.Channel)
			hc.hub.mu.Unlock()
		case *redis.Subscription:
			hc.confirmed(m)
		}
	}
}

// confirmed handles the server's answer to a (un)subscription.
func (hc *hubConn) confirmed(m *redis.Subscription) {
	hc.hub.mu.Lock()
	ready, wanted := hc.ready[m.Channel]
	switch m.Kind {
	case "subscribe", "ssubscribe":
		if !wanted {
			break
		}
		select {
		case <-ready:
			// Subscribed again (go-redis reconnected, or a repair
			// below): a message may have been lost meanwhile, so the
			// waiters re-read.
			hc.waiting.wake(m.Channel)
		default:
			close(ready)
		}
		hc.hub.mu.Unlock()
		return
	}
	hc.hub.mu.Unlock()
	// An unsubscription (ours, or the server's after a slot moved) of a
	// channel someone waits on again: subscribe once more; its
	// confirmation wakes the waiters to re-read.
	if wanted {
		_ = hc.subscribe(context.Background(), m.Channel)
	}
}
