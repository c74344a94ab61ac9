package pgstore

import (
	"errors"
	"net/http"
	"reflect"
	"testing"

	"github.com/seed70ea8305/idempotency"
)

// FuzzDecodeHeader feeds arbitrary stored bytes to the header decoder: it
// never panics, and what it accepts encodes back to a header that decodes
// to the same map.
func FuzzDecodeHeader(f *testing.F) {
	f.Add(encodeHeader(http.Header{"Content-Type": {"application/json"}, "X-Multi": {"a", "b"}}))
	f.Add(encodeHeader(nil))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeHeader(b)
		if err != nil {
			return
		}
		again, err := decodeHeader(encodeHeader(h))
		if err != nil {
			t.Fatalf("a decoded header does not decode again: %v", err)
		}
		if len(h) != 0 && !reflect.DeepEqual(h, again) {
			t.Fatalf("round trip changed the header: %v, then %v", h, again)
		}
	})
}

// TestHeaderFormat pins the stored bytes, so that rows written before the
// header moved to the shared encoding (internal/wire) stay readable: the
// version byte, the count of names, then each name and its values, all
// length-prefixed.
func TestHeaderFormat(t *testing.T) {
	stored := []byte{0x01, 0x01, 0x01, 'A', 0x02, 0x01, 'b', 0x00}
	h := http.Header{"A": {"b", ""}}
	if got := encodeHeader(h); !reflect.DeepEqual(got, stored) {
		t.Fatalf("encoded %x, stored rows hold %x", got, stored)
	}
	got, err := decodeHeader(stored)
	if err != nil || !reflect.DeepEqual(got, h) {
		t.Fatalf("decoded %v, %v", got, err)
	}
	for _, bad := range [][]byte{{0x02}, {0x01, 0x01, 0x05}, append(stored, 0x00)} {
		if _, err := decodeHeader(bad); !errors.Is(err, idempotency.ErrRecordUnreadable) {
			t.Errorf("%x: %v, want ErrRecordUnreadable", bad, err)
		}
	}
}
