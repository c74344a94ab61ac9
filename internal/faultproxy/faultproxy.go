// Package faultproxy is a TCP proxy for tests that puts network faults
// between a client and a server: delayed replies, a blackhole, connection
// resets and refused connections.
//
// "Replies" are the bytes the server sends to the client. The proxy works
// on what each read from the server returns (a chunk); a small request /
// reply protocol such as Redis' sends one reply per chunk unless commands
// are pipelined. Faults are deterministic: nothing is random, and every
// setting applies from the next chunk on.
package faultproxy

import (
	"net"
	"sync"
	"time"
)

// dialTimeout bounds the proxy's own connection to the target.
const dialTimeout = 2 * time.Second

// Proxy forwards connections from its own loopback address to a target
// address. It is safe for concurrent use; create it with [Start] and stop
// it with [Proxy.Close], which also stops every goroutine it started.
type Proxy struct {
	target string
	ln     net.Listener
	wg     sync.WaitGroup

	mu        sync.Mutex
	links     map[*link]struct{}
	closed    bool
	accepted  int
	latency   time.Duration // added to every reply
	delayNext int           // replies still to delay by delayBy
	delayBy   time.Duration
	resetNext int  // replies still to drop, resetting their connection
	blackhole bool // forward nothing either way
	refuse    bool // reset new connections at once
	gen       int  // counts Heal calls: replies held before one go at once
	changed   chan struct{}
	onHold    func() // test hook: called as each reply starts being held
}

// Start listens on a free loopback port and forwards every connection it
// accepts to target.
func Start(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{target: target, ln: ln, links: make(map[*link]struct{}), changed: make(chan struct{})}
	p.wg.Add(1)
	go p.acceptLoop()
	return p, nil
}

// Addr is the address clients connect to instead of the target.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Accepted returns how many connections the proxy has accepted so far.
func (p *Proxy) Accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted
}

// Conns returns how many connections are open through the proxy.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// SetLatency delays every reply read from now on by d. Replies already
// held keep their delay; [Proxy.Heal] releases them.
func (p *Proxy) SetLatency(d time.Duration) {
	p.update(func() { p.latency = d })
}

// DelayNextReplies delays the next n replies, on whatever connections they
// come, by d instead of the latency.
func (p *Proxy) DelayNextReplies(n int, d time.Duration) {
	p.update(func() { p.delayNext, p.delayBy = n, d })
}

// ResetNextReplies drops each of the next n replies and resets (TCP RST)
// both sides of the connection that carried it: the server has executed
// the command, the client never learns its result.
func (p *Proxy) ResetNextReplies(n int) {
	p.update(func() { p.resetNext = n })
}

// Blackhole makes the proxy forward nothing, on open and new connections
// alike, in either direction: bytes are read and dropped, so each side
// waits for an answer that never comes.
func (p *Proxy) Blackhole() {
	p.update(func() { p.blackhole = true })
}

// Refuse resets every open connection and every new one as soon as it is
// accepted.
func (p *Proxy) Refuse() {
	p.update(func() { p.refuse = true })
	p.ResetAll()
}

// ResetAll resets (TCP RST) both sides of every open connection.
func (p *Proxy) ResetAll() {
	p.mu.Lock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		l.close(true)
	}
}

// Heal clears every fault: no latency, no delayed or reset reply pending,
// no blackhole, no refusal. Replies held back by a delay are sent at once.
// Bytes dropped by the blackhole stay lost.
func (p *Proxy) Heal() {
	p.update(func() {
		p.latency, p.delayNext, p.delayBy = 0, 0, 0
		p.resetNext, p.blackhole, p.refuse = 0, false, false
		p.gen++
	})
}

// Close stops listening, resets every open connection and waits for all
// of the proxy's goroutines to end.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	err := p.ln.Close()
	p.ResetAll()
	p.wg.Wait()
	return err
}

func (p *Proxy) update(change func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	change()
	close(p.changed)
	p.changed = make(chan struct{})
}

