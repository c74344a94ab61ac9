module github.com/seed70ea8305/idempotency/idemecho

go 1.26.0

require (
	github.com/labstack/echo/v4 v4.16.5
	github.com/seed70ea8305/idempotency v0.0.0-00010101000000-000000000000
	github.com/seed70ea8305/idempotency/internal/transporttest v0.0.0-00010101000000-000000000000
	go.uber.org/goleak v1.3.0
)

require (
	github.com/cespare/xxhash/v2 v2.3.0 // indirect
	github.com/labstack/gommon v0.5.0 // indirect
	github.com/mattn/go-colorable v0.1.15 // indirect
	github.com/mattn/go-isatty v0.0.22 // indirect
	github.com/redis/go-redis/v9 v9.22.0 // indirect
	github.com/stripe/stripe-go/v76 v76.25.0 // indirect
	github.com/valyala/bytebufferpool v1.0.0 // indirect
	github.com/valyala/fasttemplate v1.2.2 // indirect
	go.uber.org/atomic v1.11.0 // indirect
	golang.org/x/crypto v0.57.0 // indirect
	golang.org/x/net v0.60.0 // indirect
	golang.org/x/sys v0.48.0 // indirect
	golang.org/x/text v0.42.0 // indirect
	golang.org/x/time v0.15.0 // indirect
)

replace (
	github.com/seed70ea8305/idempotency => ../
	github.com/seed70ea8305/idempotency/internal/transporttest => ../internal/transporttest
)
