package pgstore

import (
	"net/http"
	"reflect"
	"testing"
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
