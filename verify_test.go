package idempotency_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
)

// The Standard Webhooks specification's published vector
// (github.com/standard-webhooks/standard-webhooks, libraries/go's
// TestWebhookSign, at b2fa7b8): this secret, message ID, timestamp and
// payload are signed v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=.
const (
	swSecret    = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	swID        = "msg_p5jXN8AQM9LWM0D4loKWxJek"
	swTimestamp = 1614265330
	swPayload   = `{"test": 2432232314}`
	swSignature = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
)

// swSign signs as a Standard Webhooks sender does.
func swSign(secret, id string, ts int64, payload []byte) string {
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
	if err != nil {
		panic(err)
	}
	mac := hmac.New(sha256.New, key)
	fmt.Fprintf(mac, "%s.%d.%s", id, ts, payload)
	return "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))
}

func swHeader(id string, ts int64, sig string) http.Header {
	h := http.Header{}
	if id != "" {
		h.Set("Webhook-Id", id)
	}
	if ts != 0 {
		h.Set("Webhook-Timestamp", strconv.FormatInt(ts, 10))
	}
	if sig != "" {
		h.Set("Webhook-Signature", sig)
	}
	return h
}

// TestStandardWebhooksVectors: the specification's test cases, on its
// published vector: valid, several signatures with one valid, tampered
// body, wrong secret, old and future timestamps, missing headers, a
// partial signature, a timestamp that is not a number.
func TestStandardWebhooksVectors(t *testing.T) {
	v, err := idempotency.NewStandardWebhooksVerifier([]string{swSecret}, 0)
	require.NoError(t, err)
	bare, err := idempotency.NewStandardWebhooksVerifier([]string{strings.TrimPrefix(swSecret, "whsec_")}, 0)
	require.NoError(t, err)
	other, err := idempotency.NewStandardWebhooksVerifier([]string{"whsec_" + base64.StdEncoding.EncodeToString([]byte("another secret"))}, 0)
	require.NoError(t, err)
	at := time.Unix(swTimestamp, 0)
	valid := swHeader(swID, swTimestamp, swSignature)
	require.Equal(t, swSignature, swSign(swSecret, swID, swTimestamp, []byte(swPayload)), "our signer agrees with the published vector")

	for _, tc := range []struct {
		name    string
		v       idempotency.Verifier
		header  http.Header
		payload string
		now     time.Time
		ok      bool
	}{
		{"valid", v, valid, swPayload, at, true},
		{"valid, secret without its whsec_ prefix", bare, valid, swPayload, at, true},
		{"several signatures, one valid", v, swHeader(swID, swTimestamp, "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= "+swSignature+" v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="), swPayload, at, true},
		{"tampered body", v, valid, `{"test": 2432232315}`, at, false},
		{"wrong secret", other, valid, swPayload, at, false},
		{"invalid signature", v, swHeader(swID, swTimestamp, "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="), swPayload, at, false},
		{"partial signature", v, swHeader(swID, swTimestamp, "v1,"), swPayload, at, false},
		{"old timestamp", v, valid, swPayload, at.Add(5*time.Minute + time.Second), false},
		{"timestamp just inside the tolerance", v, valid, swPayload, at.Add(5 * time.Minute), true},
		{"future timestamp", v, valid, swPayload, at.Add(-5*time.Minute - time.Second), false},
		{"missing id", v, swHeader("", swTimestamp, swSignature), swPayload, at, false},
		{"missing timestamp", v, swHeader(swID, 0, swSignature), swPayload, at, false},
		{"missing signature", v, swHeader(swID, swTimestamp, ""), swPayload, at, false},
		{"timestamp not a number", v, http.Header{"Webhook-Id": {swID}, "Webhook-Timestamp": {"hello"}, "Webhook-Signature": {swSignature}}, swPayload, at, false},
		{"another id than signed", v, swHeader("msg_other", swTimestamp, swSignature), swPayload, at, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ev, err := tc.v.Verify(tc.header, []byte(tc.payload), tc.now)
			if tc.ok {
				require.NoError(t, err)
				assert.Equal(t, swID, ev.ID)
				return
			}
			assert.ErrorIs(t, err, idempotency.ErrWebhookSignature)
			assert.Equal(t, http.StatusBadRequest, idempotency.StatusCode(err))
		})
	}

	for _, secrets := range [][]string{nil, {""}, {"whsec_not base64!"}, {"whsec_"}} {
		_, err := idempotency.NewStandardWebhooksVerifier(secrets, 0)
		assert.Error(t, err, "%q", secrets)
	}
}

