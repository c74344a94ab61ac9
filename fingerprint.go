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
	"sync"
)

// Fingerprinter computes request fingerprints: a hex SHA-256 over the
// method, the path, the query (with parameters sorted), the Content-Type,
// the headers named in Headers and the body. Every part is
// length-prefixed, so no two different requests share an input.
//
// The Content-Type counts because the same bytes sent as text/plain and
// then as application/json are two requests, which a handler may answer
// differently; it is compared as a media type, so case, spacing and the
// order of parameters do not matter ("application/json; charset=UTF-8"
// and "Application/JSON;charset=utf-8" are one). A fingerprint function of
// your own ([Options].Fingerprint) can leave it out.
//
// The zero value hashes method, path, query, Content-Type and body. A Fingerprinter is
// safe for concurrent use; its Fingerprint method fits [Options].Fingerprint.
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
	var buf [2 * sha256.Size]byte
	b, err := f.appendFingerprint(buf[:0], r, body)
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// appendFingerprint appends the Fingerprint of r and body to dst, for the
// middleware, which makes it in one allocation with the record's key.
func (f Fingerprinter) appendFingerprint(dst []byte, r *http.Request, body []byte) ([]byte, error) {
	if f.CanonicalJSON && len(body) > 0 && isJSON(r.Header.Get("Content-Type")) {
		canonical, err := canonicalJSON(body)
		if err != nil {
			return dst, err
		}
		body = canonical
	}
	st := hasherPool.Get().(*hasher)
	defer hasherPool.Put(st)
	st.h.Reset()
	// Everything but the body goes to the hash in one write.
	b := st.buf[:0]
	b = appendField(b, "idempotency-fingerprint-v2")
	b = appendField(b, r.Method)
	b = appendField(b, r.URL.EscapedPath())
	b = appendField(b, sortedQuery(r.URL.RawQuery))
	b = appendMediaType(b, r.Header.Get("Content-Type"))
	if len(f.Headers) == 0 {
		b = appendLength(b, 0)
	} else {
		b = f.appendHeaders(b, r.Header)
	}
	b = appendLength(b, len(body))
	st.buf = b
	st.h.Write(b)
	st.h.Write(body)
	return hex.AppendEncode(dst, st.h.Sum(st.sum[:0])), nil
}

func (f Fingerprinter) appendHeaders(b []byte, header http.Header) []byte {
	names := make([]string, len(f.Headers))
	for i, name := range f.Headers {
		names[i] = textproto.CanonicalMIMEHeaderKey(name)
	}
	slices.Sort(names)
	names = slices.Compact(names)
	b = appendLength(b, len(names))
	for _, name := range names {
		b = appendField(b, name)
		values, present := header[name]
		if !present {
			b = appendLength(b, -1)
			continue
		}
		b = appendLength(b, len(values))
		for _, v := range values {
			b = appendField(b, v)
		}
	}
	return b
}

// hasher is a reusable SHA-256 state with its scratch space.
type hasher struct {
	h   hash.Hash
	buf []byte
	sum [sha256.Size]byte
}

var hasherPool = sync.Pool{New: func() any { return &hasher{h: sha256.New(), buf: make([]byte, 0, 512)} }}

func appendLength(b []byte, n int) []byte {
	return binary.BigEndian.AppendUint64(b, uint64(int64(n)))
}

func appendField(b []byte, s string) []byte {
	return append(appendLength(b, len(s)), s...)
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

// appendMediaType appends a Content-Type in one form: without spaces, in
// lower case, parameters sorted; one that does not parse is kept as sent.
// The usual value without parameters costs no allocation.
func appendMediaType(b []byte, contentType string) []byte {
	if strings.IndexByte(contentType, ';') < 0 {
		contentType = strings.TrimSpace(contentType)
		b = appendLength(b, len(contentType))
		for i := 0; i < len(contentType); i++ {
			c := contentType[i]
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			b = append(b, c)
		}
		return b
	}
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		return appendField(b, contentType)
	}
	if cs, ok := params["charset"]; ok {
		params["charset"] = strings.ToLower(cs) // charset names are case-insensitive
	}
	return appendField(b, mime.FormatMediaType(mt, params))
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
		return nil, newRequestError(ErrInvalidJSON, jsonErrorText(err))
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, newRequestError(ErrInvalidJSON, "data after the JSON value")
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, newRequestError(ErrInvalidJSON, jsonErrorText(err))
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
