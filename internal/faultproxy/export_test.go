package faultproxy

// OnHold has f called each time a reply starts being held back by a
// latency or a delay, so a test acts once a reply is held instead of
// sleeping until it probably is.
func (p *Proxy) OnHold(f func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.onHold = f
}