// ghSign signs as GitHub does.
func ghSign(secret string, payload []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(payload)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

func ghHeader(secret, delivery string, payload []byte) http.Header {
	return http.Header{
		"X-Hub-Signature-256": {ghSign(secret, payload)},
		"X-Github-Delivery":   {delivery},
		"X-Github-Event":      {"push"},
	}
}

// TestGitHubVerifier: GitHub's HMAC of the body, the delivery GUID as the
// event's ID, the event header as its type; rotated secrets; bad input.
func TestGitHubVerifier(t *testing.T) {
	v, err := idempotency.NewGitHubVerifier([]string{"old", "new"})
	require.NoError(t, err)
	payload := []byte(`{"ref":"refs/heads/main"}`)
	for _, secret := range []string{"old", "new"} {
		ev, err := v.Verify(ghHeader(secret, "72d3162e-cc78-11e3-81ab-4c9367dc0958", payload), payload, time.Now())
		require.NoError(t, err)
		assert.Equal(t, "72d3162e-cc78-11e3-81ab-4c9367dc0958", ev.ID)
		assert.Equal(t, "push", ev.Type)
	}
	for name, header := range map[string]http.Header{
		"wrong secret":      ghHeader("other", "d1", payload),
		"no signature":      {"X-Github-Delivery": {"d1"}},
		"sha1 only":         {"X-Hub-Signature": {"sha1=00"}, "X-Github-Delivery": {"d1"}},
		"not hex":           {"X-Hub-Signature-256": {"sha256=zz"}, "X-Github-Delivery": {"d1"}},
		"tampered":          ghHeader("new", "d1", []byte(`{"ref":"refs/heads/other"}`)),
		"signature of none": {"X-Hub-Signature-256": {"sha256="}, "X-Github-Delivery": {"d1"}},
	} {
		_, err := v.Verify(header, payload, time.Now())
		assert.ErrorIs(t, err, idempotency.ErrWebhookSignature, name)
	}
	_, err = v.Verify(ghHeader("new", "", payload), payload, time.Now())
	assert.ErrorIs(t, err, idempotency.ErrWebhookPayload, "an authentic delivery without an ID")
	_, err = idempotency.NewGitHubVerifier(nil)
	assert.Error(t, err)
}

// provider is one provider's way to deliver an event, for the tests that
// run the same scenario against every provider.
type provider struct {
	name    string
	v       func(t testing.TB) idempotency.Verifier
	deliver func(id string, payload []byte) http.Header
	forge   func(id string, payload []byte) http.Header
}

var providers = []provider{
	{"stripe",
		func(t testing.TB) idempotency.Verifier { return whVerifier(t, 0, whSecret) },
		func(id string, payload []byte) http.Header {
			return http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(payload, whSecret, time.Now())}}
		},
		func(id string, payload []byte) http.Header {
			return http.Header{"Stripe-Signature": {idempotency.SignWebhookPayload(payload, "whsec_forged", time.Now())}}
		}},
	{"standard-webhooks",
		func(t testing.TB) idempotency.Verifier {
			v, err := idempotency.NewStandardWebhooksVerifier([]string{swSecret}, 0)
			require.NoError(t, err)
			return v
		},
		func(id string, payload []byte) http.Header {
			ts := time.Now().Unix()
			return swHeader(id, ts, swSign(swSecret, id, ts, payload))
		},
		func(id string, payload []byte) http.Header {
			ts := time.Now().Unix()
			return swHeader(id, ts, swSign("whsec_"+base64.StdEncoding.EncodeToString([]byte("forged")), id, ts, payload))
		}},
	{"github",
		func(t testing.TB) idempotency.Verifier {
			v, err := idempotency.NewGitHubVerifier([]string{"gh-secret"})
			require.NoError(t, err)
			return v
		},
		func(id string, payload []byte) http.Header { return ghHeader("gh-secret", id, payload) },
		func(id string, payload []byte) http.Header { return ghHeader("forged", id, payload) }},
}

