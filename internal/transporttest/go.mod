module github.com/seed70ea8305/idempotency/internal/transporttest

go 1.24

require (
	github.com/seed70ea8305/idempotency v0.0.0-00010101000000-000000000000
	go.uber.org/goleak v1.3.0
)

require (
	github.com/cespare/xxhash/v2 v2.3.0 // indirect
	github.com/redis/go-redis/v9 v9.22.0 // indirect
	github.com/stripe/stripe-go/v76 v76.25.0 // indirect
	go.uber.org/atomic v1.11.0 // indirect
	golang.org/x/sys v0.35.0 // indirect
)

replace github.com/seed70ea8305/idempotency => ../..
