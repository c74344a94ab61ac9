// Package admin is the webhook inbox's operator API: a small JSON API over
// HTTP that lists the events of an [inbox.Inbox], shows one with its
// payload, counts them, and, when enabled, redrives dead letters. It has
// no authentication of its own: mount it behind the application's.
//
//	h, err := admin.New(in, admin.Options{}) // read-only; Redrive: true enables the POST routes
//	if err != nil {
//		return err
//	}
//	mux.Handle("/ops/webhooks/", http.StripPrefix("/ops/webhooks", requireOperator(h)))
//
// It is a package of its own so that a program that receives webhooks
// need not serve it. Its routes, relative to where it is mounted:
//
//	GET  /events?status=failed&type=account.updated&limit=50&before=RFC3339
//	GET  /events/{id}             one event with its payload
//	GET  /stats                   the inbox's counts ([inbox.Stats])
//	POST /events/{id}/redrive     one failed event (Redrive only)
//	POST /redrive?type=T          every failed event of type T, or of every
//	                              type when T is empty (Redrive only)
//
// Errors are application/problem+json with fixed text.
package admin

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/seed70ea8305/idempotency/internal/problem"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

// Options configures the handler [New] returns. The zero value is a
// read-only API.
type Options struct {
	// Redrive enables the POST routes, which make failed events pending
	// again. Default: false, they answer 403.
	Redrive bool
}

// New returns the operator API of in. The handler is safe for concurrent
// use.
func New(in *inbox.Inbox, opts Options) (http.Handler, error) {
	if in == nil {
		return nil, errors.New("admin: inbox is nil")
	}
	a := &api{in: in, redrive: opts.Redrive}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /events", a.list)
	mux.HandleFunc("GET /events/{id}", a.event)
	mux.HandleFunc("GET /stats", a.stats)
	mux.HandleFunc("POST /events/{id}/redrive", a.redriveOne)
	mux.HandleFunc("POST /redrive", a.redriveType)
	return mux, nil
}

type api struct {
	in      *inbox.Inbox
	redrive bool
}

// The problems the API answers with.
var (
	errDatabase  = problem.Problem{Title: "Inbox unavailable", Status: http.StatusServiceUnavailable, Detail: "the database did not answer"}
	errNotFound  = problem.Problem{Title: "Not found", Status: http.StatusNotFound, Detail: "no such event"}
	errNotFailed = problem.Problem{Title: "Not failed", Status: http.StatusConflict, Detail: "the event is not failed"}
	errReadOnly  = problem.Problem{Title: "Forbidden", Status: http.StatusForbidden, Detail: "redrive is not enabled on this handler"}
)

func badRequest(detail string) problem.Problem {
	return problem.Problem{Title: "Bad request", Status: http.StatusBadRequest, Detail: detail}
}

// writeProblem answers p, with Retry-After on a 503.
func writeProblem(w http.ResponseWriter, p problem.Problem) {
	retryAfter := ""
	if p.Status == http.StatusServiceUnavailable {
		retryAfter = "1"
	}
	problem.Write(w, p, retryAfter)
}

func (a *api) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := inbox.Filter{Status: q.Get("status"), Type: q.Get("type")}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			writeProblem(w, badRequest("limit must be an integer from 1 to 1000"))
			return
		}
		f.Limit = n
	}
	if v := q.Get("before"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			writeProblem(w, badRequest("before must be an RFC 3339 time"))
			return
		}
		f.Before = t
	}
	if f.Status != "" && !inbox.ValidStatus(f.Status) {
		writeProblem(w, badRequest("status must be pending, processing, processed or failed"))
		return
	}
	events, err := a.in.List(r.Context(), f)
	if err != nil {
		writeProblem(w, errDatabase)
		return
	}
	if events == nil {
		events = []inbox.EventInfo{}
	}
	writeJSON(w, map[string]any{"events": events})
}

func (a *api) event(w http.ResponseWriter, r *http.Request) {
	e, err := a.in.Event(r.Context(), r.PathValue("id"))
	switch {
	case errors.Is(err, inbox.ErrEventNotFound):
		writeProblem(w, errNotFound)
	case err != nil:
		writeProblem(w, errDatabase)
	default:
		writeJSON(w, e)
	}
}

func (a *api) stats(w http.ResponseWriter, r *http.Request) {
	s, err := a.in.Stats(r.Context())
	if err != nil {
		writeProblem(w, errDatabase)
		return
	}
	writeJSON(w, map[string]any{
		"pending": s.Pending, "processing": s.Processing, "failed": s.Failed, "processed": s.Processed,
		"retrying": s.Retrying, "attempts": s.Attempts, "oldest_pending_seconds": s.OldestPending.Seconds(),
	})
}

func (a *api) redriveOne(w http.ResponseWriter, r *http.Request) {
	if !a.redrive {
		writeProblem(w, errReadOnly)
		return
	}
	err := a.in.Redrive(r.Context(), r.PathValue("id"))
	switch {
	case errors.Is(err, inbox.ErrEventNotFound):
		writeProblem(w, errNotFound)
	case errors.Is(err, inbox.ErrNotFailed):
		writeProblem(w, errNotFailed)
	case err != nil:
		writeProblem(w, errDatabase)
	default:
		writeJSON(w, map[string]any{"redriven": 1})
	}
}

func (a *api) redriveType(w http.ResponseWriter, r *http.Request) {
	if !a.redrive {
		writeProblem(w, errReadOnly)
		return
	}
	n, err := a.in.RedriveType(r.Context(), r.URL.Query().Get("type"))
	if err != nil {
		writeProblem(w, errDatabase)
		return
	}
	writeJSON(w, map[string]any{"redriven": n})
}

// writeJSON answers 200 with v, which always encodes: the API's own
// types, whose payloads are valid JSON.
func writeJSON(w http.ResponseWriter, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		writeProblem(w, problem.Problem{Title: "Internal server error", Status: http.StatusInternalServerError})
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}
