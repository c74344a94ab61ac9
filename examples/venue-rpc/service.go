package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"

	"google.golang.org/genproto/googleapis/rpc/code"

	"github.com/seed70ea8305/idempotency"
	venuev1 "github.com/seed70ea8305/idempotency/examples/venue-rpc/venue/v1"
)

// venues is the venue creation of examples/venue-service, whatever the
// transport: three steps, each ending with a recovery point of the call's
// claim, so that a retry after a failure resumes where the last attempt
// stopped instead of starting over:
//
//  1. the venue, pending ("venue_created");
//  2. its payment account ("account_created"), created with a key derived
//     from the call's key, so even a retry that repeats the call gets the
//     account created the first time;
//  3. the venue, active: the response.
type venues struct {
	payments payments

	// failAfter, when set, is asked after each step whether to fail
	// there (with UNAVAILABLE, which frees the key): the tests' switch.
	failAfter func(point string) bool

	mu  sync.Mutex
	all []*venuev1.Venue
}

// payments is the payment provider the venue's account is opened with.
type payments interface {
	// CreateAccount opens an account for the venue and returns its ID;
	// called again with the same key, it returns the same account, as
	// Stripe does.
	CreateAccount(ctx context.Context, key, venueID string) (string, error)
}

// apiError is an answer of the service with its google.rpc code; each
// transport turns it into its own error.
type apiError struct {
	code code.Code
	msg  string
}

func (e *apiError) Error() string { return e.msg }

// progress is the data of the recovery points.
type progress struct {
	VenueID   string `json:"venue_id"`
	AccountID string `json:"account_id,omitempty"`
}

func (v *venues) create(ctx context.Context, tenant string, in *venuev1.CreateVenueRequest) (*venuev1.Venue, error) {
	name, slug := strings.TrimSpace(in.GetName()), strings.TrimSpace(in.GetSlug())
	if name == "" || slug == "" {
		// Kept: the same request gets the same answer.
		return nil, &apiError{code.Code_INVALID_ARGUMENT, "name and slug are required"}
	}
	claim, ok := idempotency.ClaimFromContext(ctx)
	if !ok {
		return nil, errors.New("no idempotent call in the context")
	}
	var p progress
	if claim.RecoveryPoint != "" {
		if err := json.Unmarshal(claim.RecoveryData, &p); err != nil {
			return nil, fmt.Errorf("reading the recovery point: %w", err)
		}
	}
	switch claim.RecoveryPoint {
	case "":
		key, err := idempotency.StripeKey(ctx, "venues.create")
		if err != nil {
			return nil, err
		}
		sum := sha256.Sum256([]byte(key))
		p.VenueID = "ven_" + hex.EncodeToString(sum[:8])
		if err := v.insert(&venuev1.Venue{Id: p.VenueID, Tenant: tenant, Name: name, Slug: slug, Status: "pending"}); err != nil {
			return nil, err
		}
		if err := v.step(ctx, claim, "venue_created", p); err != nil {
			return nil, err
		}
		fallthrough
	case "venue_created":
		key, err := idempotency.StripeKey(ctx, "accounts.create")
		if err != nil {
			return nil, err
		}
		if p.AccountID, err = v.payments.CreateAccount(ctx, key, p.VenueID); err != nil {
			return nil, &apiError{code.Code_UNAVAILABLE, "the payment provider failed; retry with the same request_id"}
		}
		v.update(tenant, p.VenueID, func(ven *venuev1.Venue) { ven.PaymentAccountId = p.AccountID })
		if err := v.step(ctx, claim, "account_created", p); err != nil {
			return nil, err
		}
		fallthrough
	case "account_created":
		var out *venuev1.Venue
		v.update(tenant, p.VenueID, func(ven *venuev1.Venue) {
			ven.Status = "active"
			out = cloneVenue(ven)
		})
		if out == nil {
			return nil, &apiError{code.Code_INTERNAL, "the venue disappeared"}
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown recovery point %q", claim.RecoveryPoint)
}

// step records a recovery point, then asks the test switch whether to
// fail there.
func (v *venues) step(ctx context.Context, claim idempotency.Claim, point string, p progress) error {
	data, _ := json.Marshal(p) // two strings always encode
	if err := claim.Checkpoint(ctx, point, data); err != nil {
		return err
	}
	if v.failAfter != nil && v.failAfter(point) {
		return &apiError{code.Code_UNAVAILABLE, "injected failure after " + point}
	}
	return nil
}

func (v *venues) insert(ven *venuev1.Venue) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, o := range v.all {
		switch {
		case o.Id == ven.Id:
			return nil // stored by an attempt that stopped before its recovery point
		case o.Tenant == ven.Tenant && o.Slug == ven.Slug:
			return &apiError{code.Code_ALREADY_EXISTS, fmt.Sprintf("another venue already uses the slug %q", ven.Slug)}
		}
	}
	v.all = append(v.all, ven)
	return nil
}

func (v *venues) update(tenant, id string, change func(*venuev1.Venue)) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, ven := range v.all {
		if ven.Tenant == tenant && ven.Id == id {
			change(ven)
		}
	}
}

func (v *venues) get(tenant, id string) (*venuev1.Venue, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, ven := range v.all {
		if ven.Tenant == tenant && ven.Id == id {
			return cloneVenue(ven), nil
		}
	}
	return nil, &apiError{code.Code_NOT_FOUND, "no such venue"}
}

func cloneVenue(v *venuev1.Venue) *venuev1.Venue {
	return &venuev1.Venue{Id: v.Id, Tenant: v.Tenant, Name: v.Name, Slug: v.Slug, PaymentAccountId: v.PaymentAccountId, Status: v.Status}
}

// fakePayments is the payment provider of the example: accounts in
// memory, one per key.
type fakePayments struct {
	mu       sync.Mutex
	accounts map[string]string // key → account ID
}

func (f *fakePayments) CreateAccount(_ context.Context, key, venueID string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.accounts == nil {
		f.accounts = map[string]string{}
	}
	if id, ok := f.accounts[key]; ok {
		return id, nil
	}
	id := fmt.Sprintf("acct_%d_%s", len(f.accounts)+1, strings.TrimPrefix(venueID, "ven_"))
	f.accounts[key] = id
	return id, nil
}

// count returns how many accounts were opened.
func (f *fakePayments) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.accounts)
}
