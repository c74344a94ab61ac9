// Package problem writes RFC 9457 problem details
// (application/problem+json): the one writer of the error answers of the
// middleware, the webhook handler, pgstore's inbox and its operator API.
package problem

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// Problem is one problem document.
type Problem struct {
	Type   string `json:"type,omitempty"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail,omitempty"`
}

// Write answers p with its status, uncacheable, with Retry-After set to
// retryAfter (seconds) unless it is empty.
func Write(w http.ResponseWriter, p Problem, retryAfter string) {
	body, _ := json.Marshal(p) // plain strings and ints always encode
	h := w.Header()
	if retryAfter != "" {
		h.Set("Retry-After", retryAfter)
	}
	h.Set("Content-Type", "application/problem+json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(p.Status)
	w.Write(body)
}
