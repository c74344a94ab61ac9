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
	b := append(buf[:0], kind...)
	b = append(b, ':')
	b = strconv.AppendQuote(b, scope)
	b = append(b, ':')
	b = append(b, key...)
	return string(b)
}
