module github.com/seed70ea8305/idempotency/examples/venue-rpc

go 1.26.0

require (
	connectrpc.com/connect v1.21.1
	github.com/seed70ea8305/idempotency v0.0.0-00010101000000-000000000000
	github.com/seed70ea8305/idempotency/idemconnect v0.0.0-00010101000000-000000000000
	github.com/seed70ea8305/idempotency/idemgrpc v0.0.0-00010101000000-000000000000
	go.uber.org/goleak v1.3.0
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260817212433-ac3dfec99bb1
	google.golang.org/grpc v1.82.1
	google.golang.org/protobuf v1.36.12
)

require (
	github.com/cespare/xxhash/v2 v2.3.0 // indirect
	github.com/redis/go-redis/v9 v9.22.0 // indirect
	github.com/seed70ea8305/idempotency/internal/rpcrecord v0.0.0-00010101000000-000000000000 // indirect
	github.com/stripe/stripe-go/v76 v76.25.0 // indirect
	go.uber.org/atomic v1.11.0 // indirect
	golang.org/x/net v0.60.0 // indirect
	golang.org/x/sys v0.48.0 // indirect
	golang.org/x/text v0.42.0 // indirect
)

replace (
	github.com/seed70ea8305/idempotency => ../..
	github.com/seed70ea8305/idempotency/idemconnect => ../../idemconnect
	github.com/seed70ea8305/idempotency/idemgrpc => ../../idemgrpc
	github.com/seed70ea8305/idempotency/internal/rpcrecord => ../../internal/rpcrecord
	github.com/seed70ea8305/idempotency/internal/transporttest => ../../internal/transporttest
	github.com/seed70ea8305/idempotency/internal/transporttest/testpb => ../../internal/transporttest/testpb
)
