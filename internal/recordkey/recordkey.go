// Package recordkey names the record of a claim in a store, one format for
// the root package (which builds the names) and the stores that must find
// a claim's record from its Claim (pgstore's transactions).
package recordkey

import "strconv"

// Name is kind, the quoted scope and key, separated by colons. The kind
// keeps HTTP keys and webhook event IDs apart; quoting the scope keeps the
// name unambiguous whatever either part holds.
func Name(kind, scope, key string) string {
	var buf [128]byte
	return string(Append(buf[:0], kind, scope, key))
}

// Append appends the Name of kind, scope and key to b, for a caller that
// makes it in one allocation with other strings.
func Append(b []byte, kind, scope, key string) []byte {
	b = append(b, kind...)
	b = append(b, ':')
	b = strconv.AppendQuote(b, scope)
	b = append(b, ':')
	return append(b, key...)
}
