package idempotency

import (
	"encoding/binary"
	"fmt"
	"net/http"

	"github.com/seed70ea8305/idempotency/internal/wire"
)

// Record encoding, version 1. One value per record, compact, binary-safe:
//
//	in flight: 0x01 'F' token fingerprint createdAt
//	completed: 0x01 'C' token fingerprint createdAt status flags headers body
//
// Strings and the body are uvarint-length-prefixed; createdAt is a varint of
// Unix milliseconds; headers are a uvarint count of names, each followed by
// a uvarint count of values (package internal/wire). The prefix up to the end of the token names
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
	return string(appendTokenPrefix(make([]byte, 0, 4+len(token)), state, token))
}

// encodeRecord encodes rec; token is its owner when rec is in flight, else
// the owner that completed it.
func encodeRecord(rec *Record, token string) string {
	size := 32 + len(rec.Fingerprint) + len(token)
	if rec.Response != nil {
		size += len(rec.Response.Body) + wire.HeaderSize(rec.Response.Header)
	}
	return string(appendRecord(make([]byte, 0, size), rec, token))
}

// appendRecord appends rec, encoded as encodeRecord does, to b.
func appendRecord(b []byte, rec *Record, token string) []byte {
	if rec.Response == nil {
		return appendClaim(b, rec, token)
	}
	resp := rec.Response
	b = appendTokenPrefix(b, stateCompleted, token)
	b = wire.AppendString(b, rec.Fingerprint)
	b = binary.AppendVarint(b, rec.CreatedAt.UnixMilli())
	b = binary.AppendUvarint(b, uint64(resp.StatusCode))
	var flags byte
	if resp.BodyOmitted {
		flags |= flagBodyOmitted
	}
	b = append(b, flags)
	b = wire.AppendHeader(b, resp.Header)
	return wire.AppendString(b, string(resp.Body))
}

// appendClaim appends rec, in flight and owned by token, to b: its owner
// prefix, the encoded fingerprint (which the Redis scripts read from it),
// and its time.
func appendClaim(b []byte, rec *Record, token string) []byte {
	b = appendTokenPrefix(b, stateInFlight, token)
	b = wire.AppendString(b, rec.Fingerprint)
	return binary.AppendVarint(b, rec.CreatedAt.UnixMilli())
}

func appendTokenPrefix(b []byte, state byte, token string) []byte {
	return wire.AppendString(append(b, recordVersion, state), token)
}

// decodedCompletion is a decoded completed record, its response and the
// values of its first headers, in one allocation.
type decodedCompletion struct {
	completion
	values [2]string
}

// header decodes a header as wire.Decoder.Header does, with the values
// of the first headers in c's own space.
func (c *decodedCompletion) header(d *wire.Decoder) http.Header {
	// Each header takes at least two bytes, which bounds the count before
	// anything is allocated.
	n := d.Uvarint(uint64(len(d.B)))
	if n == 0 || d.Err != nil {
		return nil
	}
	h := make(http.Header, n)
	free := c.values[:0:len(c.values)]
	for i := uint64(0); i < n && d.Err == nil; i++ {
		name := d.String()
		count := d.Uvarint(uint64(len(d.B)))
		var values []string
		if count <= uint64(cap(free)-len(free)) {
			values = free[len(free) : len(free)+int(count) : len(free)+int(count)]
			free = free[:len(free)+int(count)]
		} else {
			values = make([]string, count)
		}
		for i := range values {
			values[i] = d.String()
		}
		h[name] = values
	}
	return h
}

// errCorruptRecord is what the decoders wrap: a record the store holds
// but this code cannot read.
var errCorruptRecord = ErrRecordUnreadable

// decodeRecord parses a stored value and returns the record and the token
// of its owner (in flight) or of the owner that completed it; a completed
// Record's Token is empty. It never panics: the value comes from a server
// and may be anything.
func decodeRecord(b string) (*Record, string, error) {
	d := wire.Decoder{B: b}
	if d.Byte() != recordVersion {
		return nil, "", fmt.Errorf("%w: unknown version", errCorruptRecord)
	}
	var rec *Record
	state := d.Byte()
	token := d.String()
	if token == "" {
		d.Fail("no owner token")
	}
	switch state {
	case stateInFlight:
		rec = &Record{Token: token}
		rec.Fingerprint = d.String()
		rec.CreatedAt = d.Time()
	case stateCompleted:
		c := &decodedCompletion{}
		resp := &c.resp
		rec = &c.rec
		rec.Fingerprint = d.String()
		rec.CreatedAt = d.Time()
		resp.StatusCode = int(d.Uvarint(999))
		if d.Err == nil && wire.CheckStatus(resp.StatusCode) != nil {
			d.Fail("bad status")
		}
		resp.BodyOmitted = d.Byte()&flagBodyOmitted != 0
		resp.Header = c.header(&d)
		if body := d.String(); body != "" {
			resp.Body = []byte(body)
		}
		rec.Response = resp
	default:
		return nil, "", fmt.Errorf("%w: unknown state", errCorruptRecord)
	}
	if d.Err != nil {
		return nil, "", fmt.Errorf("%w: %w", errCorruptRecord, d.Err)
	}
	if len(d.B) != 0 {
		return nil, "", fmt.Errorf("%w: %d trailing bytes", errCorruptRecord, len(d.B))
	}
	return rec, token, nil
}
