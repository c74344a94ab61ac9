package faultproxy_test

import (
	"bufio"
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/seed70ea8305/idempotency/internal/faultproxy"
)

// TestMain checks that Close stops every goroutine the proxy started.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echoServer answers every line with the same line.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	conns := make(chan net.Conn, 16)
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns <- c
			go func() {
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						c.Close()
						return
					}
					c.Write([]byte(line))
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		close(conns)
		for c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

func start(t *testing.T) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.Start(echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

type client struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, p *faultproxy.Proxy) *client {
	t.Helper()
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &client{t: t, c: c, r: bufio.NewReader(c)}
}

// roundTrip sends line and returns the answer, how long it took and the
// error reading it.
func (c *client) roundTrip(line string, timeout time.Duration) (string, time.Duration, error) {
	c.t.Helper()
	start := time.Now()
	c.c.SetDeadline(start.Add(timeout))
	if _, err := c.c.Write([]byte(line + "\n")); err != nil {
		return "", time.Since(start), err
	}
	got, err := c.r.ReadString('\n')
	if len(got) > 0 {
		got = got[:len(got)-1]
	}
	return got, time.Since(start), err
}

func mustRoundTrip(c *client, line string) time.Duration {
	c.t.Helper()
	got, took, err := c.roundTrip(line, 5*time.Second)
	if err != nil || got != line {
		c.t.Fatalf("round trip %q: got %q, %v", line, got, err)
	}
	return took
}

func TestForwards(t *testing.T) {
	p := start(t)
	c := dial(t, p)
	for _, line := range []string{"a", "b", "c"} {
		mustRoundTrip(c, line)
	}
	if p.Accepted() != 1 || p.Conns() != 1 {
		t.Fatalf("accepted %d, open %d; want 1, 1", p.Accepted(), p.Conns())
	}
}

// A reply delayed by d comes no sooner than d after its request was sent,
// exactly; one that is not comes sooner, on a machine that is not so
// loaded that a loopback round trip takes a whole second. So a check that
// a reply was not delayed compares with the delay itself.
const delay = time.Second

func TestLatency(t *testing.T) {
	p := start(t)
	c := dial(t, p)
	mustRoundTrip(c, "warm")
	p.SetLatency(delay)
	if took := mustRoundTrip(c, "slow"); took < delay {
		t.Fatalf("reply came after %v, want at least %v", took, delay)
	}
	p.SetLatency(0)
	if took := mustRoundTrip(c, "fast"); took >= delay {
		t.Fatalf("reply came after %v without latency", took)
	}
}

func TestDelayNextRepliesOnly(t *testing.T) {
	p := start(t)
	c := dial(t, p)
	p.DelayNextReplies(1, delay)
	if took := mustRoundTrip(c, "first"); took < delay {
		t.Fatalf("first reply after %v, want at least %v", took, delay)
	}
	if took := mustRoundTrip(c, "second"); took >= delay {
		t.Fatalf("second reply after %v: only the first is delayed", took)
	}
}

// heldSignal makes p report on the returned channel each reply it starts
// to hold back.
func heldSignal(p *faultproxy.Proxy) <-chan struct{} {
	held := make(chan struct{}, 16)
	p.OnHold(func() {
		select {
		case held <- struct{}{}:
		default: // never block the proxy
		}
	})
	return held
}

// awaitHeld returns once a reply is held, and fails t after a bound that
// only a bug reaches.
func awaitHeld(t *testing.T, held <-chan struct{}) {
	t.Helper()
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatal("no reply was held")
	}
}

func TestHealReleasesHeldReplies(t *testing.T) {
	p := start(t)
	held := heldSignal(p)
	c := dial(t, p)
	p.SetLatency(time.Hour)
	stop := make(chan struct{})
	defer close(stop)
	go func() { // heals once the reply is held, not before
		select {
		case <-held:
			p.Heal()
		case <-stop:
		}
	}()
	if took := mustRoundTrip(c, "held"); took > 3*time.Second {
		t.Fatalf("held reply came after %v", took)
	}
	mustRoundTrip(c, "after")
}

func TestBlackhole(t *testing.T) {
	p := start(t)
	c := dial(t, p)
	mustRoundTrip(c, "warm")
	p.Blackhole()
	_, _, err := c.roundTrip("lost", 200*time.Millisecond)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("blackholed round trip: %v, want a timeout", err)
	}
	// New connections are accepted but get nothing either.
	c2 := dial(t, p)
	if _, _, err := c2.roundTrip("lost too", 200*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("new connection under a blackhole: %v, want a timeout", err)
	}
	p.Heal()
	mustRoundTrip(dial(t, p), "healed")
}

func TestResetAll(t *testing.T) {
	p := start(t)
	c := dial(t, p)
	mustRoundTrip(c, "warm")
	p.ResetAll()
	_, _, err := c.roundTrip("after reset", time.Second)
	requireReset(t, err)
	mustRoundTrip(dial(t, p), "new connection")
}

func TestResetNextReplies(t *testing.T) {
	p := start(t)
	c := dial(t, p)
	mustRoundTrip(c, "warm")
	p.ResetNextReplies(2)
	for range 2 {
		_, _, err := c.roundTrip("dropped", time.Second)
		requireReset(t, err)
		c = dial(t, p)
	}
	mustRoundTrip(c, "only the next two replies are reset")
	mustRoundTrip(c, "and no other")
}

func TestRefuse(t *testing.T) {
	p := start(t)
	c := dial(t, p)
	mustRoundTrip(c, "warm")
	p.Refuse()
	_, _, err := c.roundTrip("open connection", time.Second)
	requireReset(t, err)
	c2, err := net.Dial("tcp", p.Addr())
	if err == nil {
		c2.SetDeadline(time.Now().Add(time.Second))
		_, err = c2.Read(make([]byte, 1))
		c2.Close()
	}
	requireReset(t, err)
	p.Heal()
	mustRoundTrip(dial(t, p), "healed")
}

func TestTargetDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	p, err := faultproxy.Start(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c := dial(t, p)
	if _, _, err := c.roundTrip("x", time.Second); err == nil {
		t.Fatal("a proxy to a closed port answered")
	}
}

func TestCloseEndsConnections(t *testing.T) {
	p, err := faultproxy.Start(echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, p)
	mustRoundTrip(c, "warm")
	held := heldSignal(p)
	p.SetLatency(time.Hour)
	c.c.Write([]byte("held\n"))
	awaitHeld(t, held) // Close must end a link that holds a reply
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		t.Fatal("a closed proxy still accepts")
	}
	_, _, err = c.roundTrip("x", time.Second)
	requireReset(t, err)
}

func requireReset(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("got %v, want a reset connection (RST)", err)
	}
}
