package idempotency

import (
	"encoding/binary"
	"fmt"
	"net/http"
	"time"
)

// Record encoding, version 1. One value per record, compact, binary-safe:
//
//	in flight: 0x01 'F' token fingerprint createdAt
//	completed: 0x01 'C' token fingerprint createdAt status flags headers body
//
// Strings and the body are uvarint-length-prefixed; createdAt is a varint of
// Unix milliseconds; headers are a uvarint count of names, each followed by
// a uvarint count of values. The prefix up to the end of the token names
// the owner (in flight) or the owner that completed the record, which is
// what the scripts compare.
const (
	recordVersion   = 0x01
	stateInFlight   = 'F'
	stateCompleted  = 'C'
	flagBodyOmitted = 0x01
)

// ownerPrefix starts the value of an in-flight record that token owns.
func ownerPrefix(token string) string { return tokenPrefix(stateInFlight, token) }

// completedPrefix starts the value of a record that token completed.
func completedPrefix(token string) string { return tokenPrefix(stateCompleted, token) }

func tokenPrefix(state byte, token string) string {
	return string(appendString([]byte{recordVersion, state}, token))
}

// encodeRecord encodes rec; token is its owner when rec is in flight, else
// the owner that completed it.
func encodeRecord(rec *Record, token string) string {
	if rec.Response == nil {
		b := []byte(ownerPrefix(token))
		b = appendString(b, rec.Fingerprint)
		b = binary.AppendVarint(b, rec.CreatedAt.UnixMilli())
		return string(b)
	}
	resp := rec.Response
	size := 32 + len(rec.Fingerprint) + len(resp.Body)
	for name, values := range resp.Header {
		size += 2 + len(name)
		for _, v := range values {
			size += 2 + len(v)
		}
	}
	b := make([]byte, 0, size+len(token))
	b = append(b, completedPrefix(token)...)
	b = appendString(b, rec.Fingerprint)
	b = binary.AppendVarint(b, rec.CreatedAt.UnixMilli())
	b = binary.AppendUvarint(b, uint64(resp.StatusCode))
	var flags byte
	if resp.BodyOmitted {
		flags |= flagBodyOmitted
	}
	b = append(b, flags)
	b = binary.AppendUvarint(b, uint64(len(resp.Header)))
	for name, values := range resp.Header {
		b = appendString(b, name)
		b = binary.AppendUvarint(b, uint64(len(values)))
		for _, v := range values {
			b = appendString(b, v)
		}
	}
	b = appendString(b, string(resp.Body))
	return string(b)
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// errCorruptRecord is what the decoders wrap: a record the store holds
// but this code cannot read.
var errCorruptRecord = ErrRecordUnreadable

// decodeRecord parses a stored value and returns the record and the token
// of its owner (in flight) or of the owner that completed it; a completed
// Record's Token is empty. It never panics: the value comes from a server
// and may be anything.
func decodeRecord(b string) (*Record, string, error) {
	d := decoder{b: b}
	if d.byte() != recordVersion {
		return nil, "", fmt.Errorf("%w: unknown version", errCorruptRecord)
	}
	rec := &Record{}
	state := d.byte()
	token := d.string()
	if token == "" {
		d.fail("no owner token")
	}
	switch state {
	case stateInFlight:
		rec.Token = token
		rec.Fingerprint = d.string()
		rec.CreatedAt = d.time()
	case stateCompleted:
		rec.Fingerprint = d.string()
		rec.CreatedAt = d.time()
		// A stored status is a final one (1xx are never stored) that
		// net/http accepts: 200 to 999.
		resp := &Response{StatusCode: int(d.uvarint(999))}
		if resp.StatusCode < 200 {
			d.fail("bad status")
		}
		resp.BodyOmitted = d.byte()&flagBodyOmitted != 0
		// Each header takes at least two bytes, which bounds the count
		// before anything is allocated.
		if n := d.uvarint(uint64(len(d.b))); n > 0 {
			resp.Header = make(http.Header, n)
			for i := uint64(0); i < n && d.err == nil; i++ {
				name := d.string()
				values := make([]string, d.uvarint(uint64(len(d.b))))
				for i := range values {
					values[i] = d.string()
				}
				resp.Header[name] = values
			}
		}
		if body := d.string(); body != "" {
			resp.Body = []byte(body)
		}
		rec.Response = resp
	default:
		return nil, "", fmt.Errorf("%w: unknown state", errCorruptRecord)
	}
	if d.err != nil {
		return nil, "", d.err
	}
	if len(d.b) != 0 {
		return nil, "", fmt.Errorf("%w: %d trailing bytes", errCorruptRecord, len(d.b))
	}
	return rec, token, nil
}

// decoder reads from b; after the first error every read returns a zero
// value and err keeps that first error. Strings it returns share b's
// memory: decoding a reply costs no copies but the body's.
type decoder struct {
	b   string
	err error
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", errCorruptRecord, what)
	}
	d.b = ""
}

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.fail("truncated")
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

// uvarint reads a minimally encoded uvarint: one value, one encoding, so
// a decoded owner token re-encodes to the bytes the scripts compare.
func (d *decoder) uvarint(limit uint64) uint64 {
	v, n := uvarintString(d.b)
	if n <= 0 || n != uvarintLen(v) || v > limit {
		d.fail("bad length")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) string() string {
	n := d.uvarint(uint64(len(d.b)))
	if n > uint64(len(d.b)) {
		d.fail("bad length")
	}
	if d.err != nil {
		return ""
	}
	s := d.b[:n]
	d.b = d.b[n:]
	return s
}

func uvarintLen(v uint64) int {
	var buf [binary.MaxVarintLen64]byte
	return binary.PutUvarint(buf[:], v)
}

func (d *decoder) time() time.Time {
	uv, n := uvarintString(d.b)
	v := int64(uv >> 1) // zig-zag, as binary.Varint
	if uv&1 != 0 {
		v = ^v
	}
	if n <= 0 {
		d.fail("bad time")
		return time.Time{}
	}
	d.b = d.b[n:]
	return time.UnixMilli(v)
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
