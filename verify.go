package idempotency

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/seed70ea8305/idempotency/internal/stripeevent"
	"github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"
)

// A Verifier authenticates the webhook deliveries of one provider and
// names the event each one carries. The webhook handler
// ([NewWebhookHandler]) and pgstore's inbox verify every delivery with one
// before they read or store anything else. This package has one for
// Stripe ([NewStripeVerifier]), one for providers that follow the
// Standard Webhooks specification ([NewStandardWebhooksVerifier]) and one
// for GitHub ([NewGitHubVerifier]); another provider takes a few lines
// (see the example of Verifier). Implementations must be safe for
// concurrent use.
type Verifier interface {
	// Provider names the provider, a short constant such as "stripe":
	// records are kept per provider, so two providers' event IDs never
	// collide, and reports and metrics carry it.
	Provider() string

	// Verify checks the signature that header carries over payload, the
	// raw body, at time now, and returns the event it names: at least its
	// ID (unique for the provider, 1 to 255 bytes), and its Type where the
	// delivery says it. The error wraps [ErrWebhookSignature] when the
	// delivery is not authentic (a signature header missing, malformed,
	// matching no secret, or too old), and [ErrWebhookPayload] when it is
	// but names no event.
	Verify(header http.Header, payload []byte, now time.Time) (WebhookEvent, error)
}

// The providers' names, as this package's Verifiers report them.
const (
	providerStripe           = "stripe"
	providerStandardWebhooks = "standard-webhooks"
	providerGitHub           = "github"
)

// defaultWebhookTolerance is how old (and, for Standard Webhooks, how far
// ahead) a signature's timestamp may be: Stripe's and the Standard
// Webhooks specification's 5 minutes.
const defaultWebhookTolerance = 5 * time.Minute

// checkSecrets refuses an empty list of secrets or an empty secret.
func checkSecrets(what string, secrets []string) error {
	if len(secrets) == 0 {
		return fmt.Errorf("idempotency: %s: no signing secret", what)
	}
	for i, s := range secrets {
		if s == "" {
			return fmt.Errorf("idempotency: %s: signing secret %d is empty", what, i)
		}
	}
	return nil
}

// signatureError is an [ErrWebhookSignature] with a detail for the sender.
func signatureError(detail string, cause error) error {
	return &requestError{kind: ErrWebhookSignature.(*kind), detail: detail, cause: cause}
}

// checkEventID refuses an event ID the store could not key.
func checkEventID(id string) error {
	switch {
	case id == "":
		return newRequestError(ErrWebhookPayload, "event without an id")
	case len(id) > maxKeyLength:
		return newRequestError(ErrWebhookPayload, fmt.Sprintf("event id longer than %d bytes", maxKeyLength))
	}
	return nil
}

// NewStripeVerifier returns a Verifier of Stripe's webhook deliveries: the
// Stripe-Signature header (t=…,v1=…), an HMAC-SHA256 of "t.payload" under
// one of secrets (the endpoint's signing secrets, "whsec_…"; list the old
// and the new one while rolling a secret), with its timestamp at most
// tolerance old (0: 5 minutes, as stripe-go). The signature is checked with
// stripe-go's webhook package.
//
// Events of every Stripe API version are accepted: an endpoint's version
// follows its account's, and a receiver that refused other versions would
// make Stripe retry every delivery for three days and then disable the
// endpoint. [WebhookEvent.Stripe] holds the event decoded as far as
// stripe-go v76 (API version 2023-10-16) can: fully, or, where a newer
// version changed a field's type, its ID, type, API version, creation time
// and data object as a map ([stripe.EventData.Object] and Raw). Its
// APIVersion says which version the payload is in; [WebhookEvent.Object] is
// the data object's id, for per-object ordering.
func NewStripeVerifier(secrets []string, tolerance time.Duration) (Verifier, error) {
	if err := checkSecrets("stripe verifier", secrets); err != nil {
		return nil, err
	}
	if tolerance < 0 {
		return nil, fmt.Errorf("idempotency: stripe verifier: tolerance %v is negative", tolerance)
	}
	if tolerance == 0 {
		tolerance = defaultWebhookTolerance
	}
	return &stripeVerifier{secrets: append([]string(nil), secrets...), tolerance: tolerance}, nil
}

type stripeVerifier struct {
	secrets   []string
	tolerance time.Duration
}

func (*stripeVerifier) Provider() string { return providerStripe }

