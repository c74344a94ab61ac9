package idempotency

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"mime"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strings"
)

// FingerprintFunc computes the fingerprint of a request whose body has
// already been read into body. Two requests under one idempotency key are
// "the same request" exactly when their fingerprints are equal. An error
// rejects the request with 400 (see [ErrInvalidJSON]).
type FingerprintFunc func(r *http.Request, body []byte) (string, error)

// Fingerprinter computes request fingerprints: a hex SHA-256 over the
// method, the path, the query (with parameters sorted), the headers named in
// Headers and the body. Every part is length-prefixed, so no two different
// requests share an input.
//
// The zero value hashes method, path, query and body. A Fingerprinter is
// safe for concurrent use; its Fingerprint method is a [FingerprintFunc].
type Fingerprinter struct {
	// Headers lists request headers that belong to the request's identity,
	// for example "Authorization" or "Stripe-Account". Names are
	// case-insensitive; order does not matter. A missing header and an
	// empty one are different.
	Headers []string

	// CanonicalJSON makes key order and insignificant whitespace in JSON
	// bodies irrelevant: bodies whose Content-Type is application/json or
	// ends in +json are parsed and re-encoded with sorted keys before
	// hashing. A body that is not valid JSON then fails with
	// [ErrInvalidJSON]. Numbers are compared by their literal text, so 1
	// and 1.0 differ. Other content types are hashed as sent.
	CanonicalJSON bool
}

// Fingerprint returns the hex-encoded fingerprint of r with the given body.
func (f Fingerprinter) Fingerprint(r *http.Request, body []byte) (string, error) {
	if f.CanonicalJSON && len(body) > 0 && isJSON(r.Header.Get("Content-Type")) {
		canonical, err := canonicalJSON(body)
		if err != nil {
			return "", err
		}
		body = canonical
	}
	h := sha256.New()
	writeField(h, "idempotency-fingerprint-v1")
	writeField(h, r.Method)
	writeField(h, r.URL.EscapedPath())
	writeField(h, sortedQuery(r.URL.RawQuery))

	names := make([]string, len(f.Headers))
	for i, name := range f.Headers {
		names[i] = textproto.CanonicalMIMEHeaderKey(name)
	}
	slices.Sort(names)
	names = slices.Compact(names)
	writeLength(h, len(names))
	for _, name := range names {
		writeField(h, name)
		values, present := r.Header[name]
		if !present {
			writeLength(h, -1)
			continue
		}
		writeLength(h, len(values))
		for _, v := range values {
			writeField(h, v)
		}
	}
	writeLength(h, len(body))
	h.Write(body)
	return hex.EncodeToString(h.Sum(nil)), nil
}

func writeLength(h hash.Hash, n int) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(int64(n)))
	h.Write(b[:])
}

func writeField(h hash.Hash, s string) {
	writeLength(h, len(s))
	io.WriteString(h, s)
}

// sortedQuery puts query parameters in a fixed order, so ?a=1&b=2 and
// ?b=2&a=1 are one request. A query that does not parse is kept verbatim.
func sortedQuery(raw string) string {
	if raw == "" {
		return ""
	}
	values, err := url.ParseQuery(raw)
	if err != nil {
		return raw
	}
	return values.Encode()
}

func isJSON(contentType string) bool {
	mediaType, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return false
	}
	return mediaType == "application/json" || strings.HasSuffix(mediaType, "+json")
}

// canonicalJSON re-encodes a JSON document with object keys sorted (which
// encoding/json does for maps), numbers kept as written and no whitespace.
func canonicalJSON(body []byte) ([]byte, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrInvalidJSON, jsonErrorText(err))
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: data after the JSON value", ErrInvalidJSON)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrInvalidJSON, jsonErrorText(err))
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// jsonErrorText describes a JSON syntax error without echoing the body.
func jsonErrorText(err error) string {
	var syntax *json.SyntaxError
	switch {
	case err == io.EOF, err == io.ErrUnexpectedEOF:
		return "unexpected end of input"
	case errors.As(err, &syntax):
		return fmt.Sprintf("syntax error at byte %d", syntax.Offset)
	default:
		return "not a JSON document"
	}
}