// eventFor is a payload that names id as each provider does: Stripe in
// the body, the others in a header (the body is signed all the same).
func eventFor(provider, id string) []byte {
	if provider == "stripe" {
		return whEvent(id)
	}
	return fmt.Appendf(nil, `{"type":"contact.created","data":{"id":%q}}`, id)
}

// TestWebhookProvidersExactlyOnce: for every provider, on every store, 20
// events each delivered 4 times at once, with a forged delivery of each
// among them: every event processed once, every forged delivery 400 with
// nothing run. The same event ID from two providers is two events.
func TestWebhookProvidersExactlyOnce(t *testing.T) {
	whForEachStore(t, func(t *testing.T, store idempotency.Store) {
		const events, copies = 20, 4
		var mu sync.Mutex
		processed := map[string]int{}
		handlers := map[string]*idempotency.WebhookHandler{}
		for _, p := range providers {
			h, err := idempotency.NewWebhookHandler(store, p.v(t), func(_ context.Context, ev idempotency.WebhookEvent) error {
				mu.Lock()
				processed[ev.Provider+"/"+ev.ID]++
				mu.Unlock()
				return nil
			}, idempotency.WebhookOptions{})
			require.NoError(t, err)
			handlers[p.name] = h
		}
		var wg sync.WaitGroup
		var ok, rejected, conflicts atomic.Int64
		for _, p := range providers {
			for i := range events {
				id := fmt.Sprintf("evt_shared_%d", i) // the same IDs for every provider
				payload := eventFor(p.name, id)
				for c := range copies + 1 {
					header := p.deliver(id, payload)
					if c == copies {
						header = p.forge(id, payload)
					}
					wg.Add(1)
					go func() {
						defer wg.Done()
						req := httptest.NewRequest(http.MethodPost, "/webhooks/"+p.name, bytes.NewReader(payload))
						req.Header = header
						rec := httptest.NewRecorder()
						handlers[p.name].ServeHTTP(rec, req)
						switch rec.Code {
						case http.StatusOK:
							ok.Add(1)
						case http.StatusBadRequest:
							rejected.Add(1)
						case http.StatusConflict: // another copy held the event; the sender retries
							conflicts.Add(1)
						default:
							t.Errorf("%s %s: %d %s", p.name, id, rec.Code, rec.Body)
						}
					}()
				}
			}
		}
		wg.Wait()
		assert.Len(t, processed, len(providers)*events, "every provider's every event, the same IDs kept apart")
		for key, n := range processed {
			assert.Equal(t, 1, n, "%s processed once", key)
		}
		assert.Equal(t, int64(len(providers)*events), rejected.Load(), "each forged delivery refused")
		t.Logf("%d providers × %d events × %d deliveries: %d answered 200, %d 409 (held by another copy), %d forged refused; each event processed once",
			len(providers), events, copies, ok.Load(), conflicts.Load(), rejected.Load())
	})
}

