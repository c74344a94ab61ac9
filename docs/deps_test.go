package docs_test

// The packages that snippets may import besides the standard library
// (see candidates in snippets_test.go), imported here so that go.mod
// requires them at the versions the library is built with.
import (
	_ "github.com/jackc/pgx/v5"
	_ "github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/redis/go-redis/v9"
	_ "github.com/stripe/stripe-go/v76"
	_ "go.opentelemetry.io/otel"

	_ "github.com/seed70ea8305/idempotency"
	_ "github.com/seed70ea8305/idempotency/idemclient"
	_ "github.com/seed70ea8305/idempotency/idemotel"
	_ "github.com/seed70ea8305/idempotency/pgstore"
	_ "github.com/seed70ea8305/idempotency/pgstore/inbox"
	_ "github.com/seed70ea8305/idempotency/pgstore/inbox/admin"
	_ "github.com/seed70ea8305/idempotency/storetest"
	_ "github.com/seed70ea8305/idempotency/stripefake"
)
