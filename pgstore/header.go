package pgstore

import (
	"encoding/binary"
	"fmt"
	"net/http"

	"github.com/seed70ea8305/idempotency"
)

// The response header is stored in a bytea column, since header values may
// hold bytes (NUL, invalid UTF-8) that text and jsonb cannot:
//
//	0x01, uvarint count of names, then per name: name, uvarint count of
//	values, each value
//
// where every string is a uvarint length followed by its bytes. An empty
// header is stored as NULL.
const headerVersion = 0x01

// errCorruptHeader: the stored header does not decode, so neither does
// its record.
var errCorruptHeader = fmt.Errorf("%w: stored response header is corrupt", idempotency.ErrRecordUnreadable)

// encodeHeader returns h encoded, or nil when h is empty.
func encodeHeader(h http.Header) []byte {
	if len(h) == 0 {
		return nil
	}
	size := 2
	for name, values := range h {
		size += 4 + len(name)
		for _, v := range values {
			size += 2 + len(v)
		}
	}
	b := make([]byte, 0, size)
	b = append(b, headerVersion)
	b = binary.AppendUvarint(b, uint64(len(h)))
	for name, values := range h {
		b = appendString(b, name)
		b = binary.AppendUvarint(b, uint64(len(values)))
		for _, v := range values {
			b = appendString(b, v)
		}
	}
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// decodeHeader reverses encodeHeader; NULL (nil) is an empty header.
func decodeHeader(b []byte) (http.Header, error) {
	if len(b) == 0 {
		return nil, nil
	}
	if b[0] != headerVersion {
		return nil, errCorruptHeader
	}
	d := decoder{b: b[1:]}
	n := d.uvarint()
	if n > uint64(len(d.b)) { // each name takes at least two bytes
		return nil, errCorruptHeader
	}
	h := make(http.Header, n)
	for range n {
		name := d.string()
		count := d.uvarint()
		if d.err || count > uint64(len(d.b)) {
			return nil, errCorruptHeader
		}
		values := make([]string, count)
		for i := range values {
			values[i] = d.string()
		}
		h[name] = values
	}
	if d.err || len(d.b) != 0 {
		return nil, errCorruptHeader
	}
	return h, nil
}

type decoder struct {
	b   []byte
	err bool
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = true
		d.b = nil
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) string() string {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.err = true
		d.b = nil
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}
