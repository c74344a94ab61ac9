// Package idemecho runs the idempotency middleware in an Echo (v4)
// router: the same engine, stores, answers and headers as
// [idempotency.Middleware], whose Handler it wraps around the rest of
// Echo's handler chain.
//
//	store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
//	mw, err := idempotency.New(store, idempotency.Options{
//		Scope: func(r *http.Request) string { return tenantOf(r) },
//	})
//	if err != nil {
//		return err
//	}
//	e := echo.New()
//	e.Use(middleware.Recover())
//	e.POST("/venues", createVenue, authenticate, idemecho.Middleware(mw))
//
// Everything the middleware documents holds: a retry with the same
// Idempotency-Key gets the stored response with X-Idempotent-Replayed:
// true, a duplicate of a running request gets 409 with Retry-After (or
// waits), the same key with another request gets 422, failures and panics
// free the key, and the middleware's own answers are its problem+json
// documents. Handlers after it find the claim with
// [idempotency.ClaimFromContext] in c.Request().Context().
//
// Put middleware.Recover (or your own recovery) before it: a panic frees
// the key and goes on to the recovery, which answers it.
package idemecho

import (
	"net/http"

	"github.com/labstack/echo/v4"

	"github.com/seed70ea8305/idempotency"
)

// Middleware returns an Echo middleware that runs the rest of the chain
// behind mw. A request that mw answers itself (a replay, a rejection)
// stops there, answered through c.Response(), whose Status, Size and
// Committed then tell what was sent. The handlers after it get a
// Response of their own over the middleware's recording writer (see
// [idempotency.Middleware.Handler] for what it holds and records). An
// error they return is answered inside, through Echo's error handler
// (c.Error), so that its response is the one judged and stored (a 5xx
// frees the key); the middleware then returns nil.
func Middleware(mw *idempotency.Middleware) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		return func(c echo.Context) error {
			outer, outerRequest := c.Response(), c.Request()
			mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				c.SetResponse(echo.NewResponse(w, c.Echo()))
				c.SetRequest(r)
				defer func() {
					c.SetResponse(outer)
					c.SetRequest(outerRequest)
				}()
				if err := next(c); err != nil {
					c.Error(err)
				}
			})).ServeHTTP(outer, outerRequest)
			return nil
		}
	}
}
