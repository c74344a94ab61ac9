package idempotency

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
	"github.com/seed70ea8305/idempotency/internal/wire"
)

// FuzzDecodeRecord feeds arbitrary stored values to the decoder: it must
// never panic, and what it accepts must re-encode to the same bytes.
func FuzzDecodeRecord(f *testing.F) {
	at := time.UnixMilli(1_790_000_000_000)
	for _, rec := range []*Record{
		{Token: "TOKEN", Fingerprint: "fp", CreatedAt: at},
		{Fingerprint: "fp", CreatedAt: at, Response: &Response{StatusCode: 201, Header: http.Header{"A": {"1", "2"}}, Body: []byte("body")}},
		{Fingerprint: "", CreatedAt: at, Response: &Response{StatusCode: 200, BodyOmitted: true}},
	} {
		f.Add([]byte(encodeRecord(rec, "TOKEN")))
	}
	f.Add([]byte{})
	f.Add([]byte{recordVersion, stateCompleted, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Fuzz(func(t *testing.T, value []byte) {
		rec, token, err := decodeRecord(string(value))
		if err != nil {
			return
		}
		if !(rec.Response == nil) && (rec.Response.StatusCode < 100 || rec.Response.StatusCode > 999) {
			t.Fatalf("accepted status %d", rec.Response.StatusCode)
		}
		// Header maps have no order, so compare what a second decode sees.
		again, againToken, err := decodeRecord(encodeRecord(rec, token))
		if err != nil {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		if againToken != token || encodeRecord(again, token) != encodeRecord(rec, token) && len(rec.headerNames()) < 2 {
			t.Fatalf("round trip changed the record")
		}
		prefix := completedPrefix(token)
		if rec.Response == nil {
			prefix = ownerPrefix(token)
			if rec.Token != token {
				t.Fatalf("in-flight record's Token %q is not its owner %q", rec.Token, token)
			}
		} else if rec.Token != "" {
			t.Fatalf("completed record has Token %q", rec.Token)
		}
		if !bytes.HasPrefix(value, []byte(prefix)) {
			t.Fatalf("value does not start with its owner's prefix")
		}
	})
}

func (r *Record) headerNames() []string {
	if r.Response == nil {
		return nil
	}
	var names []string
	for name := range r.Response.Header {
		names = append(names, name)
	}
	return names
}

func TestRedisKeyHasHashTag(t *testing.T) {
	s := &RedisStore{prefix: "app:"}
	for _, key := range []string{"http:\"\":abc", "{evil}", "}{", ""} {
		k := s.redisKey(key)
		open, close := strings.IndexByte(k, '{'), strings.IndexByte(k, '}')
		if open != len("app:") || close != open+5 || len(k) != close+1+28 {
			t.Errorf("redisKey(%q) = %q: want prefix, a 4-digit hash tag, 28 more digits", key, k)
		}
		if fenceKey(k) != k[:close+1]+"fence" {
			t.Errorf("fenceKey(%q) = %q: want the tag then fence", k, fenceKey(k))
		}
	}
}

// FuzzRedisKey: whatever the record key (client input) and the prefix, the
// Redis key is the prefix, one hash tag of 4 lower-case hex digits, then
// 28 more, and nothing else: no client bytes reach the key, and the tag is
// the only pair of braces, so it alone picks the Cluster slot.
func FuzzRedisKey(f *testing.F) {
	f.Add("idem:", `http:"":abc`)
	f.Add("", "{evil}")
	f.Add("app:", "}{")
	f.Add("a{", "key")
	f.Add("idem:", `http:"tenant {a}":`+strings.Repeat("k", 255))
	f.Add("ü:", "\x00\xff")
	client := redis.NewClient(&redis.Options{}) // never dialled: only keys are built
	defer client.Close()
	f.Fuzz(func(t *testing.T, prefix, key string) {
		s, err := NewRedisStore(client, RedisOptions{Prefix: prefix})
		if err != nil {
			if !strings.ContainsAny(prefix, "{}") {
				t.Fatalf("prefix %q refused: %v", prefix, err)
			}
			return
		}
		if strings.ContainsAny(prefix, "{}") {
			t.Fatalf("prefix %q with a brace accepted", prefix)
		}
		prefix = or(prefix, "idem:")
		k := s.redisKey(key)
		if !strings.HasPrefix(k, prefix) {
			t.Fatalf("redisKey(%q) = %q lost the prefix %q", key, k, prefix)
		}
		tag := k[len(prefix):]
		if len(tag) != 34 || tag[0] != '{' || tag[5] != '}' {
			t.Fatalf("redisKey(%q) = %q: want the prefix then {4 hex digits}28 hex digits", key, k)
		}
		for _, c := range []byte(tag[1:5] + tag[6:]) {
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				t.Fatalf("redisKey(%q) = %q: tag is not lower-case hex", key, k)
			}
		}
		if strings.Count(k, "{") != 1 || strings.Count(k, "}") != 1 {
			t.Fatalf("redisKey(%q) = %q: more than one pair of braces", key, k)
		}
		if s.redisKey(key) != k {
			t.Fatalf("redisKey(%q) is not deterministic", key)
		}
		if s.redisKey(key+"\x00") == k {
			t.Fatalf("redisKey(%q) and redisKey(%q) collide", key, key+"\x00")
		}
	})
}

// FuzzDecodeRedisReply: the acquire and get scripts' replies, whatever a
// server sends, decode or fail without a panic; a decoded recovery point
// is never empty, and a claim's fence never comes with a record that is
// not a recovery point.
func FuzzDecodeRedisReply(f *testing.F) {
	inFlight := encodeRecord(&Record{Token: "T", Fingerprint: "fp", CreatedAt: time.UnixMilli(1)}, "T")
	completed := encodeRecord(&Record{Fingerprint: "fp", CreatedAt: time.UnixMilli(1), Response: &Response{StatusCode: 201, Body: []byte("{}")}}, "T")
	fp := string(wire.AppendString(nil, "fp")) + "\x02"
	f.Add("1733230000000000")
	f.Add("-1")
	f.Add(completed)
	f.Add(envelope('P', "1500", inFlight, "", ""))
	f.Add(envelope('P', "-1", inFlight, "point", "data"))
	f.Add(envelope('R', "7", fp, "point", "data"))
	f.Add(envelope('R', "0", fp, "point", ""))
	f.Add("P4:15")
	f.Fuzz(func(t *testing.T, reply string) {
		fence, rec, err := decodeRedisReply(reply)
		if err != nil {
			return
		}
		if fence > 0 && rec != nil && rec.RecoveryPoint == "" {
			t.Fatal("a claim resumed from an empty recovery point")
		}
		if fence == 0 && rec == nil && (reply[0] < '0' || reply[0] > '9') {
			t.Fatalf("no fence and no record from %q", reply)
		}
	})
}

// envelope is what the scripts build for a 'P' or 'R' reply.
func envelope(kind byte, fields ...string) string {
	b := []byte{kind}
	for _, f := range fields {
		b = append(strconv.AppendInt(b, int64(len(f)), 10), ':')
		b = append(b, f...)
	}
	return string(b)
}

// The replies the scripts build decode to what they stand for.
func TestDecodeRedisReply(t *testing.T) {
	at := time.UnixMilli(1_790_000_000_000)
	inFlight := encodeRecord(&Record{Token: "T", Fingerprint: "fp", CreatedAt: at}, "T")
	done := &Record{Fingerprint: "fp", CreatedAt: at, Response: &Response{StatusCode: 201, Header: http.Header{"A": {"1"}}, Body: []byte("{}")}}
	fp := string(wire.AppendString(nil, "fp"))
	for _, tc := range []struct {
		reply string
		fence uint64
		want  *Record
		err   error
	}{
		{reply: "1733230000000001", fence: 1733230000000001},
		{reply: "-1", err: errTooLate},
		{reply: encodeRecord(done, "T"), want: &Record{Fingerprint: "fp", CreatedAt: at, Response: done.Response}},
		{reply: envelope('P', "1500", inFlight, "", ""), want: &Record{Token: "T", Fingerprint: "fp", CreatedAt: at, LeaseLeft: 1500 * time.Millisecond}},
		{reply: envelope('P', "-1", inFlight, "p", "d"), want: &Record{Token: "T", Fingerprint: "fp", CreatedAt: at, RecoveryPoint: "p", RecoveryData: []byte("d")}},
		{reply: envelope('R', "7", fp+"rest", "p", "d"), fence: 7, want: &Record{Fingerprint: "fp", RecoveryPoint: "p", RecoveryData: []byte("d")}},
		{reply: envelope('R', "0", fp, "p", ""), want: &Record{Fingerprint: "fp", RecoveryPoint: "p"}},
		{reply: envelope('R', "0", fp, "", ""), err: ErrRecordUnreadable},
		{reply: envelope('P', "1", encodeRecord(done, "T"), "", ""), err: ErrRecordUnreadable},
		{reply: "P3:abc", err: ErrRecordUnreadable},
		{reply: "P9:abc0:0:0:", err: ErrRecordUnreadable},
		{reply: "", err: ErrRecordUnreadable},
		{reply: "x", err: ErrRecordUnreadable},
	} {
		fence, rec, err := decodeRedisReply(tc.reply)
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("%q: err = %v, want %v", tc.reply, err, tc.err)
			}
			continue
		}
		if err != nil || fence != tc.fence || !reflect.DeepEqual(rec, tc.want) {
			t.Errorf("%q: got %d, %+v, %v; want %d, %+v", tc.reply, fence, rec, err, tc.fence, tc.want)
		}
	}
}

