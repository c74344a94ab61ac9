package idempotency_test

import (
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/seed70ea8305/idempotency"
)

func ExampleNew() {
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		log.Fatal(err)
	}
	executions := 0
	createVenue := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		executions++
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"id":"venue_%d"}`, executions)
	})
	mux := http.NewServeMux()
	mux.Handle("POST /venues", mw.Handler(createVenue))

	send := func(key, body string) {
		r := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(body))
		r.Header.Set("Idempotency-Key", key)
		w := httptest.NewRecorder()
		mux.ServeHTTP(w, r)
		fmt.Printf("%d replayed=%q %s\n", w.Code, w.Header().Get("X-Idempotent-Replayed"), w.Body)
	}
	send("8e03978e", `{"name":"Hall"}`) // runs the handler
	send("8e03978e", `{"name":"Hall"}`) // a retry: the stored response again
	send("8e03978e", `{"name":"Barn"}`) // same key, another request: 422
	fmt.Println("executions:", executions)
	// Output:
	// 201 replayed="" {"id":"venue_1"}
	// 201 replayed="true" {"id":"venue_1"}
	// 422 replayed="" {"type":"https://pkg.go.dev/github.com/seed70ea8305/idempotency#ErrFingerprintMismatch","title":"Idempotency-Key reused with a different request","status":422}
	// executions: 1
}

func ExampleNewRedisStore() {
	mr := miniredis.NewMiniRedis() // stands in for a real Redis here
	if err := mr.Start(); err != nil {
		log.Fatal(err)
	}
	defer mr.Close()

	rdb := redis.NewClient(&redis.Options{
		Addr: mr.Addr(),
		// Bound each store call by the request's deadline.
		ContextTimeoutEnabled:    true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	})
	defer rdb.Close()
	store, err := idempotency.NewRedisStore(rdb, idempotency.RedisOptions{Prefix: "venue-service:idem:"})
	if err != nil {
		log.Fatal(err)
	}
	mw, err := idempotency.New(store, idempotency.Options{})
	if err != nil {
		log.Fatal(err)
	}
	h := mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusAccepted)
	}))
	for range 2 {
		r := httptest.NewRequest(http.MethodPost, "/payouts", nil)
		r.Header.Set("Idempotency-Key", `"payout-42"`)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		fmt.Printf("%d replayed=%q\n", w.Code, w.Header().Get("X-Idempotent-Replayed"))
	}
	fmt.Println("keys in Redis:", mr.Keys()) // the record, and its hash tag's fence counter
	// Output:
	// 202 replayed=""
	// 202 replayed="true"
	// keys in Redis: [venue-service:idem:{95c1}25e83a2f886296b7cf0a88ecb438 venue-service:idem:{95c1}fence]
}

func ExampleOptions_scope() {
	tenant := func(r *http.Request) string { return r.Header.Get("X-Tenant-ID") }
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{Scope: tenant})
	if err != nil {
		log.Fatal(err)
	}
	h := mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "created for ", r.Header.Get("X-Tenant-ID"))
	}))
	for _, tenant := range []string{"acme", "globex", "acme"} {
		r := httptest.NewRequest(http.MethodPost, "/venues", nil)
		r.Header.Set("Idempotency-Key", "same-key")
		r.Header.Set("X-Tenant-ID", tenant)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		fmt.Printf("%s: %q replayed=%q\n", tenant, w.Body.String(), w.Header().Get("X-Idempotent-Replayed"))
	}
	// Output:
	// acme: "created for acme" replayed=""
	// globex: "created for globex" replayed=""
	// acme: "created for acme" replayed="true"
}

func ExampleClaimFromContext() {
	mw, err := idempotency.New(idempotency.NewMemoryStore(idempotency.MemoryOptions{}), idempotency.Options{})
	if err != nil {
		log.Fatal(err)
	}
	h := mw.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		claim, ok := idempotency.ClaimFromContext(r.Context())
		fmt.Println(ok, claim.Kind, claim.Key)
	}))
	r := httptest.NewRequest(http.MethodPost, "/venues", nil)
	r.Header.Set("Idempotency-Key", `"order-7"`)
	h.ServeHTTP(httptest.NewRecorder(), r)
	// Output:
	// true http order-7
}

func ExampleFingerprinter() {
	fp := idempotency.Fingerprinter{CanonicalJSON: true}
	sum := func(body string) string {
		r := httptest.NewRequest(http.MethodPost, "/venues", nil)
		r.Header.Set("Content-Type", "application/json")
		s, err := fp.Fingerprint(r, []byte(body))
		if err != nil {
			return err.Error()
		}
		return s[:12]
	}
	fmt.Println(sum(`{"name":"Hall","slug":"hall"}`))
	fmt.Println(sum(`{ "slug": "hall", "name": "Hall" }`))
	fmt.Println(sum(`{"name":"Hall"`))
	// Output:
	// e096ab44d913
	// e096ab44d913
	// idempotency: invalid JSON body: unexpected end of input
}

func ExampleParseKey() {
	for _, header := range []string{`"8e03978e-40d5"`, `8e03978e-40d5`, `a, b`} {
		key, err := idempotency.ParseKey(header)
		fmt.Printf("%q %v\n", key, err)
	}
	// Output:
	// "8e03978e-40d5" <nil>
	// "8e03978e-40d5" <nil>
	// "" idempotency: invalid key: several keys in one header
}
