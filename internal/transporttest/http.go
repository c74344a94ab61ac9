package transporttest

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/seed70ea8305/idempotency"
)

// The HTTP form of the operation, which the net/http, Gin and Echo
// transports serve alike: POST /op with {"input": "..."}; 201 with
// {"output": "..."} and ResultHeader; 500 with a problem when it fails.

// OpPath is the route of the operation.
const OpPath = "/op"

// OpRequest is the operation's JSON request body.
type OpRequest struct {
	Input string `json:"input"`
}

// OpResponse is the operation's JSON response body.
type OpResponse struct {
	Output string `json:"output"`
}

// FailureBody is the body of the operation's own 500.
const FailureBody = `{"type":"about:blank","title":"Operation failed","status":500}`

// HTTPHandler serves op with net/http.
func HTTPHandler(op Op) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var in OpRequest
		if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
			http.Error(w, "bad body", http.StatusBadRequest)
			return
		}
		out, err := op(r.Context(), in.Input)
		if err != nil {
			w.Header().Set("Content-Type", "application/problem+json")
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, FailureBody)
			return
		}
		body, _ := json.Marshal(OpResponse{Output: out})
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set(ResultHeader, out)
		w.WriteHeader(http.StatusCreated)
		w.Write(body)
	})
}

// ScopeByTenant is the scope of the HTTP transports: the TenantHeader.
func ScopeByTenant(r *http.Request) string { return r.Header.Get(TenantHeader) }

// HTTP is the net/http transport: the middleware itself, wrapping
// [HTTPHandler] on a [http.ServeMux].
var HTTP = Transport{
	Name: "http",
	Serve: func(t *testing.T, store idempotency.Store, opts idempotency.Options, op Op) Client {
		opts.Scope = ScopeByTenant
		mw, err := idempotency.New(store, opts)
		if err != nil {
			t.Fatal(err)
		}
		mux := http.NewServeMux()
		mux.Handle("POST "+OpPath, mw.Handler(HTTPHandler(op)))
		return ServeHTTP(t, mux)
	},
}

// ServeHTTP serves h on loopback until t ends, and returns an
// [HTTPClient] of it. Panics that net/http recovers are not logged.
func ServeHTTP(t *testing.T, h http.Handler) Client {
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.Start()
	t.Cleanup(srv.Close)
	return HTTPClient(srv.URL + OpPath)
}

// HTTPClient calls the operation at url. Its connections are not reused,
// so that Go's transport never re-sends a request on its own (it does,
// for a request with an Idempotency-Key on a reused connection that broke)
// and each call is one request.
func HTTPClient(url string) Client {
	return &httpClient{url: url, client: &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}}
}

type httpClient struct {
	url    string
	client *http.Client
}

func (c *httpClient) Call(ctx context.Context, call Call) Reply {
	body, _ := json.Marshal(OpRequest{Input: call.Input})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return Reply{Class: Broken, Err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	if call.Tenant != "" {
		req.Header.Set(TenantHeader, call.Tenant)
	}
	if call.Key != "" {
		req.Header.Set("Idempotency-Key", call.Key)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return Reply{Class: Broken, Status: "no answer", Err: err}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return Reply{Class: Broken, Status: "body cut", Err: err}
	}
	r := Reply{Status: strconv.Itoa(resp.StatusCode), Replayed: resp.Header.Get("X-Idempotent-Replayed") == "true"}
	if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil {
		r.RetryAfter = time.Duration(secs) * time.Second
	}
	switch code := resp.StatusCode; {
	case code == http.StatusCreated:
		var out OpResponse
		if err := json.Unmarshal(data, &out); err != nil {
			return Reply{Class: Other, Status: r.Status, Err: err}
		}
		r.Class, r.Output, r.Result = OK, out.Output, resp.Header.Get(ResultHeader)
	case code == http.StatusConflict:
		r.Class = Conflict
	case code == http.StatusUnprocessableEntity:
		r.Class = Mismatch
	case code == http.StatusBadRequest:
		r.Class = BadKey
	case code == http.StatusServiceUnavailable:
		r.Class = Unavailable
	case code == http.StatusInternalServerError:
		r.Class = Failed
	default:
		r.Class = Other
	}
	return r
}