// sha256Key is the Redis key of key under prefix, computed without the
// store's memo.
func sha256Key(prefix, key string) string {
	sum := sha256.Sum256([]byte(key))
	return prefix + "{" + hex.EncodeToString(sum[:2]) + "}" + hex.EncodeToString(sum[2:16])
}

// The memo of hashed keys never changes a key's mapping: not for a copy
// of a key (another address, the same content), not for keys that share
// a slot, not while goroutines map keys concurrently.
func TestRedisKeyMemoKeepsTheMapping(t *testing.T) {
	s := &RedisStore{prefix: "app:"}
	keys := []string{"", "a", `http:"":k`, `http:"tenant {a}":` + strings.Repeat("k", 300), "\x00\xff"}
	for i := range 500 { // far more than the memo's slots
		keys = append(keys, `http:"":key-`+strconv.Itoa(i))
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 3 {
				for _, key := range keys {
					for _, k := range []string{key, strings.Clone(key), key + ""} {
						if got, want := s.redisKey(k), sha256Key("app:", key); got != want {
							t.Errorf("redisKey(%q) = %q, want %q", key, got, want)
							return
						}
					}
				}
			}
		}()
	}
	wg.Wait()
}

// A first request hashes its key at most once: Complete finds the key
// that Acquire hashed, since the engine passes both the same string.
func TestRedisHashesARequestsKeyOnce(t *testing.T) {
	mr := miniredis.RunT(t)
	client := redis.NewClient(&redis.Options{Addr: mr.Addr(), MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}})
	defer client.Close()
	s, err := NewRedisStore(client, RedisOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var hashes atomic.Int64
	s.onHash = func() { hashes.Add(1) }
	m, err := New(s, Options{})
	if err != nil {
		t.Fatal(err)
	}
	h := m.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
	}))
	for i, want := range []int{http.StatusCreated, http.StatusCreated} { // a first request, then its replay
		r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader("{}"))
		r.Header.Set("Idempotency-Key", "key-1")
		w := httptest.NewRecorder()
		hashes.Store(0)
		h.ServeHTTP(w, r)
		if w.Code != want {
			t.Fatalf("request %d: status %d", i, w.Code)
		}
		// At most once: the memo may still hold the key from the request
		// before (its string can land at the same address), and then
		// the request hashes nothing. Without the memo a first request
		// hashes twice (Acquire, then Complete).
		if n := hashes.Load(); n > 1 {
			t.Errorf("request %d hashed its key %d times, want at most once", i, n)
		}
	}
}
