// Package venuev1 is the generated code of venue.proto: its messages, its
// grpc-go service (venue_grpc.pb.go) and its Connect service (package
// venuev1connect). Regenerate it, with protoc installed (Debian:
// apt-get install protobuf-compiler), from the module's root:
//
//	go generate ./venue/v1
package venuev1

//go:generate sh ../../protoc.sh venue.proto
