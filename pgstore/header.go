package pgstore

import (
	"fmt"
	"net/http"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/wire"
)

// The response header is stored in a bytea column, since header values may
// hold bytes (NUL, invalid UTF-8) that text and jsonb cannot: a version
// byte, then the header in the stores' one binary encoding (package
// internal/wire: a uvarint count of names, then per name the name, a
// uvarint count of values and each value, every string a uvarint length
// and its bytes). An empty header is stored as NULL.
const headerVersion = 0x01

// encodeHeader returns h encoded, or nil when h is empty.
func encodeHeader(h http.Header) []byte {
	if len(h) == 0 {
		return nil
	}
	b := make([]byte, 1, 1+wire.HeaderSize(h))
	b[0] = headerVersion
	return wire.AppendHeader(b, h)
}

// decodeHeader reverses encodeHeader; NULL (nil) is an empty header. What
// does not decode, whole, is an error wrapping
// [idempotency.ErrRecordUnreadable].
func decodeHeader(b []byte) (http.Header, error) {
	if len(b) == 0 {
		return nil, nil
	}
	if b[0] != headerVersion {
		return nil, unreadable("stored response header of unknown version %d", b[0])
	}
	d := wire.Decoder{B: string(b[1:])}
	h := d.Header()
	if d.Err == nil && d.B != "" {
		d.Fail("trailing bytes")
	}
	if d.Err != nil {
		return nil, fmt.Errorf("%w: stored response header: %w", idempotency.ErrRecordUnreadable, d.Err)
	}
	return h, nil
}
