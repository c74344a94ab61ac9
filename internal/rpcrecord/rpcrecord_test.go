package rpcrecord_test

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/code"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/rpcrecord"
)

// The fingerprint ignores the key field, sees the method and the rest of
// the message, and is the same for equal maps whatever their order.
func TestFingerprint(t *testing.T) {
	msg := func(input string) *structpb.Struct {
		s, _ := structpb.NewStruct(map[string]any{"input": input, "a": 1, "b": 2, "c": 3})
		return s
	}
	fp := func(method string, m *structpb.Struct) string {
		t.Helper()
		got, err := rpcrecord.Fingerprint(method, m, nil)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	one, other := msg("x"), msg("x")
	if fp("/s/M", one) != fp("/s/M", other) {
		t.Error("equal messages with maps differ")
	}
	if fp("/s/M", msg("x")) == fp("/s/M", msg("y")) || fp("/s/M", msg("x")) == fp("/s/N", msg("x")) {
		t.Error("different calls have one fingerprint")
	}

	// StringValue's only field is its value: as a key field, stripping it
	// leaves the empty message.
	fd := rpcrecord.KeyField(wrapperspb.String("").ProtoReflect().Descriptor(), "value")
	a, err := rpcrecord.Fingerprint("/s/M", wrapperspb.String("key-1"), fd)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := rpcrecord.Fingerprint("/s/M", wrapperspb.String("key-2"), fd)
	empty, _ := rpcrecord.Fingerprint("/s/M", wrapperspb.String(""), nil)
	if a != b || a != empty {
		t.Errorf("the key field counts: %s %s %s", a, b, empty)
	}
}

func TestKey(t *testing.T) {
	fd := rpcrecord.KeyField(wrapperspb.String("").ProtoReflect().Descriptor(), "value")
	for _, c := range []struct {
		field   string
		meta    []string
		want    string
		wantErr error
	}{
		{"", nil, "", idempotency.ErrKeyMissing},
		{"abc", nil, "abc", nil},
		{"", []string{"abc"}, "abc", nil},
		{"abc", []string{"abc"}, "abc", nil},
		{"abc", []string{"abd"}, "", idempotency.ErrKeyInvalid},
		{strings.Repeat("a", 37), nil, "", idempotency.ErrKeyInvalid},
		{"a b", nil, "", idempotency.ErrKeyInvalid},
		{"", []string{"a", "b"}, "", idempotency.ErrKeyInvalid},
	} {
		got, _, err := rpcrecord.Key(wrapperspb.String(c.field).ProtoReflect(), fd, c.meta, rpcrecord.MaxFieldKeyLength)
		if got != c.want || !errors.Is(err, c.wantErr) || (c.wantErr == nil) != (err == nil) {
			t.Errorf("field %q, metadata %q: %q %v", c.field, c.meta, got, err)
		}
	}
}

func TestOutcomeRoundTrip(t *testing.T) {
	for _, o := range []rpcrecord.Outcome{
		{Type: "google.protobuf.StringValue", Message: []byte{0x0a, 0x01, 'x'}, Header: map[string][]string{"x-a": {"1", "2"}, "x-b-bin": {"\x00"}}, Trailer: map[string][]string{"x-t": {"t"}}},
		{Status: &spb.Status{Code: int32(code.Code_NOT_FOUND), Message: "gone"}},
	} {
		resp, err := o.Response()
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != rpcrecord.HTTPStatus(o.Code()) {
			t.Errorf("status %d for %v", resp.StatusCode, o.Code())
		}
		got, err := rpcrecord.FromResponse(resp)
		if err != nil {
			t.Fatal(err)
		}
		if got.Type != o.Type || string(got.Message) != string(o.Message) || got.Code() != o.Code() || len(got.Header) != len(o.Header) || len(got.Trailer) != len(o.Trailer) {
			t.Errorf("round trip: %+v, want %+v", got, o)
		}
	}
	if _, err := rpcrecord.FromResponse(&idempotency.Response{Body: []byte("not a record")}); err == nil {
		t.Error("garbage decoded")
	}
}

func TestReject(t *testing.T) {
	for _, c := range []struct {
		err   error
		code  code.Code
		retry bool
	}{
		{idempotency.ErrKeyMissing, code.Code_INVALID_ARGUMENT, false},
		{idempotency.ErrFingerprintMismatch, code.Code_FAILED_PRECONDITION, false},
		{idempotency.ErrKeyInUse, code.Code_ABORTED, true},
		{idempotency.ErrStoreUnavailable, code.Code_UNAVAILABLE, true},
		{idempotency.ErrLeaseLost, code.Code_UNAVAILABLE, true},
		{idempotency.ErrRecordUnreadable, code.Code_INTERNAL, false},
		{errors.New("secret detail"), code.Code_INTERNAL, false},
	} {
		r := rpcrecord.Reject(c.err, "request_id")
		if r.Code != c.code || (r.RetryDelay > 0) != c.retry || strings.Contains(r.Message, "secret") {
			t.Errorf("%v: %+v", c.err, r)
		}
	}
}
