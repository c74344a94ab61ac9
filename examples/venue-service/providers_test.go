package main

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"
)

// signPartner signs a delivery as the partner does (Standard Webhooks),
// with the service's development secret unless another is given.
func signPartner(id string, payload string, secret ...string) []string {
	s := devPartnerSecret
	if len(secret) > 0 {
		s = secret[0]
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(s, "whsec_"))
	if err != nil {
		panic(err)
	}
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	mac := hmac.New(sha256.New, key)
	fmt.Fprintf(mac, "%s.%s.%s", id, ts, payload)
	return []string{"Webhook-Id", id, "Webhook-Timestamp", ts, "Webhook-Signature", "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))}
}

// TestWebhooksFromBothProviders: Stripe's deliveries and the partner's
// (Standard Webhooks), each event delivered three times at once and once
// more with a forged signature, on the memory store (the synchronous
// handler) and on PostgreSQL (the inbox and its worker): every event
// processed once, every forged delivery 400.
func TestWebhooksFromBothProviders(t *testing.T) {
	for _, store := range []struct {
		name string
		env  func(t *testing.T) []string
	}{
		{"memory", func(*testing.T) []string { return nil }},
		{"postgres", func(t *testing.T) []string { return []string{databaseURLEnv(t)} }},
	} {
		t.Run(store.name, func(t *testing.T) {
			p := start(t, store.env(t)...)
			const events, copies = 8, 3
			var wg sync.WaitGroup
			var mu sync.Mutex
			codes := map[string]map[int]int{"stripe": {}, "partner": {}}
			count := func(provider string, r response) {
				mu.Lock()
				codes[provider][r.status]++
				mu.Unlock()
			}
			for i := range events {
				stripePayload := fmt.Sprintf(`{"id":"evt_%s","object":"event","type":"account.updated","api_version":%q,"created":%d,`+
					`"data":{"object":{"id":"acct_nobody_%d","object":"account","charges_enabled":true}}}`,
					rand.Text(), stripe.APIVersion, time.Now().Unix(), i)
				partnerID := "msg_" + rand.Text()
				partnerPayload := fmt.Sprintf(`{"type":"ticket.sold","data":{"ticket":%d}}`, i)
				for c := range copies + 1 {
					wg.Add(2)
					go func() {
						defer wg.Done()
						sig := signWithBinary(t, stripePayload)
						if c == copies {
							sig = webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: []byte(stripePayload), Secret: "whsec_forged", Timestamp: time.Now()}).Header
						}
						count("stripe", do(t, http.MethodPost, p.url+"/webhooks/stripe", stripePayload, "Stripe-Signature", sig))
					}()
					go func() {
						defer wg.Done()
						header := signPartner(partnerID, partnerPayload)
						if c == copies {
							header = signPartner(partnerID, partnerPayload, "whsec_"+base64.StdEncoding.EncodeToString([]byte("forged")))
						}
						count("partner", do(t, http.MethodPost, p.url+"/webhooks/partner", partnerPayload, header...))
					}()
				}
			}
			wg.Wait()
			for provider, byStatus := range codes {
				assert.Equal(t, events, byStatus[http.StatusBadRequest], "%s: every forged delivery refused: %v", provider, byStatus)
				assert.Equal(t, events*(copies+1), byStatus[http.StatusOK]+byStatus[http.StatusConflict]+byStatus[http.StatusBadRequest],
					"%s: only 200, 409 (another copy held the event) and 400: %v", provider, byStatus)
			}
			require.Eventually(t, func() bool {
				s := p.stats()
				return s.WebhookEventsProcessed == events && s.PartnerEventsProcessed == events
			}, 30*time.Second, 50*time.Millisecond, "every event processed")
			s := p.stats()
			assert.Equal(t, events, s.WebhookEventsProcessed, "each Stripe event once")
			assert.Equal(t, events, s.PartnerEventsProcessed, "each partner event once")
			t.Logf("%s: %d events per provider, %d deliveries each and one forged: %v", store.name, events, copies, codes)
			p.stop()
		})
	}
}