const stripeSignatureHeader = "Stripe-Signature"

func (v *stripeVerifier) Verify(header http.Header, payload []byte, now time.Time) (WebhookEvent, error) {
	sig := header.Get(stripeSignatureHeader)
	var err error
	for _, secret := range v.secrets {
		// The age is checked below against now; stripe-go would read
		// time.Now.
		err = webhook.ValidatePayloadIgnoringTolerance(payload, sig, secret)
		if !errors.Is(err, webhook.ErrNoValidSignature) {
			break
		}
	}
	if err != nil {
		return WebhookEvent{}, signatureError(err.Error(), err)
	}
	if now.Sub(stripeSignatureTime(sig)) > v.tolerance {
		return WebhookEvent{}, signatureError(webhook.ErrTooOld.Error(), webhook.ErrTooOld)
	}
	event, err := decodeStripeEvent(payload)
	if err != nil {
		return WebhookEvent{}, err
	}
	if err := checkEventID(event.ID); err != nil {
		return WebhookEvent{}, err
	}
	ev := WebhookEvent{ID: event.ID, Type: string(event.Type), APIVersion: event.APIVersion, Payload: payload, Stripe: event}
	if event.Data != nil {
		ev.Object, _ = event.Data.Object["id"].(string)
	}
	return ev, nil
}

// decodeStripeEvent decodes a Stripe event as far as stripe-go can (see
// package internal/stripeevent); a payload that is not an event is an
// [ErrWebhookPayload] that says why without echoing it.
func decodeStripeEvent(payload []byte) (*stripe.Event, error) {
	event, err := stripeevent.Decode(payload)
	if err != nil {
		return nil, newRequestError(ErrWebhookPayload, eventJSONErrorText(err))
	}
	return event, nil
}

// stripeSignatureTime returns the timestamp of a Stripe-Signature header
// that stripe-go has accepted, read the way stripe-go reads it: the last
// "t=" pair wins, and a header without one has the zero time.
func stripeSignatureTime(header string) time.Time {
	var t time.Time
	for _, pair := range strings.Split(header, ",") {
		name, value, ok := strings.Cut(pair, "=")
		if !ok || name != "t" {
			continue
		}
		if unix, err := strconv.ParseInt(value, 10, 64); err == nil {
			t = time.Unix(unix, 0)
		}
	}
	return t
}

// eventJSONErrorText describes why a payload is not an event without
// echoing it.
func eventJSONErrorText(err error) string {
	var typeErr *json.UnmarshalTypeError
	if errors.As(err, &typeErr) {
		return fmt.Sprintf("field %q has the wrong type", typeErr.Field)
	}
	return jsonErrorText(err)
}

// NewStandardWebhooksVerifier returns a Verifier of deliveries signed as
// the Standard Webhooks specification (standardwebhooks.com) says, which
// Svix's customers and many other providers send: the webhook-id,
// webhook-timestamp (Unix seconds) and webhook-signature headers, the
// latter one or more space-separated "v1,<base64>" signatures, each an
// HMAC-SHA256 of "id.timestamp.payload". secrets are "whsec_<base64>" (or
// the bare base64); any of them may match. A timestamp further than
// tolerance (0: 5 minutes) in the past or the future is refused. The
// event's ID is the webhook-id, its Type the payload's "type" field when
// the payload is a JSON object that has one.
func NewStandardWebhooksVerifier(secrets []string, tolerance time.Duration) (Verifier, error) {
	if err := checkSecrets("standard webhooks verifier", secrets); err != nil {
		return nil, err
	}
	if tolerance < 0 {
		return nil, fmt.Errorf("idempotency: standard webhooks verifier: tolerance %v is negative", tolerance)
	}
	if tolerance == 0 {
		tolerance = defaultWebhookTolerance
	}
	v := &standardWebhooksVerifier{tolerance: tolerance}
	for i, s := range secrets {
		key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(s, "whsec_"))
		if err != nil || len(key) == 0 {
			return nil, fmt.Errorf("idempotency: standard webhooks verifier: secret %d is not whsec_ and base64", i)
		}
		v.keys = append(v.keys, key)
	}
	return v, nil
}

type standardWebhooksVerifier struct {
	keys      [][]byte
	tolerance time.Duration
}

func (*standardWebhooksVerifier) Provider() string { return providerStandardWebhooks }

