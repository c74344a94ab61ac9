// Package wire is the one binary encoding of what the stores keep: strings
// and bodies length-prefixed by a uvarint, headers as a uvarint count of
// names each followed by a uvarint count of values, times as a varint of
// Unix milliseconds. The root package's record encoding (Redis) and
// pgstore's stored headers both use it.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"time"
)

// AppendString appends s, length-prefixed.
func AppendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// AppendHeader appends h: the count of names, then each name and its
// values.
func AppendHeader(b []byte, h http.Header) []byte {
	b = binary.AppendUvarint(b, uint64(len(h)))
	for name, values := range h {
		b = AppendString(b, name)
		b = binary.AppendUvarint(b, uint64(len(values)))
		for _, v := range values {
			b = AppendString(b, v)
		}
	}
	return b
}

// HeaderSize is about what AppendHeader appends for h, to size a buffer.
func HeaderSize(h http.Header) int {
	n := 2
	for name, values := range h {
		n += 4 + len(name)
		for _, v := range values {
			n += 2 + len(v)
		}
	}
	return n
}

// ErrCorrupt is what a Decoder reports: the bytes are not what this
// encoding writes.
var ErrCorrupt = errors.New("corrupt record")

// CheckStatus refuses a stored status that no response can have been
// stored with: a final one (1xx are never stored) that net/http accepts,
// 200 to 999.
func CheckStatus(status int) error {
	if status < 200 || status > 999 {
		return fmt.Errorf("%w: status %d", ErrCorrupt, status)
	}
	return nil
}

// Decoder reads from B; after the first error every read returns a zero
// value and Err keeps that first error. Strings it returns share B's
// memory: decoding costs no copies. It never panics: the bytes come from
// a server and may be anything.
type Decoder struct {
	B   string
	Err error
}

// Fail records what is wrong, unless something was already.
func (d *Decoder) Fail(what string) {
	if d.Err == nil {
		d.Err = fmt.Errorf("%w: %s", ErrCorrupt, what)
	}
	d.B = ""
}

// Byte reads one byte.
func (d *Decoder) Byte() byte {
	if len(d.B) == 0 {
		d.Fail("truncated")
		return 0
	}
	c := d.B[0]
	d.B = d.B[1:]
	return c
}

// Uvarint reads a minimally encoded uvarint of at most limit: one value,
// one encoding, so a decoded owner token re-encodes to the bytes a store's
// script compares.
func (d *Decoder) Uvarint(limit uint64) uint64 {
	v, n := uvarintString(d.B)
	if n <= 0 || n != uvarintLen(v) || v > limit {
		d.Fail("bad length")
		return 0
	}
	d.B = d.B[n:]
	return v
}

// String reads a length-prefixed string.
func (d *Decoder) String() string {
	n := d.Uvarint(uint64(len(d.B)))
	if n > uint64(len(d.B)) {
		d.Fail("bad length")
	}
	if d.Err != nil {
		return ""
	}
	s := d.B[:n]
	d.B = d.B[n:]
	return s
}

// Time reads a varint of Unix milliseconds.
func (d *Decoder) Time() time.Time {
	uv, n := uvarintString(d.B)
	v := int64(uv >> 1) // zig-zag, as binary.Varint
	if uv&1 != 0 {
		v = ^v
	}
	if n <= 0 {
		d.Fail("bad time")
		return time.Time{}
	}
	d.B = d.B[n:]
	return time.UnixMilli(v)
}

// Header reads what AppendHeader wrote; nil for no names.
func (d *Decoder) Header() http.Header {
	// Each header takes at least two bytes, which bounds the count before
	// anything is allocated.
	n := d.Uvarint(uint64(len(d.B)))
	if n == 0 || d.Err != nil {
		return nil
	}
	h := make(http.Header, n)
	for i := uint64(0); i < n && d.Err == nil; i++ {
		name := d.String()
		values := make([]string, d.Uvarint(uint64(len(d.B))))
		for i := range values {
			values[i] = d.String()
		}
		h[name] = values
	}
	return h
}

func uvarintLen(v uint64) int {
	var buf [binary.MaxVarintLen64]byte
	return binary.PutUvarint(buf[:], v)
}

// uvarintString is binary.Uvarint over a string.
func uvarintString(s string) (uint64, int) {
	var x uint64
	var shift uint
	for i := 0; i < len(s) && i < binary.MaxVarintLen64; i++ {
		c := s[i]
		if c < 0x80 {
			if i == binary.MaxVarintLen64-1 && c > 1 {
				return 0, -(i + 1) // overflow
			}
			return x | uint64(c)<<shift, i + 1
		}
		x |= uint64(c&0x7f) << shift
		shift += 7
	}
	return 0, 0
}
