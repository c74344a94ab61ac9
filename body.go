package idempotency

import (
	"fmt"
	"io"
	"net/http"
	"sync"
)

// Request bodies are read into pooled buffers: a body is needed only
// until the handler returns (net/http forbids reading it after), so the
// same few buffers serve every request.
var bufferPool = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// maxPooledBuffer keeps rare large bodies from pinning memory in the pool.
const maxPooledBuffer = 64 << 10

func getBuffer() *[]byte { return bufferPool.Get().(*[]byte) }

func putBuffer(b *[]byte) {
	if cap(*b) <= maxPooledBuffer {
		*b = (*b)[:0]
		bufferPool.Put(b)
	}
}

// readBody reads the whole request body into buf, up to limit bytes, and
// returns buf.
func readBody(r *http.Request, limit int64, buf *[]byte) (*[]byte, error) {
	b := (*buf)[:0]
	if r.Body == nil || r.Body == http.NoBody {
		*buf = b
		return buf, nil
	}
	if r.ContentLength > limit {
		return nil, newRequestError(ErrBodyTooLarge, fmt.Sprintf("%d bytes, limit %d", r.ContentLength, limit))
	}
	if want := r.ContentLength + 1; want > 1 && int64(cap(b)) < want { // +1: room to read the EOF
		b = make([]byte, 0, want)
	}
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := r.Body.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if int64(len(b)) > limit {
			return nil, newRequestError(ErrBodyTooLarge, fmt.Sprintf("limit %d bytes", limit))
		}
		if err == io.EOF {
			*buf = b
			return buf, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBodyUnreadable, err)
		}
	}
}

// bodyReader gives the handler the body the middleware read.
type bodyReader struct {
	b   []byte
	off int
}

func (r *bodyReader) Read(p []byte) (int, error) {
	if r.off >= len(r.b) {
		return 0, io.EOF
	}
	n := copy(p, r.b[r.off:])
	r.off += n
	return n, nil
}

// WriteTo lets io.Copy and io.ReadAll-like callers take the bytes at once.
func (r *bodyReader) WriteTo(w io.Writer) (int64, error) {
	n, err := w.Write(r.b[r.off:])
	r.off += n
	return int64(n), err
}

func (r *bodyReader) Close() error { return nil }
