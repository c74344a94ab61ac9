package idemclient_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemclient"
)

// venueAPI starts a venue API behind the idempotency middleware whose
// handler fails its first call with 503, before doing anything.
func venueAPI() (srv *httptest.Server, executions *int) {
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		log.Fatal(err)
	}
	calls, created := 0, 0
	srv = httptest.NewServer(mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls++
		if calls == 1 {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		created++
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"id":"venue_%d"}`, created)
	})))
	return srv, &created
}

func ExampleNewClient() {
	srv, executions := venueAPI()
	defer srv.Close()

	client, err := idemclient.NewClient(nil, idemclient.WithBackoff(time.Millisecond, 10*time.Millisecond))
	if err != nil {
		log.Fatal(err)
	}
	defer client.CloseIdleConnections()

	resp, err := client.Post(srv.URL+"/venues", "application/json", strings.NewReader(`{"name":"Hall"}`))
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	res, _ := idemclient.ResultOf(resp)
	fmt.Println(resp.StatusCode, string(body))
	fmt.Printf("attempts=%d replayed=%t executions=%d\n", res.Attempts, res.Replayed, *executions)
	// Output:
	// 201 {"id":"venue_1"}
	// attempts=2 replayed=false executions=1
}

func ExampleContextWithKey() {
	srv, executions := venueAPI()
	defer srv.Close()

	client, err := idemclient.NewClient(nil, idemclient.WithBackoff(time.Millisecond, 10*time.Millisecond))
	if err != nil {
		log.Fatal(err)
	}
	defer client.CloseIdleConnections()

	// The same job, delivered twice by a queue: one key, one execution.
	ctx := idemclient.ContextWithKey(context.Background(), "job-42")
	for range 2 {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/venues", strings.NewReader(`{"name":"Hall"}`))
		if err != nil {
			log.Fatal(err)
		}
		resp, err := client.Do(req)
		if err != nil {
			log.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		res, _ := idemclient.ResultOf(resp)
		fmt.Printf("%d %s key=%s attempts=%d replayed=%t\n", resp.StatusCode, body, res.Key, res.Attempts, res.Replayed)
	}
	fmt.Println("executions:", *executions)
	// Output:
	// 201 {"id":"venue_1"} key=job-42 attempts=2 replayed=false
	// 201 {"id":"venue_1"} key=job-42 attempts=1 replayed=true
	// executions: 1
}

func ExampleWithObserver() {
	srv, _ := venueAPI()
	defer srv.Close()

	client, err := idemclient.NewClient(nil,
		idemclient.WithBackoff(time.Millisecond, 10*time.Millisecond),
		idemclient.WithObserver(func(a idemclient.Attempt) {
			fmt.Printf("attempt %d: status %d, retry %t\n", a.Number, a.StatusCode, a.Retry)
		}),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer client.CloseIdleConnections()

	resp, err := client.Post(srv.URL+"/venues", "application/json", strings.NewReader(`{"name":"Hall"}`))
	if err != nil {
		log.Fatal(err)
	}
	resp.Body.Close()
	// Output:
	// attempt 1: status 503, retry true
	// attempt 2: status 201, retry false
}
