package stripefake_test

import (
	"fmt"

	"github.com/stripe/stripe-go/v76"

	"github.com/seed70ea8305/idempotency/stripefake"
)

// A retried call with the same Idempotency-Key creates one account, also
// when the first call's response was lost.
func Example() {
	fake, srv := stripefake.NewServer()
	defer srv.Close()
	sc := stripefake.NewClient(srv.URL, stripefake.TestAPIKey)

	// The first answer is lost after Stripe created the account.
	fake.Fail(stripefake.Failure{Method: "POST", Path: "/v1/accounts", AfterCreate: true})

	params := func() *stripe.AccountParams {
		p := &stripe.AccountParams{Type: stripe.String("express")}
		p.SetIdempotencyKey("venue-42:accounts.create")
		return p
	}
	_, err := sc.Accounts.New(params())
	fmt.Println("first call failed:", err != nil)
	acct, err := sc.Accounts.New(params())
	if err != nil {
		panic(err)
	}
	fmt.Println("retry replayed:", acct.LastResponse.Header.Get("Idempotent-Replayed"))
	fmt.Println("accounts created:", fake.AccountsCreated())
	// Output:
	// first call failed: true
	// retry replayed: true
	// accounts created: 1
}

// Test a webhook endpoint with the events the fake emits.
func ExampleFake_UpdateAccount() {
	fake, srv := stripefake.NewServer()
	defer srv.Close()
	sc := stripefake.NewClient(srv.URL, stripefake.TestAPIKey)
	acct, err := sc.Accounts.New(&stripe.AccountParams{Type: stripe.String("express")})
	if err != nil {
		panic(err)
	}

	event, err := fake.UpdateAccount(acct.ID, func(a *stripefake.Account) { a.ChargesEnabled = true })
	if err != nil {
		panic(err)
	}
	payload := event.Payload()
	signature := stripefake.Sign(payload, "whsec_test")
	// POST payload to your webhook endpoint with the header
	// Stripe-Signature: signature.
	fmt.Println(event.Type, event.Account == acct.ID, signature != "")
	// Output: account.updated true true
}
