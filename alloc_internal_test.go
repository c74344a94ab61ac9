package idempotency

import (
	"bytes"
	"runtime"
	"testing"
	"unsafe"
)

// TestCompletionSizes: a completion with its body inline takes exactly
// one allocation of Go's size class for it, so keeping the body there
// wastes nothing against a body of its own; every body up to the largest
// size fits, and the copy is the body.
func TestCompletionSizes(t *testing.T) {
	if got := unsafe.Sizeof(completion{}); got != 160 {
		t.Fatalf("a completion is %d bytes; inlineBodySizes are for 160", got)
	}
	const n = 1000
	held := make([]*Record, n)
	for i, size := range inlineBodySizes {
		if i > 0 && size.max <= inlineBodySizes[i-1].max {
			t.Fatalf("sizes out of order at %d", size.max)
		}
		body := bytes.Repeat([]byte{'x'}, size.max)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for j := range held {
			held[j] = size.make(Response{StatusCode: 201}, body)
		}
		runtime.ReadMemStats(&after)
		want := uint64(160 + size.max)
		if want > 512 {
			want += 8 // the malloc header of an object with pointers
		}
		// A few bytes over: what else the runtime allocated meanwhile; a
		// size class over is 64 bytes or more.
		if got := (after.TotalAlloc - before.TotalAlloc) / n; got < want || got >= want+16 {
			t.Errorf("a completion with a %d-byte body takes %d bytes, want %d (a size class)", size.max, got, want)
		}
		rec, kept := newCompletionCopy(Response{StatusCode: 201}, body[:size.max-1])
		if kept {
			t.Errorf("a body of %d bytes was kept, not copied", size.max-1)
		}
		if !bytes.Equal(rec.Response.Body, body[:size.max-1]) || cap(rec.Response.Body) != size.max-1 {
			t.Errorf("body of %d bytes: copied %d bytes, capacity %d", size.max-1, len(rec.Response.Body), cap(rec.Response.Body))
		}
	}
	runtime.KeepAlive(held)
	large := bytes.Repeat([]byte{'y'}, inlineBodySizes[len(inlineBodySizes)-1].max+1)
	if rec, kept := newCompletionCopy(Response{}, large); !kept || &rec.Response.Body[0] != &large[0] {
		t.Error("a body too large to copy inline is kept as it is")
	}
	if rec, kept := newCompletionCopy(Response{StatusCode: 204}, nil); kept || rec.Response.Body != nil || rec.Response.StatusCode != 204 {
		t.Error("no body, none kept")
	}
}