// TestWebhookBadInputEveryProvider: missing or malformed signature
// headers, an oversized body and an empty ID get a 400 (or 413) problem,
// run nothing, store nothing, and are counted as rejected.
func TestWebhookBadInputEveryProvider(t *testing.T) {
	for _, p := range providers {
		t.Run(p.name, func(t *testing.T) {
			store := idempotency.NewMemoryStore(idempotency.MemoryOptions{})
			var calls atomic.Int64
			obs := &observed{}
			h, err := idempotency.NewWebhookHandler(store, p.v(t), func(context.Context, idempotency.WebhookEvent) error {
				calls.Add(1)
				return nil
			}, idempotency.WebhookOptions{Observer: obs.observe, MaxBodyBytes: 1024})
			require.NoError(t, err)
			payload := eventFor(p.name, "evt_bad")
			big := bytes.Repeat([]byte(" "), 2048)
			cases := map[string]struct {
				header  http.Header
				payload []byte
				status  int
			}{
				"no headers":          {http.Header{}, payload, 400},
				"malformed signature": {withGarbledSignature(p.deliver("evt_bad", payload)), payload, 400},
				"forged":              {p.forge("evt_bad", payload), payload, 400},
				"oversized body":      {p.deliver("evt_bad", big), big, 413},
			}
			if p.name != "standard-webhooks" { // its ID is a header its signature covers
				empty := eventFor(p.name, "")
				cases["empty id"] = struct {
					header  http.Header
					payload []byte
					status  int
				}{p.deliver("", empty), empty, 400}
			}
			for name, c := range cases {
				req := httptest.NewRequest(http.MethodPost, "/webhooks", bytes.NewReader(c.payload))
				req.Header = c.header
				rec := serve(h, req)
				whAssertProblem(t, rec, c.status)
				assert.Equal(t, idempotency.OutcomeRejected, obs.last().Outcome, name)
			}
			assert.Zero(t, calls.Load())
			assert.Zero(t, store.Len(), "nothing stored")
		})
	}
}

// withGarbledSignature breaks every signature header of h.
func withGarbledSignature(h http.Header) http.Header {
	for _, name := range []string{"Stripe-Signature", "Webhook-Signature", "X-Hub-Signature-256"} {
		if h.Get(name) != "" {
			h.Set(name, "garbage")
		}
	}
	return h
}

// FuzzVerifiers: arbitrary headers and bodies never panic a verifier, and
// a delivery is accepted only when it carries its body's signature.
func FuzzVerifiers(f *testing.F) {
	f.Add(swID, strconv.Itoa(swTimestamp), swSignature, "sha256=00", []byte(swPayload))
	f.Add("", "", "v1,", "sha256=", []byte{})
	f.Add("a.b", "-1", "v1,AAAA v1,==== v2,x", "sha256=zz", []byte(`{"type":1}`))
	sw, err := idempotency.NewStandardWebhooksVerifier([]string{swSecret}, 0)
	if err != nil {
		f.Fatal(err)
	}
	gh, err := idempotency.NewGitHubVerifier([]string{"gh-secret"})
	if err != nil {
		f.Fatal(err)
	}
	at := time.Unix(swTimestamp, 0)
	f.Fuzz(func(t *testing.T, id, ts, swSig, ghSig string, payload []byte) {
		h := http.Header{"Webhook-Id": {id}, "Webhook-Timestamp": {ts}, "Webhook-Signature": {swSig}}
		if _, err := sw.Verify(h, payload, at); err == nil {
			unix, _ := strconv.ParseInt(ts, 10, 64)
			if !strings.Contains(swSig, swSign(swSecret, id, unix, payload)) {
				t.Fatalf("standard webhooks accepted a delivery without its signature: %q", swSig)
			}
		}
		h = http.Header{"X-Hub-Signature-256": {ghSig}, "X-Github-Delivery": {id}}
		if _, err := gh.Verify(h, payload, at); err == nil && !strings.EqualFold(ghSig, ghSign("gh-secret", payload)) {
			t.Fatalf("github accepted a delivery without its signature: %q", ghSig)
		}
	})
}
