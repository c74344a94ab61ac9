package testpb

// Regenerate with protoc (Debian: apt-get install protobuf-compiler) and
// the plugins at the versions the module requires:
//
//	go generate ./internal/transporttest/testpb
//
//go:generate sh ../../../examples/venue-rpc/protoc.sh op.proto