func (v *standardWebhooksVerifier) Verify(header http.Header, payload []byte, now time.Time) (WebhookEvent, error) {
	id, ts, sigs := header.Get("Webhook-Id"), header.Get("Webhook-Timestamp"), header.Get("Webhook-Signature")
	switch {
	case id == "" || ts == "" || sigs == "":
		return WebhookEvent{}, signatureError("webhook-id, webhook-timestamp or webhook-signature header missing", nil)
	}
	unix, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return WebhookEvent{}, signatureError("webhook-timestamp is not Unix seconds", nil)
	}
	if d := now.Sub(time.Unix(unix, 0)); d > v.tolerance || d < -v.tolerance {
		return WebhookEvent{}, signatureError("webhook-timestamp outside the tolerance", nil)
	}
	signed := make([]byte, 0, len(id)+len(ts)+len(payload)+2)
	signed = append(append(append(append(append(signed, id...), '.'), ts...), '.'), payload...)
	if !v.matches(signed, sigs) {
		return WebhookEvent{}, signatureError("no webhook-signature matches", nil)
	}
	if err := checkEventID(id); err != nil {
		return WebhookEvent{}, err
	}
	return WebhookEvent{ID: id, Type: jsonType(payload), Payload: payload}, nil
}

// matches reports whether one of the "v1,<base64>" signatures in sigs is
// the HMAC of signed under one of the keys; other versions are skipped.
func (v *standardWebhooksVerifier) matches(signed []byte, sigs string) bool {
	var sums [][]byte
	for _, key := range v.keys {
		mac := hmac.New(sha256.New, key)
		mac.Write(signed)
		sums = append(sums, mac.Sum(nil))
	}
	for _, sig := range strings.Fields(sigs) {
		version, encoded, ok := strings.Cut(sig, ",")
		if !ok || version != "v1" {
			continue
		}
		// Strict: a signature's last character may not carry bits the
		// MAC does not have, so only the one encoding of a MAC matches
		// (as the reference libraries, which compare the base64 text).
		got, err := base64.StdEncoding.Strict().DecodeString(encoded)
		if err != nil {
			continue
		}
		for _, sum := range sums {
			if hmac.Equal(got, sum) {
				return true
			}
		}
	}
	return false
}

// jsonType returns the "type" string of a JSON object, or "".
func jsonType(payload []byte) string {
	var v struct {
		Type string `json:"type"`
	}
	if json.Unmarshal(payload, &v) != nil {
		return ""
	}
	return v.Type
}

// NewGitHubVerifier returns a Verifier of GitHub's webhook deliveries:
// the X-Hub-Signature-256 header ("sha256=<hex>"), an HMAC-SHA256 of the
// payload under one of secrets. The event's ID is the X-GitHub-Delivery
// GUID, its Type the X-GitHub-Event header. GitHub signs no timestamp, so
// a captured delivery stays valid: the ID's record, kept for the handler's
// TTL, is what stops a replay of it from running the function again.
func NewGitHubVerifier(secrets []string) (Verifier, error) {
	if err := checkSecrets("github verifier", secrets); err != nil {
		return nil, err
	}
	v := &gitHubVerifier{}
	for _, s := range secrets {
		v.keys = append(v.keys, []byte(s))
	}
	return v, nil
}

type gitHubVerifier struct{ keys [][]byte }

func (*gitHubVerifier) Provider() string { return providerGitHub }

func (v *gitHubVerifier) Verify(header http.Header, payload []byte, _ time.Time) (WebhookEvent, error) {
	sig, ok := strings.CutPrefix(header.Get("X-Hub-Signature-256"), "sha256=")
	if !ok {
		return WebhookEvent{}, signatureError("X-Hub-Signature-256 header missing or not sha256=<hex>", nil)
	}
	got, err := hex.DecodeString(sig)
	if err != nil {
		return WebhookEvent{}, signatureError("X-Hub-Signature-256 is not hex", nil)
	}
	matched := false
	for _, key := range v.keys {
		mac := hmac.New(sha256.New, key)
		mac.Write(payload)
		if hmac.Equal(got, mac.Sum(nil)) {
			matched = true
			break
		}
	}
	if !matched {
		return WebhookEvent{}, signatureError("X-Hub-Signature-256 matches no secret", nil)
	}
	id := header.Get("X-GitHub-Delivery")
	if err := checkEventID(id); err != nil {
		return WebhookEvent{}, err
	}
	return WebhookEvent{ID: id, Type: header.Get("X-GitHub-Event"), Payload: payload}, nil
}
