module github.com/seed70ea8305/idempotency/console

go 1.25

require (
	github.com/jackc/pgx/v5 v5.7.6
	github.com/seed70ea8305/idempotency v0.0.0-00010101000000-000000000000
	github.com/seed70ea8305/idempotency/internal/pgtest v0.0.0-00010101000000-000000000000
	github.com/seed70ea8305/idempotency/pgstore v0.0.0-00010101000000-000000000000
	github.com/stretchr/testify v1.12.1
	go.uber.org/goleak v1.3.0
)

require (
	github.com/cespare/xxhash/v2 v2.3.0 // indirect
	github.com/jackc/pgpassfile v1.0.0 // indirect
	github.com/jackc/pgservicefile v0.0.0-20240606120523-5a60cdf6a761 // indirect
	github.com/jackc/puddle/v2 v2.2.2 // indirect
	github.com/redis/go-redis/v9 v9.22.0 // indirect
	github.com/stripe/stripe-go/v76 v76.25.0 // indirect
	go.uber.org/atomic v1.11.0 // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
	golang.org/x/crypto v0.38.0 // indirect
	golang.org/x/sync v0.15.0 // indirect
	golang.org/x/sys v0.35.0 // indirect
	golang.org/x/text v0.25.0 // indirect
)

replace (
	github.com/seed70ea8305/idempotency => ../
	github.com/seed70ea8305/idempotency/internal/pgtest => ../internal/pgtest
	github.com/seed70ea8305/idempotency/pgstore => ../pgstore
)
