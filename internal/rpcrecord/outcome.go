package rpcrecord

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/code"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/seed70ea8305/idempotency"
)

// Outcome is what is stored of one RPC: its response message, or the
// status it failed with, and the metadata it answered with.
type Outcome struct {
	// Type is the full name of the response message; Message its
	// encoding. Both are empty when Status is set.
	Type    protoreflect.FullName
	Message []byte
	// Status is the error the call answered, nil for a success.
	Status *spb.Status
	// Header and Trailer are the response metadata the handler set, with
	// lower-case names; values of names ending in "-bin" are the raw
	// bytes, not their base64.
	Header  map[string][]string
	Trailer map[string][]string
}

// Code returns the outcome's status code.
func (o *Outcome) Code() code.Code {
	if o.Status == nil {
		return code.Code_OK
	}
	return code.Code(o.Status.GetCode())
}

// Response returns what the middleware stores for o: the HTTP status that
// google.rpc.Code maps its code to, and its encoding as the body.
func (o *Outcome) Response() (*idempotency.Response, error) {
	body, err := o.marshal()
	if err != nil {
		return nil, err
	}
	return &idempotency.Response{StatusCode: HTTPStatus(o.Code()), Body: body}, nil
}

// NewMessage returns the stored response message as a message of its
// generated type, found in the global registry.
func (o *Outcome) NewMessage() (proto.Message, error) {
	mt, err := protoregistry.GlobalTypes.FindMessageByName(o.Type)
	if err != nil {
		return nil, fmt.Errorf("replaying a %s: %w", o.Type, err)
	}
	m := mt.New().Interface()
	if err := proto.Unmarshal(o.Message, m); err != nil {
		return nil, fmt.Errorf("replaying a %s: %w", o.Type, err)
	}
	return m, nil
}

// Field numbers of the record's encoding, a protobuf message of its own:
//
//	message Outcome {
//	  uint32 version = 1;               // 1
//	  string type = 2;
//	  bytes message = 3;
//	  google.rpc.Status status = 4;
//	  repeated Entry header = 5;        // Entry: string name = 1; bytes value = 2;
//	  repeated Entry trailer = 6;
//	}
const (
	fieldVersion = 1
	fieldType    = 2
	fieldMessage = 3
	fieldStatus  = 4
	fieldHeader  = 5
	fieldTrailer = 6

	entryName  = 1
	entryValue = 2

	version = 1
)

func (o *Outcome) marshal() ([]byte, error) {
	b := make([]byte, 0, 16+len(o.Type)+len(o.Message))
	b = protowire.AppendTag(b, fieldVersion, protowire.VarintType)
	b = protowire.AppendVarint(b, version)
	if o.Status != nil {
		st, err := proto.MarshalOptions{Deterministic: true}.Marshal(o.Status)
		if err != nil {
			return nil, fmt.Errorf("encoding the status: %w", err)
		}
		b = protowire.AppendTag(b, fieldStatus, protowire.BytesType)
		b = protowire.AppendBytes(b, st)
	} else {
		b = protowire.AppendTag(b, fieldType, protowire.BytesType)
		b = protowire.AppendString(b, string(o.Type))
		b = protowire.AppendTag(b, fieldMessage, protowire.BytesType)
		b = protowire.AppendBytes(b, o.Message)
	}
	b = appendEntries(b, fieldHeader, o.Header)
	b = appendEntries(b, fieldTrailer, o.Trailer)
	return b, nil
}

func appendEntries(b []byte, field protowire.Number, md map[string][]string) []byte {
	names := make([]string, 0, len(md))
	for name := range md {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		for _, v := range md[name] {
			n := protowire.SizeTag(entryName) + protowire.SizeBytes(len(name)) + protowire.SizeTag(entryValue) + protowire.SizeBytes(len(v))
			b = protowire.AppendTag(b, field, protowire.BytesType)
			b = protowire.AppendVarint(b, uint64(n))
			b = protowire.AppendTag(b, entryName, protowire.BytesType)
			b = protowire.AppendString(b, name)
			b = protowire.AppendTag(b, entryValue, protowire.BytesType)
			b = protowire.AppendString(b, v)
		}
	}
	return b
}

// errMalformed is what a record that this package did not write gives.
var errMalformed = errors.New("malformed RPC outcome")

// FromResponse decodes the outcome stored as resp.
func FromResponse(resp *idempotency.Response) (*Outcome, error) {
	if resp == nil {
		return nil, errMalformed
	}
	o := &Outcome{}
	b := resp.Body
	seenVersion := false
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, errMalformed
		}
		b = b[n:]
		switch {
		case num == fieldVersion && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 || v != version {
				return nil, fmt.Errorf("%w: version %d", errMalformed, v)
			}
			seenVersion = true
			b = b[n:]
		case typ == protowire.BytesType && num >= fieldType && num <= fieldTrailer:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil, errMalformed
			}
			b = b[n:]
			if err := o.set(num, v); err != nil {
				return nil, err
			}
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return nil, errMalformed
			}
			b = b[n:]
		}
	}
	if !seenVersion {
		return nil, errMalformed
	}
	return o, nil
}

func (o *Outcome) set(num protowire.Number, v []byte) error {
	switch num {
	case fieldType:
		o.Type = protoreflect.FullName(v)
	case fieldMessage:
		o.Message = v
	case fieldStatus:
		o.Status = &spb.Status{}
		if err := proto.Unmarshal(v, o.Status); err != nil {
			return fmt.Errorf("%w: %w", errMalformed, err)
		}
	case fieldHeader, fieldTrailer:
		var name, value []byte
		for len(v) > 0 {
			n, typ, m := protowire.ConsumeTag(v)
			if m < 0 || typ != protowire.BytesType {
				return errMalformed
			}
			s, k := protowire.ConsumeBytes(v[m:])
			if k < 0 {
				return errMalformed
			}
			switch n {
			case entryName:
				name = s
			case entryValue:
				value = s
			}
			v = v[m+k:]
		}
		md := &o.Header
		if num == fieldTrailer {
			md = &o.Trailer
		}
		if *md == nil {
			*md = make(map[string][]string)
		}
		(*md)[string(name)] = append((*md)[string(name)], string(value))
	}
	return nil
}

// Stored reports whether response metadata name (lower case) is part of
// the outcome: not what the protocols own (names starting with "grpc-" or
// "connect-", pseudo-headers, content and transfer headers), nor the
// replay marker.
func Stored(name string) bool {
	switch {
	case name == "" || name[0] == ':',
		strings.HasPrefix(name, "grpc-"), strings.HasPrefix(name, "connect-"),
		name == ReplayHeader:
		return false
	}
	switch name {
	case "content-type", "content-length", "content-encoding", "transfer-encoding", "te", "trailer",
		"connection", "keep-alive", "upgrade", "date", "accept-encoding":
		return false
	}
	return true
}
