package idemgin_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/gin-gonic/gin"
	"go.uber.org/goleak"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemgin"
	"github.com/seed70ea8305/idempotency/internal/transporttest"
)

func TestMain(m *testing.M) {
	gin.SetMode(gin.TestMode)
	goleak.VerifyTestMain(m)
}

// TestTable plays the transports' table against a Gin router on a
// loopback server.
func TestTable(t *testing.T) { transporttest.Run(t, ginTransport) }

var ginTransport = transporttest.Transport{
	Name: "gin",
	Serve: func(t *testing.T, store idempotency.Store, opts idempotency.Options, op transporttest.Op) transporttest.Client {
		opts.Scope = transporttest.ScopeByTenant
		return transporttest.ServeHTTP(t, router(t, store, opts, opHandler(op)))
	},
}

// router is a Gin router with recovery outside the middleware, serving
// handler at the operation's route.
func router(t testing.TB, store idempotency.Store, opts idempotency.Options, handler gin.HandlerFunc) *gin.Engine {
	mw, err := idempotency.New(store, opts)
	if err != nil {
		t.Fatal(err)
	}
	r := gin.New()
	r.Use(gin.CustomRecoveryWithWriter(io.Discard, func(c *gin.Context, _ any) { c.AbortWithStatus(http.StatusInternalServerError) }))
	r.POST(transporttest.OpPath, idemgin.Middleware(mw), handler)
	r.GET(transporttest.OpPath, idemgin.Middleware(mw), handler)
	return r
}

// opHandler serves the operation the Gin way.
func opHandler(op transporttest.Op) gin.HandlerFunc {
	return func(c *gin.Context) {
		var in transporttest.OpRequest
		if c.Request.Method == http.MethodPost {
			if err := c.ShouldBindJSON(&in); err != nil {
				c.AbortWithStatus(http.StatusBadRequest)
				return
			}
		}
		out, err := op(c.Request.Context(), in.Input)
		if err != nil {
			c.Data(http.StatusInternalServerError, "application/problem+json", []byte(transporttest.FailureBody))
			return
		}
		c.Header(transporttest.ResultHeader, out)
		c.JSON(http.StatusCreated, transporttest.OpResponse{Output: out})
	}
}

func echoOp(_ context.Context, input string) (string, error) { return "done " + input, nil }

// TestSameAnswersAsTheMiddleware sends the same requests, through Gin's
// own test helpers, to a Gin router and to the middleware on net/http
// serving a handler that answers as Gin's does: every answer, the
// middleware's problem documents and headers included, is the same.
func TestSameAnswersAsTheMiddleware(t *testing.T) {
	ginStore := transporttest.NewStore(idempotency.NewMemoryStore(idempotency.MemoryOptions{}))
	httpStore := transporttest.NewStore(idempotency.NewMemoryStore(idempotency.MemoryOptions{}))
	g := router(t, ginStore, idempotency.Options{}, opHandler(echoOp))
	mw, err := idempotency.New(httpStore, idempotency.Options{})
	if err != nil {
		t.Fatal(err)
	}
	plain := mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(transporttest.ResultHeader, "done hall")
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, `{"output":"done hall"}`)
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
		ginStore.SetDown(step.down)
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
		g.ServeHTTP(got, request())
		plain.ServeHTTP(want, request())
		if got.Code != want.Code || got.Body.String() != want.Body.String() || !sameHeader(got.Header(), want.Header()) {
			t.Errorf("%s: gin answered %d %v %s\nthe middleware %d %v %s", step.name,
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

// A status set without a body, through Gin's writer, is what the
// middleware records and replays; unprotected methods pass through; the
// claim is in the request's context.
func TestGinWriter(t *testing.T) {
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		t.Fatal(err)
	}
	runs := 0
	r := gin.New()
	r.POST("/accept", idemgin.Middleware(mw), func(c *gin.Context) {
		runs++
		if claim, ok := idempotency.ClaimFromContext(c.Request.Context()); !ok || claim.Key != "k" {
			t.Errorf("claim %+v %v", claim, ok)
		}
		c.Header("Location", "/jobs/1")
		c.Status(http.StatusAccepted)
	})
	r.GET("/accept", idemgin.Middleware(mw), func(c *gin.Context) { c.String(http.StatusOK, "read") })
	for i := range 2 {
		w := httptest.NewRecorder()
		req := httptest.NewRequest(http.MethodPost, "/accept", nil)
		req.Header.Set("Idempotency-Key", "k")
		r.ServeHTTP(w, req)
		if w.Code != http.StatusAccepted || w.Header().Get("Location") != "/jobs/1" || (w.Header().Get("X-Idempotent-Replayed") == "true") != (i == 1) {
			t.Errorf("call %d: %d %v", i, w.Code, w.Header())
		}
	}
	if runs != 1 {
		t.Errorf("the handler ran %d times, want 1", runs)
	}
	w := httptest.NewRecorder()
	r.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/accept", nil))
	if w.Code != http.StatusOK || w.Body.String() != "read" {
		t.Errorf("GET: %d %s", w.Code, w.Body)
	}
}
