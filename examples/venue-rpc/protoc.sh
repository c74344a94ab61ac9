#!/bin/sh
# protoc.sh FILE.proto...: generates, beside each file, the protobuf
# messages (FILE.pb.go), the grpc-go service (FILE_grpc.pb.go) and the
# Connect service (<package>connect/FILE.connect.go), with the plugins at
# pinned versions. Needs protoc (Debian: apt-get install protobuf-compiler)
# and Go; run it from the directory of the .proto files (go generate does).
set -eu
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
GOBIN=$bin GOWORK=off go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
GOBIN=$bin GOWORK=off go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.1
GOBIN=$bin GOWORK=off go install connectrpc.com/connect/cmd/protoc-gen-connect-go@v1.21.1
PATH=$bin:$PATH protoc -I . \
	--go_out=. --go_opt=paths=source_relative \
	--go-grpc_out=. --go-grpc_opt=paths=source_relative \
	--connect-go_out=. --connect-go_opt=paths=source_relative \
	"$@"
