package idempotency

import (
	"encoding/binary"
	"fmt"

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
	return string(wire.AppendString([]byte{recordVersion, state}, token))
}

// encodeRecord encodes rec; token is its owner when rec is in flight, else
// the owner that completed it.
func encodeRecord(rec *Record, token string) string {
	if rec.Response == nil {
		b := []byte(ownerPrefix(token))
		b = wire.AppendString(b, rec.Fingerprint)
		b = binary.AppendVarint(b, rec.CreatedAt.UnixMilli())
		return string(b)
	}
	resp := rec.Response
	b := make([]byte, 0, 32+len(rec.Fingerprint)+len(resp.Body)+len(token)+wire.HeaderSize(resp.Header))
	b = append(b, completedPrefix(token)...)
	b = wire.AppendString(b, rec.Fingerprint)
	b = binary.AppendVarint(b, rec.CreatedAt.UnixMilli())
	b = binary.AppendUvarint(b, uint64(resp.StatusCode))
	var flags byte
	if resp.BodyOmitted {
		flags |= flagBodyOmitted
	}
	b = append(b, flags)
	b = wire.AppendHeader(b, resp.Header)
	b = wire.AppendString(b, string(resp.Body))
	return string(b)
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
	rec := &Record{}
	state := d.Byte()
	token := d.String()
	if token == "" {
		d.Fail("no owner token")
	}
	switch state {
	case stateInFlight:
		rec.Token = token
		rec.Fingerprint = d.String()
		rec.CreatedAt = d.Time()
	case stateCompleted:
		rec.Fingerprint = d.String()
		rec.CreatedAt = d.Time()
		resp := &Response{StatusCode: int(d.Uvarint(999))}
		if d.Err == nil && wire.CheckStatus(resp.StatusCode) != nil {
			d.Fail("bad status")
		}
		resp.BodyOmitted = d.Byte()&flagBodyOmitted != 0
		resp.Header = d.Header()
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
