// Package idemgin runs the idempotency middleware in a Gin router: the
// same engine, stores, answers and headers as [idempotency.Middleware],
// whose Handler it wraps around the rest of Gin's handler chain.
//
//	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
//	mw, err := idempotency.New(store, idempotency.Options{
//		Scope: func(r *http.Request) string { return tenantOf(r) },
//	})
//	if err != nil {
//		return err
//	}
//	r := gin.New()
//	r.Use(gin.Recovery())
//	r.POST("/venues", authenticate, idemgin.Middleware(mw), createVenue)
//
// Everything the middleware documents holds: a retry with the same
// Idempotency-Key gets the stored response with X-Idempotent-Replayed:
// true, a duplicate of a running request gets 409 with Retry-After (or
// waits), the same key with another request gets 422, failures and panics
// free the key, and the middleware's own answers are its problem+json
// documents. Handlers after it find the claim with
// [idempotency.ClaimFromContext] in c.Request.Context().
//
// Put gin.Recovery (or your own recovery) before it: a panic frees the
// key and goes on to the recovery, which answers it. Status and Size of
// c.Writer, read by middleware before it once the chain has run, tell what
// was sent, a replay or a rejection included.
package idemgin

import (
	"bufio"
	"io"
	"net"
	"net/http"

	"github.com/gin-gonic/gin"

	"github.com/seed70ea8305/idempotency"
)

// Middleware returns a Gin handler that runs the rest of the chain behind
// mw. A request that mw answers itself (a replay, a rejection) stops
// there: the handlers after it do not run (the context is aborted). The
// handlers after it write through a writer that follows Gin's contract
// (the status is committed by the first write, or when the chain ends)
// onto the middleware's recording writer: see [idempotency.Middleware.Handler]
// for what it holds and records; Hijack fails and CloseNotify never fires.
func Middleware(mw *idempotency.Middleware) gin.HandlerFunc {
	return func(c *gin.Context) {
		outerWriter, outerRequest := c.Writer, c.Request
		ran := false
		mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			ran = true
			inner := &writer{ResponseWriter: w, status: http.StatusOK, size: -1}
			c.Writer, c.Request = inner, r
			defer func() { c.Writer, c.Request = outerWriter, outerRequest }()
			c.Next()
			inner.WriteHeaderNow() // a status set without a body
		})).ServeHTTP(outerWriter, outerRequest)
		if !ran {
			c.Abort()
		}
	}
}

// writer is a [gin.ResponseWriter] over the middleware's writer, with
// Gin's own semantics: WriteHeader records the status, the first write
// (or WriteHeaderNow) sends it.
type writer struct {
	http.ResponseWriter
	status int
	size   int // -1 until the header is sent
}

var _ gin.ResponseWriter = (*writer)(nil)

func (w *writer) WriteHeader(code int) {
	if code > 0 && !w.Written() {
		w.status = code
	}
}

func (w *writer) WriteHeaderNow() {
	if !w.Written() {
		w.size = 0
		w.ResponseWriter.WriteHeader(w.status)
	}
}

func (w *writer) Write(p []byte) (int, error) {
	w.WriteHeaderNow()
	n, err := w.ResponseWriter.Write(p)
	w.size += n
	return n, err
}

func (w *writer) WriteString(s string) (int, error) {
	w.WriteHeaderNow()
	n, err := io.WriteString(w.ResponseWriter, s)
	w.size += n
	return n, err
}

func (w *writer) Status() int   { return w.status }
func (w *writer) Size() int     { return w.size }
func (w *writer) Written() bool { return w.size != -1 }

// Hijack fails: a hijacked connection cannot be recorded for replay. The
// error wraps [http.ErrNotSupported].
func (w *writer) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

// Flush sends the header, then flushes as the middleware's writer does
// (nothing while the response is held).
func (w *writer) Flush() {
	w.WriteHeaderNow()
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

// CloseNotify returns a channel that never fires: the middleware decides
// what a client's disconnect does ([idempotency.Options].CancelOnDisconnect).
func (w *writer) CloseNotify() <-chan bool { return make(chan bool) }

// Pusher returns nil: no server push through a recorded response.
func (w *writer) Pusher() http.Pusher { return nil }

// Unwrap gives [http.ResponseController] the middleware's writer.
func (w *writer) Unwrap() http.ResponseWriter { return w.ResponseWriter }
