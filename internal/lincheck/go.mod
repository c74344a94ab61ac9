module github.com/seed70ea8305/idempotency/internal/lincheck

go 1.24

require (
	github.com/anishathalye/porcupine v1.3.1
	github.com/jackc/pgx/v5 v5.7.6
	github.com/redis/go-redis/v9 v9.22.0
	github.com/seed70ea8305/idempotency v0.0.0-00010101000000-000000000000
	github.com/seed70ea8305/idempotency/internal/pgtest v0.0.0-00010101000000-000000000000
	github.com/seed70ea8305/idempotency/pgstore v0.0.0-00010101000000-000000000000
)

require (
	github.com/alicebob/miniredis/v2 v2.40.0 // indirect
	github.com/cespare/xxhash/v2 v2.3.0 // indirect
	github.com/jackc/pgpassfile v1.0.0 // indirect
	github.com/jackc/pgservicefile v0.0.0-20240606120523-5a60cdf6a761 // indirect
	github.com/jackc/puddle/v2 v2.2.2 // indirect
	github.com/stripe/stripe-go/v76 v76.25.0 // indirect
	github.com/yuin/gopher-lua v1.1.1 // indirect
	go.uber.org/atomic v1.11.0 // indirect
	golang.org/x/crypto v0.38.0 // indirect
	golang.org/x/sync v0.15.0 // indirect
	golang.org/x/sys v0.35.0 // indirect
	golang.org/x/text v0.25.0 // indirect
)

replace (
	github.com/seed70ea8305/idempotency => ../..
	github.com/seed70ea8305/idempotency/internal/pgtest => ../pgtest
	github.com/seed70ea8305/idempotency/pgstore => ../../pgstore
)
