package rpcrecord

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sync"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/seed70ea8305/idempotency"
)

// Key returns the key of a call and where it came from (the field's name
// or [MetadataKey]), for the details of an error about it: the key in the
// request's field fd when fd is not nil and the field is set, else the one
// value of the key metadata, values. A field's key is 1 to maxField
// printable ASCII characters without spaces, quotes or commas; a
// metadata key is what [idempotency.ParseKey] accepts, as the
// Idempotency-Key header. A request whose field and metadata both carry
// a key, and different ones, is refused. Errors wrap
// [idempotency.ErrKeyMissing] or [idempotency.ErrKeyInvalid].
func Key(msg protoreflect.Message, fd protoreflect.FieldDescriptor, values []string, maxField int) (key, source string, err error) {
	if fd != nil {
		if key = msg.Get(fd).String(); key != "" {
			source = string(fd.Name())
			if err := checkFieldKey(key, maxField); err != nil {
				return "", source, fmt.Errorf("%w: %s %s", idempotency.ErrKeyInvalid, source, err)
			}
			if len(values) > 0 {
				if meta, err := ParseMetadata(values); err != nil || meta != key {
					return "", source, fmt.Errorf("%w: %s and the %s metadata name different keys", idempotency.ErrKeyInvalid, source, MetadataKey)
				}
			}
			return key, source, nil
		}
	}
	source = MetadataKey
	if fd != nil && len(values) == 0 {
		source = string(fd.Name()) // the place the client was expected to fill
	}
	key, err = ParseMetadata(values)
	return key, source, err
}

// ParseMetadata reads the key metadata's values: exactly one, which
// [idempotency.ParseKey] accepts.
func ParseMetadata(values []string) (string, error) {
	switch len(values) {
	case 0:
		return "", idempotency.ErrKeyMissing
	case 1:
		return idempotency.ParseKey(values[0])
	}
	return "", fmt.Errorf("%w: several %s values", idempotency.ErrKeyInvalid, MetadataKey)
}

func checkFieldKey(key string, max int) error {
	if len(key) > max {
		return fmt.Errorf("is longer than %d characters", max)
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c < 0x21 || c > 0x7e || c == '"' || c == ',' {
			return fmt.Errorf("holds %q at %d: a key is printable ASCII without spaces, quotes or commas", c, i)
		}
	}
	return nil
}

// deterministic encodes requests for their fingerprints: equal messages,
// maps included, give equal bytes.
var deterministic = proto.MarshalOptions{Deterministic: true}

// Requests are encoded into pooled buffers: an encoding is needed only
// until it is hashed.
var bufferPool = sync.Pool{New: func() any { b := make([]byte, 0, 1<<10); return &b }}

const maxPooledBuffer = 64 << 10

// Fingerprint returns the identity of a call: the hex SHA-256 of its full
// method and of the deterministic protobuf encoding of its request without
// the key field fd (nil when the key is not in the message), so that a
// retry that changes nothing but a regenerated key is the same request.
// The deterministic encoding is stable for one build of one schema; a
// change of either between a call and its retry can make them differ
// (the retry then gets FAILED_PRECONDITION, never another request's
// outcome).
func Fingerprint(fullMethod string, msg proto.Message, fd protoreflect.FieldDescriptor) (string, error) {
	bp := bufferPool.Get().(*[]byte)
	defer func() {
		if cap(*bp) <= maxPooledBuffer {
			bufferPool.Put(bp)
		}
	}()
	b := append((*bp)[:0], fullMethod...)
	b = append(b, 0)
	start := len(b)
	b, err := deterministic.MarshalAppend(b, msg)
	*bp = b
	if err != nil {
		return "", fmt.Errorf("encoding the request: %w", err)
	}
	if fd != nil {
		if b, err = stripField(b, start, fd.Number()); err != nil {
			return "", err
		}
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

// stripField removes every occurrence of the top-level field num from the
// encoded message b[start:], in place, as clearing the field before
// encoding it would.
func stripField(b []byte, start int, num protowire.Number) ([]byte, error) {
	out := start
	for i := start; i < len(b); {
		n, typ, tagLen := protowire.ConsumeTag(b[i:])
		if tagLen < 0 {
			return nil, fmt.Errorf("encoding the request: %w", protowire.ParseError(tagLen))
		}
		valLen := protowire.ConsumeFieldValue(n, typ, b[i+tagLen:])
		if valLen < 0 {
			return nil, fmt.Errorf("encoding the request: %w", protowire.ParseError(valLen))
		}
		end := i + tagLen + valLen
		if n != num {
			out += copy(b[out:], b[i:end])
		}
		i = end
	}
	return b[:out], nil
}