func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		p.mu.Lock()
		p.accepted++
		refuse := p.refuse || p.closed
		p.mu.Unlock()
		if refuse {
			reset(client)
			continue
		}
		server, err := net.DialTimeout("tcp", p.target, dialTimeout)
		if err != nil {
			client.Close() // the target is down: the client reads EOF
			continue
		}
		l := &link{p: p, client: client, server: server, replies: make(chan chunk, 256), done: make(chan struct{})}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			reset(client)
			reset(server)
			return
		}
		p.links[l] = struct{}{}
		p.wg.Add(3)
		p.mu.Unlock()
		go l.forwardRequests()
		go l.readReplies()
		go l.writeReplies()
	}
}

// replyAction decides, under the lock, what happens to a reply just read.
func (p *Proxy) replyAction() (action int, due time.Time, gen int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	switch {
	case p.resetNext > 0:
		p.resetNext--
		return actionReset, now, p.gen
	case p.blackhole:
		return actionDrop, now, p.gen
	case p.delayNext > 0:
		p.delayNext--
		return actionForward, now.Add(p.delayBy), p.gen
	default:
		return actionForward, now.Add(p.latency), p.gen
	}
}

// holdFor returns how much longer c must be held, and a channel closed at
// the next change of settings.
func (p *Proxy) holdFor(c chunk) (time.Duration, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.gen != p.gen {
		return 0, p.changed
	}
	return time.Until(c.due), p.changed
}

// holding calls the onHold hook, if set.
func (p *Proxy) holding() {
	p.mu.Lock()
	f := p.onHold
	p.mu.Unlock()
	if f != nil {
		f()
	}
}

func (p *Proxy) blackholed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.blackhole
}

const (
	actionForward = iota
	actionDrop
	actionReset
)

type chunk struct {
	data []byte
	due  time.Time
	gen  int
}

// link is one proxied connection. Three goroutines serve it: requests
// (client to server), and replies read from the server into a queue and
// written from it to the client once due, so a delay keeps their order.
type link struct {
	p              *Proxy
	client, server net.Conn
	replies        chan chunk
	once           sync.Once
	done           chan struct{}
}

func (l *link) close(rst bool) {
	l.once.Do(func() {
		if rst {
			reset(l.client)
			reset(l.server)
		} else {
			l.client.Close()
			l.server.Close()
		}
		close(l.done)
		l.p.mu.Lock()
		delete(l.p.links, l)
		l.p.mu.Unlock()
	})
}

func (l *link) forwardRequests() {
	defer l.p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := l.client.Read(buf)
		if n > 0 && !l.p.blackholed() {
			if _, werr := l.server.Write(buf[:n]); werr != nil {
				l.close(false)
				return
			}
		}
		if err != nil {
			l.close(false)
			return
		}
	}
}

func (l *link) readReplies() {
	defer l.p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := l.server.Read(buf)
		if n > 0 {
			action, due, gen := l.p.replyAction()
			switch action {
			case actionReset:
				l.close(true)
				return
			case actionForward:
				select {
				case l.replies <- chunk{data: append([]byte(nil), buf[:n]...), due: due, gen: gen}:
				case <-l.done:
					return
				}
			}
		}
		if err != nil {
			// Let the writer send what is queued, then close.
			close(l.replies)
			return
		}
	}
}

func (l *link) writeReplies() {
	defer l.p.wg.Done()
	for {
		var c chunk
		select {
		case next, ok := <-l.replies:
			if !ok {
				l.close(false)
				return
			}
			c = next
		case <-l.done:
			return
		}
		for held := false; ; held = true {
			wait, changed := l.p.holdFor(c)
			if wait <= 0 {
				break
			}
			if !held {
				l.p.holding()
			}
			timer := time.NewTimer(wait)
			select {
			case <-timer.C:
			case <-changed:
				timer.Stop()
			case <-l.done:
				timer.Stop()
				return
			}
		}
		if l.p.blackholed() {
			continue
		}
		if _, err := l.client.Write(c.data); err != nil {
			l.close(false)
			return
		}
	}
}

// reset closes c with SO_LINGER 0, so the peer gets a TCP RST instead of
// an orderly FIN.
func reset(c net.Conn) {
	if tcp, ok := c.(*net.TCPConn); ok {
		tcp.SetLinger(0)
	}
	c.Close()
}
