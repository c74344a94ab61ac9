package idemgrpc

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Stream is a [grpc.StreamServerInterceptor] that applies the rule for
// streaming methods: they are not protected, since a stream's messages
// are neither held, stored nor replayed. A streaming call without a key
// passes through untouched; one that carries the [KeyMetadata] metadata
// is refused with UNIMPLEMENTED before its handler runs, rather than
// served as if the key protected it: its client expects a retry to be
// safe, and it would not be. Install it with
// [grpc.ChainStreamInterceptor]; without it, every stream passes through.
func (s *ServerInterceptor) Stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if md, ok := metadata.FromIncomingContext(ss.Context()); ok && len(md[KeyMetadata]) > 0 {
		return status.Error(codes.Unimplemented, "idemgrpc: "+info.FullMethod+" is a streaming method, which idempotency keys cannot protect; send it without "+KeyMetadata)
	}
	return handler(srv, ss)
}
