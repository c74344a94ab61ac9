package idemecho_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"go.uber.org/goleak"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemecho"
	"github.com/seed70ea8305/idempotency/internal/transporttest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestTable plays the transports' table against an Echo router on a
// loopback server.
func TestTable(t *testing.T) { transporttest.Run(t, echoTransport) }

var echoTransport = transporttest.Transport{
	Name: "echo",
	Serve: func(t *testing.T, store idempotency.Store, opts idempotency.Options, op transporttest.Op) transporttest.Client {
		opts.Scope = transporttest.ScopeByTenant
		return transporttest.ServeHTTP(t, router(t, store, opts, opHandler(op)))
	},
}

// router is an Echo router with recovery outside the middleware.
func router(t testing.TB, store idempotency.Store, opts idempotency.Options, handler echo.HandlerFunc) *echo.Echo {
	mw, err := idempotency.New(store, opts)
	if err != nil {
		t.Fatal(err)
	}
	e := echo.New()
	e.Logger.SetOutput(io.Discard)
	e.Use(middleware.RecoverWithConfig(middleware.RecoverConfig{DisablePrintStack: true}))
	e.POST(transporttest.OpPath, handler, idemecho.Middleware(mw))
	return e
}

// opHandler serves the operation the Echo way; its failure is an error
// for Echo's error handler.
func opHandler(op transporttest.Op) echo.HandlerFunc {
	return func(c echo.Context) error {
		var in transporttest.OpRequest
		if err := c.Bind(&in); err != nil {
			return err
		}
		out, err := op(c.Request().Context(), in.Input)
		if err != nil {
			return echo.NewHTTPError(http.StatusInternalServerError, "operation failed")
		}
		c.Response().Header().Set(transporttest.ResultHeader, out)
		return c.JSON(http.StatusCreated, transporttest.OpResponse{Output: out})
	}
}

func doneOp(_ context.Context, input string) (string, error) { return "done " + input, nil }

// TestSameAnswersAsTheMiddleware sends the same requests to an Echo
// router and to the middleware on net/http serving a handler that answers
// as Echo's does: every answer, the middleware's problem documents and
// headers included, is the same.
func TestSameAnswersAsTheMiddleware(t *testing.T) {
	echoStore := transporttest.NewStore(idempotency.NewMemoryStore(idempotency.MemoryOptions{}))
	httpStore := transporttest.NewStore(idempotency.NewMemoryStore(idempotency.MemoryOptions{}))
	e := router(t, echoStore, idempotency.Options{}, opHandler(doneOp))
	mw, err := idempotency.New(httpStore, idempotency.Options{})
	if err != nil {
		t.Fatal(err)
	}
	plain := mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(transporttest.ResultHeader, "done hall")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, `{"output":"done hall"}`+"\n")
	}))
	for _, step := range []struct {
		name, key, body string
		down            bool
	}{
		{"no key", "", `{"input":"hall"}`, false},
		{"malformed key", "two words", `{"input":"hall"}`, false},
		{"store down", "k1", `{"input":"hall"}`, true},
		{"first", "k1", `{"input":"hall"}`, false},
		{"replay", "k1", `{"input":"hall"}`, false},
		{"other input", "k1", `{"input":"arena"}`, false},
	} {
		echoStore.SetDown(step.down)
		httpStore.SetDown(step.down)
		request := func() *http.Request {
			r := httptest.NewRequest(http.MethodPost, transporttest.OpPath, strings.NewReader(step.body))
			r.Header.Set("Content-Type", "application/json")
			if step.key != "" {
				r.Header.Set("Idempotency-Key", step.key)
			}
			return r
		}
		got, want := httptest.NewRecorder(), httptest.NewRecorder()
		e.ServeHTTP(got, request())
		plain.ServeHTTP(want, request())
		if got.Code != want.Code || got.Body.String() != want.Body.String() || !sameHeader(got.Header(), want.Header()) {
			t.Errorf("%s: echo answered %d %v %q\nthe middleware %d %v %q", step.name,
				got.Code, got.Header(), got.Body, want.Code, want.Header(), want.Body)
		}
	}
}

func sameHeader(a, b http.Header) bool {
	if len(a) != len(b) {
		return false
	}
	for name, values := range a {
		if strings.Join(values, "\n") != strings.Join(b[name], "\n") {
			return false
		}
	}
	return true
}

// With Echo's own test helper (a Context over a recorder): an error the
// handler returns is answered inside the middleware, so a 4xx is stored
// and replayed and a 5xx frees the key; Echo's Response tells what was
// sent; the claim is in the request's context.
func TestEchoErrors(t *testing.T) {
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := echo.New()
	runs := 0
	status := http.StatusNotFound
	h := idemecho.Middleware(mw)(func(c echo.Context) error {
		runs++
		if claim, ok := idempotency.ClaimFromContext(c.Request().Context()); !ok || claim.Key == "" {
			t.Errorf("claim %+v %v", claim, ok)
		}
		return echo.NewHTTPError(status, "no such venue")
	})
	call := func(key string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodPost, "/venues", nil)
		req.Header.Set("Idempotency-Key", key)
		rec := httptest.NewRecorder()
		c := e.NewContext(req, rec)
		if err := h(c); err != nil {
			t.Fatal(err)
		}
		if c.Response().Status != rec.Code || !c.Response().Committed {
			t.Errorf("Echo's Response says %d (committed %v), the client got %d", c.Response().Status, c.Response().Committed, rec.Code)
		}
		return rec
	}
	for i := range 2 {
		rec := call("kept")
		if rec.Code != http.StatusNotFound || (rec.Header().Get("X-Idempotent-Replayed") == "true") != (i == 1) || !strings.Contains(rec.Body.String(), "no such venue") {
			t.Errorf("call %d: %d %v %s", i, rec.Code, rec.Header(), rec.Body)
		}
	}
	status = http.StatusInternalServerError
	for range 2 {
		if rec := call("freed"); rec.Code != http.StatusInternalServerError {
			t.Errorf("got %d", rec.Code)
		}
	}
	if runs != 3 {
		t.Errorf("the handler ran %d times, want 3 (the 404 once, the 500 twice)", runs)
	}
}
